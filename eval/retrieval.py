"""Zero-shot, retrieval and compositional hard-negative accuracy of an embedding model on
shapes scenes.

    python eval/retrieval.py --model=runs/emb/embedding [--size=300] \
        [--metrics=zero_shot,retrieval,hard_negatives] [--splits=heldout,train] [--json=OUT]

--model is an embedding model directory (ours, or a transformers CLIPModel / SiglipModel).
The evaluators are the trainer's (`imagen_jax.evaluation.retrieval`, `evals.*` of a
two_towers config): --size scenes per split (hard negatives: per task of color_attr,
position and counting), drawn from --seed, rendered at --resolution (default: the model's
image size), captions in the --wordings set. Prints the metrics and what each evaluator
used as JSON.
"""

import json
import sys

from absl import app, flags

from imagen_jax import logs
from imagen_jax.evaluation import retrieval
from imagen_jax.pipelines import embedding
from imagen_jax.training.config import embedding_evals_config

_MODEL = flags.DEFINE_string("model", None, "An embedding model directory.")
_METRICS = flags.DEFINE_list("metrics", list(retrieval.EMBEDDING_EVALUATORS), "Evaluators.")
_SPLITS = flags.DEFINE_list("splits", ["heldout", "train"], "Shapes splits.")
_SIZE = flags.DEFINE_integer("size", 300, "Scenes per split (hard negatives: per task).")
_SEED = flags.DEFINE_integer("seed", 0, "The scenes' seed.")
_WORDINGS = flags.DEFINE_string("wordings", "grammar", "Caption wording set.")
_RESOLUTION = flags.DEFINE_integer("resolution", 0, "Render size; 0 = the model's.")
_BATCH = flags.DEFINE_integer("batch_size", 64, "Images or texts per compiled call.")
_JSON = flags.DEFINE_string("json", None, "Also write the result here.")
flags.mark_flags_as_required(["model"])


def main(argv):
    del argv
    logs.quiet_logs()
    try:
        embedder = embedding.load_embedder(_MODEL.value, batch_size=_BATCH.value)
        evals = embedding_evals_config(
            metrics=tuple(_METRICS.value),
            splits=tuple(_SPLITS.value),
            size=_SIZE.value,
            seed=_SEED.value,
            wordings=_WORDINGS.value,
        )
        resolution = _RESOLUTION.value or embedder.processor.output_size(1, 1)[0]
        evaluators = retrieval.make_embedding_evaluators(evals, resolution=resolution)
        metrics = retrieval.run_embedding_evaluators(evaluators, embedder)
    except (ValueError, OSError) as e:
        sys.exit(f"eval/retrieval.py: {type(e).__name__}: {e}")
    result = {
        "model": embedder.name,
        "evaluators": [e.describe() for e in evaluators],
        "metrics": metrics,
    }
    text = json.dumps(result, indent=2)
    print(text)
    if _JSON.value:
        with open(_JSON.value, "w", encoding="utf-8") as f:
            f.write(text + "\n")


if __name__ == "__main__":
    app.run(main)
