"""Writes the fixed evaluation prompt files of the shapes domain (see `prompt_sets`).

python -m imagen_jax.shapes.make_prompts            # rewrite the packaged files
python -m imagen_jax.shapes.make_prompts --check    # fail if they differ from a rewrite
python -m imagen_jax.shapes.make_prompts --out_dir=/tmp/prompts
"""

from __future__ import annotations

import pathlib
import sys

from absl import app, flags

from imagen_jax.shapes import prompt_sets

_OUT_DIR = flags.DEFINE_string("out_dir", None, "Where to write; default: the package's files.")
_CHECK = flags.DEFINE_bool("check", False, "Only compare the files with a fresh generation.")


def main(argv):
    del argv
    stale = []
    for name in prompt_sets.PROMPT_SETS:
        packaged = prompt_sets.packaged_path(name)
        path = pathlib.Path(_OUT_DIR.value) / packaged.name if _OUT_DIR.value else packaged
        fresh = "".join(r.to_json() + "\n" for r in prompt_sets.generate(name))
        if _CHECK.value:
            if not path.exists() or path.read_text(encoding="utf-8") != fresh:
                stale.append(str(path))
            continue
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(fresh, encoding="utf-8")
        print(f"wrote {fresh.count(chr(10))} prompts to {path}")
    if stale:
        sys.exit(f"out of date (rerun python -m imagen_jax.shapes.make_prompts): {stale}")


if __name__ == "__main__":
    app.run(main)
