"""`python -m imagen_jax.proj.shapes.wording_fit`: a stage grows a token refiner, fitted so
that its UNet's prediction from a caption in the training wordings comes nearer its
prediction from the grammar's caption of the same scene; nothing else moves."""

import json

import numpy as np
import pytest
from conftest import tiny
from safetensors.numpy import load_file, save_file
from tiny_stages import random_params

from imagen_jax import stages, training
from imagen_jax.proj.shapes import wording_fit
from imagen_jax.shapes import parse_prompt
from imagen_jax.training import export, train_and_evaluate


def _shapes_data(wordings="train"):
    return training.data_config(
        source="shapes", resolution=16, size=96, batch_size=8, wordings=wordings
    )


def test_record_i_is_one_scene_worded_twice():
    config = tiny()
    config.data = _shapes_data()
    data = wording_fit.Paraphrases(config, batch_size=8)
    worded = 0
    for i in range(12):
        caption, grammar = data.captions(i)
        assert parse_prompt(caption).canonical() == parse_prompt(grammar).canonical(), i
        worded += caption != grammar
    assert worded >= 6  # most training-wording captions are not the grammar's
    batch = data.batch([3, 5])
    np.testing.assert_array_equal(batch["x0"][1], data.batch([5])["x0"][0])
    assert batch["text"].shape == batch["teacher_text"].shape

    config.data = _shapes_data(wordings="grammar")
    with pytest.raises(ValueError, match="wordings is 'grammar'"):
        wording_fit.Paraphrases(config, batch_size=8)


def test_a_fitted_refiner_brings_the_wordings_nearer_and_nothing_else_moves(tmp_path):
    config = tiny(steps=1)
    train_and_evaluate(config, str(tmp_path / "run"))
    stage = export.export_stage(
        config, str(tmp_path / "run"), str(tmp_path / "stage"), storage_dtype="float32"
    )
    # Random weights everywhere (a one-step run's output layers are still zero, so its
    # prediction does not depend on the caption at all).
    file = tmp_path / "stage" / "params.safetensors"
    unet = stages.load_stage(stage).unet
    drawn = {k: np.float32(v) for k, v in stages.flatten(random_params(unet, seed=0)).items()}
    assert drawn.keys() == load_file(file).keys()
    save_file(drawn, file)
    config.data = _shapes_data()
    options = dict(steps=30, batch=8, lr=3e-3, min_time=0.3, val=16)
    with pytest.raises(ValueError, match="text_refiner is 0"):
        wording_fit.wording_fit(config, stage, str(tmp_path / "x"), **options)

    config.model.text_refiner = 2
    result = wording_fit.wording_fit(config, stage, str(tmp_path / "fitted"), **options)
    assert 0 < result["val_loss"] < result["val_loss_before"], result
    before = load_file(tmp_path / "stage" / "params.safetensors")
    after = load_file(tmp_path / "fitted" / "params.safetensors")
    grown = sorted(set(after) - set(before))
    assert grown and all(k.startswith("text_refiner/") for k in grown)
    for key in before:
        np.testing.assert_array_equal(after[key], before[key].astype(after[key].dtype))
    meta = json.loads((tmp_path / "fitted" / "stage.json").read_text())
    assert meta["identity"]["wording_fit"]["steps"] == 30
    assert stages.load_stage(str(tmp_path / "fitted")).unet.text_refiner == 2
