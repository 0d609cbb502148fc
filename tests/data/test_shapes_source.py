"""The shapes domain read through the training pipeline."""

import numpy as np
import pytest

from imagen_jax.data import ShapesSource, make_pipeline
from imagen_jax.data.buckets import record_shapes
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


def test_buckets_draw_whole_scenes_on_each_canvas_and_batch_by_bucket():
    """data.buckets with the shapes source: each record is drawn on one of the buckets'
    canvases (a wide scene, not a crop of a square one, so its caption still holds),
    `image_shape` names it without drawing, and every batch is of one bucket; a square
    record is the record of a source without buckets."""
    from imagen_jax import training
    from imagen_jax.training.input import make_source

    cfg = training.data_config(source="shapes", resolution=32, size=400, batch_size=4)
    cfg.buckets = "32x32,24x40,40x24"
    source = make_source(cfg)
    square = ShapesSource(size=400, resolution=32)
    shapes = [source.image_shape(i) for i in range(60)]
    assert record_shapes(source)[:60] == shapes  # the bucket plan's bulk read agrees
    assert set(shapes) == {(32, 32), (24, 40), (40, 24)}
    for i in range(0, 60, 3):
        record = source[i]
        assert record["image"].shape[:2] == shapes[i]
        assert score(record["image"], parse_prompt(record["caption"])).passed, record["caption"]
        if shapes[i] == (32, 32):
            np.testing.assert_array_equal(record["image"], square[i]["image"])
    it = make_pipeline(
        source,
        batch_size=4,
        resolution=32,
        seed=0,
        process_index=0,
        process_count=1,
        buckets=((32, 32), (24, 40), (40, 24)),
    )
    seen = set()
    for _ in range(6):
        batch = next(it)
        seen.add(batch["image"].shape[1:3])
        for key, image in zip(batch["key"], batch["image"], strict=True):
            index = int(key.rsplit("-", 1)[1])
            np.testing.assert_array_equal(image, source[index]["image"])  # not resized
    assert len(seen) >= 2
    with pytest.raises(ValueError, match="shapes canvas 24x64"):
        ShapesSource(canvases=((24, 64),))
    with pytest.raises(ValueError, match="cell_labels are for square images"):
        ShapesSource(canvases=((24, 40),), cell_labels=4)
