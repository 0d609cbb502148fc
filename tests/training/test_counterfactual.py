"""The shapes research's counterfactual loss term (`imagen_jax/proj/shapes/losses.py`,
`train.aux_losses.counterfactual`): its captions state what the scene is not, its value
rewards a network for the words that differ, and the trainer runs it as a named term."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import stage_config

from imagen_jax.data import ShapesSource
from imagen_jax.diffusion import config as diffusion_config
from imagen_jax.proj.shapes import losses as shapes_losses
from imagen_jax.shapes import parse_prompt, score
from imagen_jax.shapes.tasks import counterfactual
from imagen_jax.training import input as input_lib
from imagen_jax.training import train_and_evaluate


def test_source_counterfactuals_state_what_the_scene_is_not():
    plain = ShapesSource(size=400, resolution=64, seed=5)
    source = ShapesSource(size=400, resolution=64, seed=5, counterfactuals=True)
    seen = set()
    for i in range(120):
        record, same = source[i], plain[i]
        assert record["caption"] == same["caption"]  # the option changes nothing else
        np.testing.assert_array_equal(record["image"], same["image"])
        spec = parse_prompt(record["caption"])
        expected = counterfactual(spec, training=True)
        if expected is None:
            assert record["counterfactual"] == ""
            continue
        other = parse_prompt(record["counterfactual"])
        assert (other.objects, other.relation) == (expected.objects, expected.relation)
        if spec.relation is None and any(o.color is None for o in spec.objects):
            continue
        task = "position" if spec.relation else "color_attr"
        seen.add(task)
        spec, other = (dataclasses.replace(s, task=task) for s in (spec, other))
        assert score(record["image"], spec).passed, record["caption"]
        assert not score(record["image"], other).passed, record["counterfactual"]
    assert seen == {"position", "color_attr"}


@pytest.mark.parametrize("kinds", [("colors",), ("relation",)])
def test_source_counterfactual_kinds_keep_only_those(kinds):
    source = ShapesSource(
        size=400, resolution=64, seed=5, counterfactuals=True, counterfactual_kinds=kinds
    )
    both = ShapesSource(size=400, resolution=64, seed=5, counterfactuals=True)
    kept = 0
    for i in range(120):
        record, full = source[i], both[i]
        assert record["caption"] == full["caption"]
        relation = parse_prompt(record["caption"]).relation is not None
        wanted = ("relation" if relation else "colors") in kinds
        assert record["counterfactual"] == (full["counterfactual"] if wanted else "")
        kept += bool(record["counterfactual"])
    assert kept > 0
    with pytest.raises(ValueError, match="counterfactual kinds"):
        ShapesSource(size=4, counterfactuals=True, counterfactual_kinds=("size",))


def test_shape_counterfactuals_change_one_shape_and_the_scorer_sees_it():
    """Kind "shape" (what the contrastive trainer's hard negatives add): where no relation
    or colour exchange applies, the first group's shape is another one, the same every
    time for a spec; the scorer finds the true caption and not the counterfactual."""
    source = ShapesSource(
        size=400, resolution=64, seed=6, counterfactuals=True,
        counterfactual_kinds=("relation", "colors", "shape"),
    )  # fmt: skip
    changed = 0
    for i in range(80):
        record = source[i]
        spec = parse_prompt(record["caption"])
        expected = counterfactual(spec, ("relation", "colors", "shape"), training=True)
        assert expected == counterfactual(spec, ("relation", "colors", "shape"), training=True)
        if expected is None or spec.relation is not None:
            continue
        if expected.objects[0].color != spec.objects[0].color:
            continue  # a colour exchange
        other = parse_prompt(record["counterfactual"])
        assert other.objects[0].shape != spec.objects[0].shape
        assert other.objects[0].shape not in {g.shape for g in spec.objects}
        assert other.objects[1:] == spec.objects[1:]
        spec, other = (dataclasses.replace(s, task="two_object") for s in (spec, other))
        if len(spec.objects) == 1:
            spec, other = (dataclasses.replace(s, task="single_object") for s in (spec, other))
        assert score(record["image"], spec).passed, record["caption"]
        assert not score(record["image"], other).passed, record["counterfactual"]
        changed += 1
    assert changed > 10


def _batch(has):
    b, length, dim = len(has), 4, 3
    text = jnp.ones((b, length, dim))
    return {
        "text": text,
        "text_mask": jnp.ones((b, length), bool),
        "counter_text": -text,
        "counter_mask": jnp.ones((b, length), bool),
        "has_counterfactual": jnp.asarray(has),
    }


@pytest.mark.parametrize("prediction", ["v", "eps"])
def test_counterfactual_loss_rewards_reading_the_caption(prediction):
    schedule = diffusion_config.make_schedule(
        diffusion_config.diffusion_config(schedule="cosine", prediction=prediction)
    )
    x0 = jax.random.uniform(jax.random.key(0), (4, 8, 8, 3), minval=-1, maxval=1)
    kwargs = dict(schedule=schedule, prediction=prediction, beta=5.0, min_time=0.4)
    key = jax.random.key(1)

    def blind(z, t, cond):  # the same output whatever the caption
        return 0.3 * z

    loss, m = shapes_losses.counterfactual_loss(blind, x0, _batch([True] * 4), key, **kwargs)
    np.testing.assert_allclose(loss, np.log(2.0), rtol=1e-6)  # softplus(0)
    assert float(m["counterfactual_true_lower"]) == 0.0

    def reader(z, t, cond):  # exact-ish with the true caption, far off with the other
        sign = cond["text"][:, 0, 0][:, None, None, None]
        return jnp.where(sign > 0, 0.0, 5.0) + 0.0 * z

    loss, m = shapes_losses.counterfactual_loss(
        reader, x0, _batch([True, True, False, True]), key, **kwargs
    )
    assert float(loss) < 0.01 and float(m["counterfactual_true_lower"]) == 1.0
    loss, _ = shapes_losses.counterfactual_loss(reader, x0, _batch([False] * 4), key, **kwargs)
    assert float(loss) == 0.0  # no scene has a counterfactual


def test_counterfactual_hinge_stops_at_the_margin():
    schedule = diffusion_config.make_schedule(diffusion_config.diffusion_config())
    x0 = jax.random.uniform(jax.random.key(0), (4, 8, 8, 3), minval=-1, maxval=1)
    kwargs = dict(schedule=schedule, prediction="v", beta=5.0, min_time=0.4, margin=0.1)
    key = jax.random.key(1)
    loss, _ = shapes_losses.counterfactual_loss(
        lambda z, t, c: 0.3 * z, x0, _batch([True] * 4), key, **kwargs
    )
    np.testing.assert_allclose(loss, 0.1, rtol=1e-6)  # caption-blind: relu(0 + margin)

    def reader(scale):  # the counterfactual caption's output is off by `scale`
        def fn(z, t, cond):
            sign = cond["text"][:, 0, 0][:, None, None, None]
            return jnp.where(sign > 0, 0.0, scale) + 0.0 * z

        return fn

    far, _ = shapes_losses.counterfactual_loss(reader(5.0), x0, _batch([True] * 4), key, **kwargs)
    assert float(far) == 0.0  # past the margin: nothing left to push
    near, _ = shapes_losses.counterfactual_loss(reader(0.05), x0, _batch([True] * 4), key, **kwargs)
    assert 0.0 < float(near) < 0.1  # the true caption wins, by less than the margin


def test_counterfactual_rows_denoises_only_rows_that_have_one():
    schedule = diffusion_config.make_schedule(diffusion_config.diffusion_config())
    x0 = jnp.arange(5.0)[:, None, None, None] * jnp.ones((5, 4, 4, 3))
    batch = _batch([False, True, False, True, True])
    batch["text"] = batch["text"] * jnp.arange(1.0, 6.0)[:, None, None]  # row i reads i + 1
    batch["counter_text"] = -batch["text"]
    seen = []

    def recorder(z, t, cond):
        seen.append(np.asarray(cond["text"][:, 0, 0]))
        return 0.0 * z

    kwargs = dict(schedule=schedule, prediction="v", beta=5.0, min_time=0.4)
    loss, m = shapes_losses.counterfactual_loss(
        recorder, x0, batch, jax.random.key(0), rows=2, **kwargs
    )
    np.testing.assert_array_equal(seen[-1], [2.0, 4.0, -2.0, -4.0])  # rows 1 and 3, twice
    np.testing.assert_allclose(loss, np.log(2.0), rtol=1e-6)  # caption-blind: softplus(0)
    shapes_losses.counterfactual_loss(recorder, x0, batch, jax.random.key(0), rows=4, **kwargs)
    # Three rows have one; the fourth row taken (row 0) has none and weighs nothing.
    np.testing.assert_array_equal(seen[-1][:4], [2.0, 4.0, 5.0, 1.0])


def test_trainer_runs_the_counterfactual_term(tmp_path):
    config = stage_config(steps=2, log_every=1, checkpoint_every=2, sample_every=0)
    config.data.source, config.data.size = "shapes", 64
    config.data.task_weights = "position:1,color_attr:1"
    config.train.aux_losses.counterfactual = shapes_losses.counterfactual_config(weight=0.5, rows=4)
    config.data.counterfactuals = "relation,colors"
    _, metrics = train_and_evaluate(config, str(tmp_path))
    assert np.isfinite(metrics["counterfactual_loss"]) and metrics["counterfactual_loss"] > 0
    assert 0.0 <= metrics["counterfactual_true_lower"] <= 1.0

    config.data.counterfactuals = "colors"
    assert input_lib.make_source(config.data).counterfactual_kinds == ("colors",)

    config.data.counterfactuals = ""  # the term is on, the data has no counterfactuals
    with pytest.raises(ValueError, match=r"data.counterfactuals set"):
        train_and_evaluate(config, str(tmp_path / "none"))
    config.data.counterfactuals = "colors"

    config.data.source = "synthetic"
    with pytest.raises(ValueError, match="only data.source='shapes'"):
        train_and_evaluate(config, str(tmp_path / "synthetic"))


def test_training_counterfactuals_never_name_a_heldout_combination_and_mix_kinds():
    """In the train split no negative caption names a held-out pair or layout (the held-out
    split's claim is that training never stated them), while the held-out split's do; with
    `counterfactual_mixed`, scenes with a relation or two colours get shape negatives too."""
    from imagen_jax.shapes import splits

    kinds = ("relation", "colors", "shape")
    specs = [parse_prompt(ShapesSource(size=600, seed=7)[i]["caption"]) for i in range(300)]
    named = {
        split: [
            counterfactual(s, kinds, training=split == "train", mixed=mixed)
            for s in specs
            for mixed in (False, True)
        ]
        for split in ("train", "heldout")
    }
    assert not any(o is not None and splits.spec_heldout(o) for o in named["train"])
    assert any(o is not None and splits.spec_heldout(o) for o in named["heldout"])
    first = [counterfactual(s, kinds, training=True) for s in specs]
    mixed = [counterfactual(s, kinds, training=True, mixed=True) for s in specs]

    def relation_kept(others):  # relation scenes given a shape negative
        return sum(
            o is not None and s.relation is not None and o.relation == s.relation
            for s, o in zip(specs, others, strict=True)
        )

    # without mixing only where the inversion would name a held-out layout
    assert relation_kept(mixed) > 3 * relation_kept(first) + 5
    source = ShapesSource(
        size=600, seed=7, counterfactuals=True, counterfactual_kinds=kinds,
        counterfactual_mixed=True,
    )  # fmt: skip
    for i in range(40):
        expected = counterfactual(specs[i], kinds, training=True, mixed=True)
        record = source[i]
        assert (record["counterfactual"] == "") == (expected is None)
