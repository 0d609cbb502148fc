"""Compositional (GenEval-style) accuracy of a folder of generated shapes images.

    python eval/compositional.py --samples=DIR [--json=PATH] [--results=PATH]

DIR holds the images and `manifest.jsonl` (one JSON object per image with at least "file",
relative to DIR, and "prompt"; optional "spec", "task", "split"): the format is documented
in `imagen_jax/shapes/accuracy.py`, which holds all the logic. Prints each task's accuracy
and count and the overall mean of the six task accuracies, per split.
"""

import json

from absl import app, flags

from imagen_jax import logs
from imagen_jax.shapes import accuracy

_SAMPLES = flags.DEFINE_string("samples", None, "Folder with images and manifest.jsonl.")
_JSON = flags.DEFINE_string("json", None, "Also write the table here, as JSON.")
_RESULTS = flags.DEFINE_string("results", None, "Also write per-image verdicts here (JSONL).")
flags.mark_flag_as_required("samples")


def main(argv):
    del argv
    logs.quiet_logs()
    table = accuracy.evaluate_folder(_SAMPLES.value, results_path=_RESULTS.value)
    print(accuracy.format_table(table))
    if _JSON.value:
        with open(_JSON.value, "w", encoding="utf-8") as f:
            json.dump(table, f, indent=2)


if __name__ == "__main__":
    app.run(main)
