"""The shipped shapes embedding model (checkpoints/shapes/embedding/,
configs/shapes_embedding.py:hard_negatives): small, loaded by `load_embedder` and the
in-domain CLIP score, and it reads rendered scenes: colour and shape zero-shot on held-out
and training scenes, true captions above their one-count-off counterfactuals and above
shuffled captions (colour and relation binding, at chance, are not asserted). The bounds
sit below the model card's measured numbers (on 300 scenes per split) with room for the
smaller samples here; chance is 1/6 for colours and shapes and 1/2 for a caption pair."""

import pathlib

import numpy as np
import pytest

from imagen_jax.evaluation import clip_score
from imagen_jax.evaluation import retrieval as retrieval_lib
from imagen_jax.pipelines import embedding
from imagen_jax.shapes import tasks
from imagen_jax.shapes.render import render

MODEL = pathlib.Path(__file__).resolve().parents[2] / "checkpoints" / "shapes" / "embedding"
MAX_BYTES = 6 * 2**20


@pytest.fixture(scope="module")
def embedder():
    return embedding.load_embedder(MODEL, batch_size=64)


def test_shipped_embedding_model_is_small():
    assert sum(p.stat().st_size for p in MODEL.iterdir()) < MAX_BYTES


def test_zero_shot_colour_and_shape(embedder):
    zero_shot = retrieval_lib.ZeroShot.shapes(("heldout", "train"), 60, resolution=64, seed=7)
    metrics = zero_shot(embedder)
    for split in ("heldout", "train"):  # held-out: colour-shape pairs training never named
        assert metrics[f"zero_shot/{split}/color"] >= 0.9, metrics
        assert metrics[f"zero_shot/{split}/shape"] >= 0.9, metrics


def test_true_captions_beat_hard_negatives_and_shuffled_captions(embedder):
    hard = retrieval_lib.HardNegatives.shapes(("train",), 40, resolution=64, seed=7)
    metrics = hard(embedder)
    assert metrics["hard_negatives/train/count"] >= 0.8, metrics
    rng = np.random.default_rng(7)
    examples = [tasks.sample_example(rng, split="heldout") for _ in range(48)]
    images = [render(e.scene, 64) for e in examples]
    captions = [e.caption for e in examples]
    scorer = clip_score.load_clip_scorer(MODEL)
    true = scorer.score(images, captions)["score"]
    shuffled = scorer.score(images, captions[1:] + captions[:1])["score"]
    assert true > shuffled + 5.0, (true, shuffled)
