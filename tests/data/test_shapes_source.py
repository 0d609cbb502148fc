"""The shapes domain read through the training pipeline."""

import numpy as np
import pytest

from imagen_jax.data import ShapesSource, make_pipeline
from imagen_jax.shapes import parse_prompt, score


def test_records_are_deterministic_and_scored_correctly():
    source = ShapesSource(size=50, resolution=32, seed=3)
    again = ShapesSource(size=50, resolution=32, seed=3)
    for i in range(0, 50, 7):
        a, b = source[i], again[i]
        np.testing.assert_array_equal(a["image"], b["image"])
        assert a["caption"] == b["caption"] and a["image"].shape == (32, 32, 3)
        # The caption describes the image: the scorer agrees.
        assert score(a["image"], parse_prompt(a["caption"])).passed, a["caption"]
    assert source[0]["caption"] != ShapesSource(size=50, resolution=32, seed=4)[0]["caption"]


def test_pipeline_batches_with_low_res():
    it = make_pipeline(
        ShapesSource(size=64, resolution=64),
        batch_size=8,
        resolution=64,
        low_resolution=32,
        seed=0,
        process_index=0,
        process_count=1,
    )
    batch = next(it)
    assert batch["image"].shape == (8, 64, 64, 3) and batch["low_res"].shape == (8, 32, 32, 3)
    assert len(batch["caption"]) == 8


def test_bad_arguments_raise():
    with pytest.raises(ValueError, match="unknown shapes split 'test'"):
        ShapesSource(split="test")
    with pytest.raises(ValueError, match="unknown shapes task 'count'"):
        ShapesSource(task="count")
    with pytest.raises(IndexError, match="index 5 out of range"):
        ShapesSource(size=5)[5]
