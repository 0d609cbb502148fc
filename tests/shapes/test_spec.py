"""Tests for imagen_jax.shapes.spec and geometry: the vocabulary, dataclasses, JSON, outlines."""

import dataclasses
import json
import math

import numpy as np
import pytest

from imagen_jax.shapes import geometry
from imagen_jax.shapes.spec import (
    BACKGROUNDS,
    COLORS,
    SHAPES,
    ObjectSpec,
    PromptSpec,
    Scene,
    SceneObject,
)


def test_palette_is_far_apart():
    # Noise, blur and JPEG must not move a pixel to another name: >= 100 apart in RGB.
    named = {**COLORS, **BACKGROUNDS}
    for a in named:
        for b in named:
            if a < b and not (a in BACKGROUNDS and b in BACKGROUNDS):
                d = float(np.linalg.norm(np.subtract(named[a], named[b])))
                assert d >= 100, (a, b, d)


def test_scene_json_round_trip():
    scene = Scene(
        (
            SceneObject("star", "red", 0.2, 0.3, 0.4, 5.0),
            SceneObject("cross", "blue", 0.27, 0.7, 0.6),
        ),
        "gray",
    )
    data = json.loads(json.dumps(scene.to_dict()))
    assert Scene.from_dict(data) == scene
    assert set(data) == {"objects", "background"}  # the square canvas is the default
    wide = dataclasses.replace(scene, width=1.6)
    data = json.loads(json.dumps(wide.to_dict()))
    assert data["width"] == 1.6 and Scene.from_dict(data) == wide


def test_prompt_spec_json_round_trip():
    spec = PromptSpec(
        (ObjectSpec("circle", "red", size="small"), ObjectSpec("square")),
        relation="left of",
        background="white",
        task="position",
    )
    data = json.loads(json.dumps(spec.to_dict()))
    assert data["objects"][1] == {"shape": "square", "count": 1}  # None fields left out
    assert PromptSpec.from_dict(data) == spec
    assert spec.constraints().task is None


@pytest.mark.parametrize(
    "make, message",
    [
        (lambda: SceneObject("hexagon", "red", 0.2, 0.5, 0.5), "unknown shape 'hexagon'"),
        (lambda: SceneObject("circle", "pink", 0.2, 0.5, 0.5), "unknown color 'pink'"),
        (lambda: Scene((), "beige"), "unknown background 'beige'"),
        (lambda: ObjectSpec("circle", count=0), "count must be in"),
        (lambda: ObjectSpec("circle", size="huge"), "unknown size 'huge'"),
        (lambda: PromptSpec((ObjectSpec("circle"),), relation="left of"), "two single objects"),
        (lambda: PromptSpec((ObjectSpec("circle"),), relation="near"), "unknown relation"),
        (lambda: PromptSpec((ObjectSpec("circle"),), task="counting_stars"), "unknown task"),
        (lambda: PromptSpec(()), "at least one object group"),
        (lambda: SceneObject("circle", "red", 0.0, 0.5, 0.5), "size must be in"),
        (lambda: SceneObject("circle", "red", 0.2, math.nan, 0.5), "must be finite"),
        (lambda: Scene.from_dict({"objects": [], "bg": "black"}), "unknown keys \\['bg'\\]"),
        (lambda: Scene((), width=1.5, height=1.2), "shorter side must be 1"),
        (lambda: Scene((), width=2.5), "longer at most 2.0"),
        (lambda: Scene((), height=0.5), "height must be a number >= 1"),
        (lambda: PromptSpec.from_dict({"objects": [{"color": "red"}]}), "shape"),
        (lambda: PromptSpec.from_dict({"objects": "circle"}), "must be a list"),
    ],
)
def test_clear_errors(make, message):
    with pytest.raises(ValueError, match=message):
        make()


def test_error_lists_the_allowed_names():
    with pytest.raises(ValueError) as info:
        ObjectSpec("oval")
    for shape in SHAPES:
        assert shape in str(info.value)


@pytest.mark.parametrize("shape", SHAPES)
def test_unit_shapes_have_unit_area_and_centroid_at_origin(shape):
    n = 600
    c = (np.arange(n) + 0.5) / n * 2.4 - 1.2
    p = np.stack(np.meshgrid(c, c), -1)
    inside = geometry.unit_sdf(shape, p) < 0
    cell = (2.4 / n) ** 2
    assert inside.sum() * cell == pytest.approx(1.0, abs=0.01)
    assert np.abs(p[inside].mean(0)).max() < 0.01
    assert geometry.circumradius(shape) < 1.0


@pytest.mark.parametrize("shape", SHAPES)
def test_sdf_is_a_distance(shape):
    # |grad sdf| = 1 near the outline, so that coverage = clip(0.5 - d) ramps over one pixel.
    pts = geometry.outline(shape) * 1.05
    eps = 1e-4
    gx = (geometry.unit_sdf(shape, pts + [eps, 0]) - geometry.unit_sdf(shape, pts - [eps, 0])) / (
        2 * eps
    )
    gy = (geometry.unit_sdf(shape, pts + [0, eps]) - geometry.unit_sdf(shape, pts - [0, eps])) / (
        2 * eps
    )
    grad = np.hypot(gx, gy)
    assert np.median(grad) == pytest.approx(1.0, abs=0.02)


def test_relations_follow_geneval():
    dims = (0.1, 0.1)
    assert geometry.relations((0.2, 0.5), dims, (0.8, 0.5), dims) == {"left of"}
    assert geometry.relations((0.8, 0.5), dims, (0.2, 0.5), dims) == {"right of"}
    assert geometry.relations((0.5, 0.2), dims, (0.5, 0.8), dims) == {"above"}
    assert geometry.relations((0.5, 0.8), dims, (0.5, 0.2), dims) == {"below"}
    assert geometry.relations((0.2, 0.2), dims, (0.8, 0.8), dims) == {"left of", "above"}
    # Too close for their sizes: nothing.
    assert geometry.relations((0.5, 0.5), (0.4, 0.4), (0.55, 0.52), (0.4, 0.4)) == frozenset()


def test_bbox_of_rotated_square():
    obj = SceneObject("square", "red", 0.2, 0.5, 0.5, rotation=45.0)
    x0, y0, x1, y1 = geometry.bbox(obj)
    assert x1 - x0 == pytest.approx(0.2 * math.sqrt(2), rel=1e-3)
    assert (x0 + x1) / 2 == pytest.approx(0.5, abs=1e-6)
    assert (y0 + y1) / 2 == pytest.approx(0.5, abs=1e-6)
