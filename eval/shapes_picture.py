"""The README's picture of the shipped model: one row per prompt, one column per image, from
the manifest of a `sample.py` run (images in prompt order, 2 px white gaps).

    python sample.py --prompts=eval/shapes_picture_prompts.txt --images_per_prompt=4 \\
        --outdir=runs/picture
    python eval/shapes_picture.py runs/picture docs/shapes_heldout.png
"""

from __future__ import annotations

import json
import os
import sys

import numpy as np
from PIL import Image

GAP = 2


def picture(outdir: str, out: str) -> tuple[int, int]:
    """Writes the grid of `outdir`'s manifest to `out`; returns (rows, columns)."""
    with open(os.path.join(outdir, "manifest.jsonl")) as f:
        records = [json.loads(line) for line in f if line.strip()]
    if not records:
        raise SystemExit(f"{outdir}/manifest.jsonl lists no images")
    rows: dict[int, list[str]] = {}
    for rec in sorted(records, key=lambda r: (r["prompt_index"], r["image_index"])):
        rows.setdefault(rec["prompt_index"], []).append(os.path.join(outdir, rec["file"]))
    columns = max(len(files) for files in rows.values())
    first = np.asarray(Image.open(next(iter(rows.values()))[0]).convert("RGB"))
    h, w, _ = first.shape
    sheet = np.full((len(rows) * (h + GAP) - GAP, columns * (w + GAP) - GAP, 3), 255, np.uint8)
    for r, files in enumerate(rows.values()):
        for c, file in enumerate(files):
            image = np.asarray(Image.open(file).convert("RGB"))
            if image.shape != first.shape:
                raise SystemExit(f"{file} is {image.shape}, the others {first.shape}")
            top, left = r * (h + GAP), c * (w + GAP)
            sheet[top : top + h, left : left + w] = image
    Image.fromarray(sheet).save(out)
    return len(rows), columns


if __name__ == "__main__":
    if len(sys.argv) != 3:
        raise SystemExit(__doc__)
    rows, columns = picture(*sys.argv[1:])
    print(f"{rows} rows x {columns} columns -> {sys.argv[2]}")
