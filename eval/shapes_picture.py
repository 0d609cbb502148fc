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

from imagen_jax.pipelines.jobs import save_grid

GAP = 2


def picture(outdir: str, out: str) -> tuple[int, int]:
    """Writes the grid of `outdir`'s manifest to `out`; returns (rows, columns)."""
    with open(os.path.join(outdir, "manifest.jsonl")) as f:
        records = [json.loads(line) for line in f if line.strip()]
    if not records:
        raise SystemExit(f"{outdir}/manifest.jsonl lists no images")
    records.sort(key=lambda r: (r["prompt_index"], r["image_index"]))
    rows = len({r["prompt_index"] for r in records})
    columns = len(records) // rows
    if columns * rows != len(records):
        raise SystemExit(f"{outdir}: the prompts do not all have the same number of images")
    images = [
        np.asarray(Image.open(os.path.join(outdir, r["file"])).convert("RGB")) for r in records
    ]
    save_grid(images, out, columns=columns, gap=GAP)
    return rows, columns


if __name__ == "__main__":
    if len(sys.argv) != 3:
        raise SystemExit(__doc__)
    rows, columns = picture(*sys.argv[1:])
    print(f"{rows} rows x {columns} columns -> {sys.argv[2]}")
