"""The relation probe: its caption pairs state opposite relations of the drawn scene, and its
losses respond to the caption."""

import numpy as np
import pytest

from imagen_jax.shapes import parse_prompt, score
from imagen_jax.shapes.relation_probe import probe_scenes, relation_probe
from imagen_jax.shapes.spec import INVERSE_RELATION


def test_caption_pairs_state_the_scene_and_its_opposite():
    images, true, inverted = probe_scenes(12, seed=3, split="train", resolution=64)
    assert images.shape == (12, 64, 64, 3) and len(set(true)) == 12
    for image, a, b in zip(images, true, inverted, strict=True):
        spec_a, spec_b = parse_prompt(a), parse_prompt(b)
        assert spec_b.relation == INVERSE_RELATION[spec_a.relation]
        assert spec_a.objects == spec_b.objects
        assert score(image, spec_a).passed and not score(image, spec_b).passed, (a, b)


def test_probe_rows_on_a_tiny_stage(stage_dirs):
    rows = relation_probe(stage_dirs[0], scenes=4, seed=0)
    assert [r["t"] for r in rows] == sorted(r["t"] for r in rows)
    for r in rows:
        assert np.isfinite([r["loss_true"], r["loss_inverted"]]).all()
        assert 0.0 <= r["true_lower"] <= 1.0
    # The tiny stage's (hash) text encoder tells the two captions apart, so its losses do.
    assert any(r["loss_true"] != r["loss_inverted"] for r in rows)
    with pytest.raises(ValueError, match="super-resolution stage"):
        relation_probe(stage_dirs[1], scenes=2)
