"""`python -m imagen_jax.proj.shapes.layout_fit`: a stage grows a layout head, fitted on its data,
keeps sampling what it sampled, and the train loop goes on from it with the head's loss."""

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import tiny
from safetensors.numpy import load_file

from imagen_jax import stages
from imagen_jax.proj.shapes import layout_fit
from imagen_jax.training import export, train_and_evaluate


def test_layout_fit_grows_a_stage_that_samples_as_before_and_trains_on(tmp_path):
    config = tiny(steps=2)
    train_and_evaluate(config, str(tmp_path / "run"))
    stage = export.export_stage(
        config, str(tmp_path / "run"), str(tmp_path / "stage"), storage_dtype="float32"
    )
    with pytest.raises(ValueError, match="model.layout_grid is 0"):
        layout_fit.layout_fit(
            config, stage, str(tmp_path / "x"), examples=8, steps=1, batch=4, lr=1e-3
        )

    config.model.layout_grid = 4
    result = layout_fit.layout_fit(
        config, stage, str(tmp_path / "fitted"), examples=40, steps=20, batch=8, lr=3e-3
    )
    assert result["val_mse"] < result["val_mse_before"]
    before = load_file(tmp_path / "stage" / "params.safetensors")
    after = load_file(tmp_path / "fitted" / "params.safetensors")
    grown = sorted(set(after) - set(before))
    assert grown and all(k.split("/")[0] in ("layout", "layout_in") for k in grown)
    for key in before:
        np.testing.assert_array_equal(after[key], before[key].astype(after[key].dtype))
    assert not np.any(after["layout_in/kernel"])  # read by the UNet only once trained

    old, new = stages.load_stage(stage), stages.load_stage(str(tmp_path / "fitted"))
    z = jax.random.normal(jax.random.key(0), (2, 16, 16, 3))
    cond = dict(
        text=jax.random.normal(jax.random.key(1), (2, 5, old.unet.text_dim)),
        text_mask=jnp.ones((2, 5), bool),
    )
    t = jnp.array([0.4, 0.9])
    np.testing.assert_allclose(new.model(z, t, cond), old.model(z, t, cond), atol=1e-5)
    assert new.model.layout_scale == 1.0
    gained = stages.load_stage(str(tmp_path / "fitted"), sample_overrides=dict(layout_scale=3.0))
    assert gained.model.layout_scale == 3.0
    with pytest.raises(
        ValueError, match=r"fitted: sample.layout_scale=-1.0: expected a number in \[0"
    ):
        stages.load_stage(str(tmp_path / "fitted"), sample_overrides=dict(layout_scale=-1.0))

    config.train.init_from = str(tmp_path / "fitted")
    _, metrics = train_and_evaluate(config, str(tmp_path / "on"))
    assert np.isfinite(metrics["layout_loss"]) and metrics["layout_loss"] > 0


def test_a_fitted_head_grows_self_attention_layers_and_fits_them(tmp_path):
    """model.layout_depth: a stage's head grows self-attention layers that start as the
    identity (the refit starts from the head's held-out error) and are fitted with it;
    nothing else changes, and the stage records the depth so sample.py builds it."""
    config = tiny(steps=2)
    config.model.layout_grid = 4
    train_and_evaluate(config, str(tmp_path / "run"))
    stage = export.export_stage(
        config, str(tmp_path / "run"), str(tmp_path / "stage"), storage_dtype="float32"
    )
    shallow = layout_fit.layout_fit(
        config, stage, str(tmp_path / "shallow"), examples=40, steps=20, batch=8, lr=3e-3
    )
    meta_path = tmp_path / "shallow" / "stage.json"
    meta = json.loads(meta_path.read_text())
    meta["sample"].update(layout_scale=1.5, steps=7)  # the stage's own sampling settings
    meta_path.write_text(json.dumps(meta))
    config.model.layout_depth = 2
    deeper = layout_fit.layout_fit(
        config,
        str(tmp_path / "shallow"),
        str(tmp_path / "deeper"),
        examples=40,
        steps=20,
        batch=8,
        lr=3e-3,
    )
    np.testing.assert_allclose(deeper["val_mse_before"], shallow["val_mse"], rtol=1e-4)
    before = load_file(tmp_path / "shallow" / "params.safetensors")
    after = load_file(tmp_path / "deeper" / "params.safetensors")
    grown = sorted(set(after) - set(before))
    assert grown and all(k.startswith("layout/refiner/") for k in grown)
    assert any(np.any(after[k]) for k in grown if k.startswith("layout/refiner/ff_out"))
    for key in before:
        if not key.startswith("layout/"):
            np.testing.assert_array_equal(after[key], before[key])
    loaded = stages.load_stage(str(tmp_path / "deeper"))
    assert loaded.unet.layout_depth == 2
    assert loaded.model.layout_scale == 1.5 and loaded.sample.steps == 7  # carried over
