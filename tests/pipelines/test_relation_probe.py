"""The relation probe: its caption pairs state opposite relations of the drawn scene, and its
losses respond to the caption."""

import dataclasses

import numpy as np
import pytest

from imagen_jax.images import to_float_image
from imagen_jax.models import layout_head as layers
from imagen_jax.proj.shapes.relation_probe import (
    layout_probe,
    layout_side_accuracy,
    probe_scenes,
    relation_probe,
)
from imagen_jax.shapes import parse_prompt, score
from imagen_jax.shapes.spec import INVERSE_RELATION


@pytest.mark.parametrize("wordings", ["grammar", "heldout"])
@pytest.mark.parametrize("task", ["position", "color_attr"])
def test_caption_pairs_state_the_scene_and_its_counterfactual(task, wordings):
    images, true, other, specs = probe_scenes(
        12, seed=3, split="train", resolution=64, task=task, wordings=wordings
    )
    assert images.shape == (12, 64, 64, 3) and len(set(true)) == 12
    grammar_words = probe_scenes(12, seed=3, split="train", resolution=64, task=task)[1]
    assert (true == grammar_words) == (wordings == "grammar")  # the same scenes, reworded
    for image, a, b, spec in zip(images, true, other, specs, strict=True):
        spec_a, spec_b = parse_prompt(a), parse_prompt(b)
        assert spec_a.relation == spec.relation
        assert [o.shape for o in spec_a.objects] == [o.shape for o in spec.objects]
        if task == "position":
            assert spec_b.relation == INVERSE_RELATION[spec_a.relation]
            assert spec_a.objects == spec_b.objects
        else:
            assert spec_a.relation is None and spec_b.relation is None
            assert [o.shape for o in spec_a.objects] == [o.shape for o in spec_b.objects]
            assert [o.color for o in spec_a.objects] == [o.color for o in spec_b.objects][::-1]
        spec_a, spec_b = (dataclasses.replace(s, task=task) for s in (spec_a, spec_b))
        assert score(image, spec_a).passed and not score(image, spec_b).passed, (a, b)
    with pytest.raises(ValueError, match="the probe takes task"):
        probe_scenes(1, seed=0, split="train", resolution=32, task="counting")


def test_probe_rows_on_a_tiny_stage(stage_dirs):
    rows = relation_probe(stage_dirs[0], scenes=4, seed=0)
    assert [r["t"] for r in rows] == sorted(r["t"] for r in rows)
    for r in rows:
        assert np.isfinite([r["loss_true"], r["loss_counterfactual"]]).all()
        assert 0.0 <= r["true_lower"] <= 1.0
    # The tiny stage's (hash) text encoder tells the two captions apart, so its losses do.
    assert any(r["loss_true"] != r["loss_counterfactual"] for r in rows)
    assert layout_probe(stage_dirs[0], scenes=2) is None  # no layout head to ask
    with pytest.raises(ValueError, match="super-resolution stage"):
        relation_probe(stage_dirs[1], scenes=2)


def test_layout_side_accuracy_reads_the_sides_of_the_relation():
    images, _, _, specs = probe_scenes(40, seed=2, split="train", resolution=32)
    target = np.asarray(layers.layout_target(to_float_image(images), 4))
    horizontal = np.array([s.relation in ("left of", "right of") for s in specs])
    assert horizontal.any() and not horizontal.all()
    accuracy, count = layout_side_accuracy(target, target, horizontal)
    assert accuracy == 1.0 and count >= 30
    mirrored = np.where(horizontal[:, None, None, None], target[:, :, ::-1], target[:, ::-1])
    assert layout_side_accuracy(mirrored, target, horizontal)[0] == 0.0  # every side swapped
    blind = np.broadcast_to(target[0], target.shape)  # one layout for every caption
    assert 0.2 < layout_side_accuracy(blind, target, horizontal)[0] < 0.8
