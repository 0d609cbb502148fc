"""Tests for imagen_jax.shapes.render: exact colours, anti-aliased edges, true areas."""

import numpy as np
import pytest

from imagen_jax.shapes import geometry, tasks
from imagen_jax.shapes.render import cell_labels, render
from imagen_jax.shapes.spec import BACKGROUNDS, COLORS, SHAPES, Scene, SceneObject


@pytest.mark.parametrize("res", [32, 64, 128, 256, 100])
def test_shape_dtype_and_background(res):
    image = render(Scene((), "gray"), res)
    assert image.shape == (res, res, 3) and image.dtype == np.uint8
    assert (image == BACKGROUNDS["gray"]).all()


def test_deterministic_and_uses_no_global_rng():
    scene, _ = tasks.sample_scene(np.random.default_rng(0))
    np.random.seed(1)
    a = render(scene, 64)
    np.random.seed(2)
    b = render(scene, 64)
    np.testing.assert_array_equal(a, b)


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("res", [32, 256])
def test_area_centre_colour_and_antialiasing(shape, res):
    obj = SceneObject(shape, "blue", 0.25, 0.47, 0.53, rotation=7.0)
    image = render(Scene((obj,), "black"), res).astype(np.float64)
    blue = np.asarray(COLORS["blue"], np.float64)
    alpha = image @ blue / (blue @ blue)  # coverage, read back
    assert alpha.sum() / res**2 == pytest.approx(0.25**2, rel=0.02)  # area is size**2
    ys, xs = np.mgrid[0:res, 0:res] + 0.5
    assert (alpha * xs).sum() / alpha.sum() / res == pytest.approx(0.47, abs=0.01)
    assert (alpha * ys).sum() / alpha.sum() / res == pytest.approx(0.53, abs=0.01)
    assert (image == blue).all(-1).sum() > 0.5 * 0.25**2 * res**2  # exact colour inside
    partial = ((alpha > 0.02) & (alpha < 0.98)).sum()
    assert partial > 0.5 * geometry.circumradius(shape) * 0.25 * res  # soft edges


def test_objects_composite_in_order_and_clip_at_the_canvas():
    a = SceneObject("square", "red", 0.3, 0.5, 0.5)
    b = SceneObject("circle", "green", 0.2, 0.5, 0.5)
    image = render(Scene((a, b), "white"), 64)
    assert tuple(image[32, 32]) == COLORS["green"]  # drawn last, on top
    edge = render(Scene((SceneObject("star", "red", 0.3, 0.0, 1.0),), "white"), 32)
    assert edge.shape == (32, 32, 3)


@pytest.mark.parametrize(
    "resolution, message", [(4, "at least 8"), (32.0, "integer"), (True, "integer")]
)
def test_bad_resolution(resolution, message):
    with pytest.raises(ValueError, match=message):
        render(Scene(()), resolution)


def test_sampled_scenes_stay_inside_and_apart():
    rng = np.random.default_rng(3)
    for i in range(600):
        scene = tasks.sample_example(
            rng, task=tasks.TASKS[i % 6], split=("train", "heldout")[i % 2]
        ).scene
        for k, o in enumerate(scene.objects):
            x0, y0, x1, y1 = geometry.bbox(o)
            assert min(x0, y0) >= tasks.MARGIN - 1e-9 and max(x1, y1) <= 1 - tasks.MARGIN + 1e-9
            for p in scene.objects[k + 1 :]:
                gap = np.hypot(o.x - p.x, o.y - p.y) - geometry.circumradius(o.shape) * o.size
                assert gap - geometry.circumradius(p.shape) * p.size >= tasks.GAP - 1e-9


def test_cell_labels_name_the_shape_each_cell_shows():
    """A large square in the top-left quarter, a star over its corner, a small circle far
    right: 4 x 4 cells of a 64 px render, each the shape covering most of it (later objects
    hide earlier ones), background 0; the labels agree with the rendered pixels."""
    ids = {name: k + 1 for k, name in enumerate(SHAPES)}
    scene = Scene(
        (
            SceneObject("square", "red", 0.45, 0.25, 0.25),
            SceneObject("star", "blue", 0.2, 0.4, 0.4),
            SceneObject("circle", "green", 0.1, 0.875, 0.625),
        )
    )
    labels = cell_labels(scene, 4, 64)
    assert labels.shape == (4, 4) and labels.dtype == np.int32
    assert labels[0, 0] == ids["square"] and labels[1, 1] == ids["star"]
    assert labels[2, 3] == ids["circle"] and labels[3, 0] == 0 and labels[0, 3] == 0
    image = render(scene, 64).reshape(4, 16, 4, 16, 3).transpose(0, 2, 1, 3, 4)
    background = np.rint(BACKGROUNDS[scene.background]).astype(np.uint8)
    drawn = (image != background).any(-1).mean((-1, -2))  # fraction of each cell drawn on
    assert ((labels > 0) == (drawn >= 1 / 8 - 0.02)).all(), drawn
    with pytest.raises(ValueError, match="grid 5 must divide the resolution 64"):
        cell_labels(scene, 5, 64)


@pytest.mark.parametrize("hw", [(48, 80), (80, 48), (40, 80)])
def test_a_wide_or_tall_canvas_keeps_shapes_and_positions_in_units_of_its_shorter_side(hw):
    """A circle on a 48 x 80 canvas is round (equal extent across and down) and sits where
    its canvas units put it: x * 48 pixels from the left, not x * 80."""
    h, w = hw
    side = min(hw)
    width, height = w / side, h / side
    obj = SceneObject("circle", "red", 0.25, 0.8 * width, 0.4 * height)
    scene = Scene((obj,), "black", width, height)
    image = render(scene, side)
    assert image.shape == (h, w, 3)
    alpha = image.astype(np.float64) @ np.asarray(COLORS["red"], np.float64)
    alpha /= np.asarray(COLORS["red"], np.float64) @ np.asarray(COLORS["red"], np.float64)
    assert alpha.sum() / side**2 == pytest.approx(0.25**2, rel=0.02)
    ys, xs = np.nonzero(alpha > 0.5)
    assert xs.max() - xs.min() == pytest.approx(ys.max() - ys.min(), abs=1)
    yy, xx = np.mgrid[0:h, 0:w] + 0.5
    assert (alpha * xx).sum() / alpha.sum() / side == pytest.approx(0.8 * width, abs=0.01)
    assert (alpha * yy).sum() / alpha.sum() / side == pytest.approx(0.4 * height, abs=0.01)
    with pytest.raises(ValueError, match="square canvases"):
        cell_labels(scene, 4, side)


@pytest.mark.parametrize("canvas", [(1.6, 1.0), (1.0, 2.0)])
def test_scenes_on_other_canvases_stay_inside_and_apart(canvas):
    rng = np.random.default_rng(4)
    for i in range(300):
        scene = tasks.sample_example(rng, task=tasks.TASKS[i % 6], canvas=canvas).scene
        assert scene.canvas == canvas
        for k, o in enumerate(scene.objects):
            x0, y0, x1, y1 = geometry.bbox(o)
            assert min(x0, y0) >= tasks.MARGIN - 1e-9
            assert x1 <= canvas[0] - tasks.MARGIN + 1e-9 and y1 <= canvas[1] - tasks.MARGIN + 1e-9
            for p in scene.objects[k + 1 :]:
                gap = np.hypot(o.x - p.x, o.y - p.y) - geometry.circumradius(o.shape) * o.size
                assert gap - geometry.circumradius(p.shape) * p.size >= tasks.GAP - 1e-9
