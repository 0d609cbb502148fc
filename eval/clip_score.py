"""CLIP score of a folder of samples with their prompts.

    python eval/clip_score.py --samples=DIR --clip=CLIP_DIR [--clamp=mean|pair] \
        [--batch_size=32] [--backbone=NAME] [--json=OUT.json]

DIR is a sampling job's output: `manifest.jsonl` (one JSON object per image with "file"
and "prompt", as sample.py writes it) and the images it lists. CLIP_DIR is a local
Hugging Face-layout CLIPModel directory (config.json, model.safetensors, tokenizer.json,
preprocessor_config.json), e.g. openai/clip-vit-large-patch14 downloaded from the hub, or
another image-text embedding model directory for an in-domain score (the shapes embedding
model that configs/shapes_embedding.py trains; a SiglipModel).
All logic lives in `imagen_jax/evaluation/clip_score.py`; this prints the result as JSON
(score, n, backbone, clamp convention) and writes it to --json if given.
"""

import json

from absl import app, flags

from imagen_jax import logs
from imagen_jax.evaluation import clip_score

_SAMPLES = flags.DEFINE_string("samples", None, "Folder with manifest.jsonl and its images.")
_CLIP = flags.DEFINE_string("clip", None, "Local CLIPModel directory (Hugging Face layout).")
_CLAMP = flags.DEFINE_enum(
    "clamp", "mean", clip_score.CLAMPS, "mean: torchmetrics' max(mean, 0); pair: mean of max(., 0)."
)
_BATCH = flags.DEFINE_integer("batch_size", 32, "Images / prompts per batch (all devices).")
_BACKBONE = flags.DEFINE_string("backbone", None, "Name to report (default: from the folder).")
_JSON = flags.DEFINE_string("json", None, "Also write the result here, as JSON.")
flags.mark_flags_as_required(["samples", "clip"])


def main(argv):
    del argv
    logs.quiet_logs()
    result = clip_score.evaluate_folder(
        _SAMPLES.value,
        clip_path=_CLIP.value,
        clamp=_CLAMP.value,
        batch_size=_BATCH.value,
        backbone=_BACKBONE.value,
    )
    text = json.dumps(result, indent=2)
    print(text)
    if _JSON.value:
        with open(_JSON.value, "w", encoding="utf-8") as f:
            f.write(text + "\n")


if __name__ == "__main__":
    app.run(main)
