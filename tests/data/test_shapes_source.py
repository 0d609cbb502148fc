"""The shapes domain read through the training pipeline."""

import numpy as np
import pytest

from imagen_jax.data import ShapesSource, make_pipeline
from imagen_jax.shapes import TASKS, parse_prompt, score


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


def test_task_weights_reach_the_source_through_the_data_config():
    from imagen_jax import training
    from imagen_jax.training.input import make_source

    only_position = "position:1," + ",".join(f"{t}:0" for t in TASKS if t != "position")
    cfg = training.data_config(source="shapes", resolution=32, size=100)
    cfg.task_weights = only_position
    source = make_source(cfg)
    for i in range(10):
        assert parse_prompt(source[i]["caption"]).relation is not None, source[i]["caption"]
    with pytest.raises(ValueError, match="unknown shapes tasks \\['count'\\]"):
        ShapesSource(task_weights={"count": 1.0})
