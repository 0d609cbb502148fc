"""Scores a captions.jsonl (caption.py's) against references: CIDEr-D, and for the shapes
domain, parse accuracy per kind of scene.

    python eval/captioning.py --captions=captions/captions.jsonl --images=samples/ \
        [--references=refs.jsonl] [--json=PATH]

The references are the captions' own prompts (a sample.py folder's manifest, carried into
each caption line), or --references, a JSONL with "file" and "references" (a list) or
"caption" (several lines per file add up), and optionally a rendered "scene". Parse
accuracy needs --images (the captioned folder) for images sampled from prompts, whose scene
is verified by the shapes scorer; `imagen_jax/evaluation/captioning.py` documents the rules.
"""

import json
import sys

from absl import app, flags

from imagen_jax import logs
from imagen_jax.evaluation import captioning

_CAPTIONS = flags.DEFINE_string("captions", None, "A captions.jsonl written by caption.py.")
_REFERENCES = flags.DEFINE_string(
    "references", None, "A JSONL of reference captions (default: the captions' prompts)."
)
_IMAGES = flags.DEFINE_string(
    "images", None, "The captioned images' folder (parse accuracy of sampled images)."
)
_JSON = flags.DEFINE_string("json", None, "Also write the report here, as JSON.")
flags.mark_flag_as_required("captions")


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
    logs.quiet_logs()
    try:
        report = captioning.evaluate_captions(
            _CAPTIONS.value, references=_REFERENCES.value, images=_IMAGES.value
        )
    except (ValueError, OSError) as e:  # bad input: named in one line, no traceback
        sys.exit(f"eval/captioning.py: {type(e).__name__}: {e}")
    print(captioning.format_report(report))
    if _JSON.value:
        with open(_JSON.value, "w", encoding="utf-8") as f:
            json.dump(report, f, indent=2)


if __name__ == "__main__":
    app.run(main)
