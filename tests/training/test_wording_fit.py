"""`python -m imagen_jax.proj.shapes.wording_fit`: a stage grows a token refiner, fitted so
that its UNet's prediction from a caption in the training wordings comes nearer its
prediction from the grammar's caption of the same scene; nothing else moves."""

import json

import numpy as np
import pytest
from conftest import tiny
from flax import nnx
from safetensors.numpy import load_file, save_file
from tiny_stages import random_params

from imagen_jax import stages, training
from imagen_jax.diffusion.config import make_schedule
from imagen_jax.proj.shapes import text_probe, wording_fit
from imagen_jax.shapes import parse_prompt
from imagen_jax.shapes.spec import COLORS, SHAPES
from imagen_jax.text.config import text_config
from imagen_jax.training import export, state, train_and_evaluate


def _shapes_data(wordings="train", size=96, **kw):
    return training.data_config(
        source="shapes", resolution=16, size=size, batch_size=8, wordings=wordings, **kw
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


_COLOR_ATTR_ONLY = "single_object:0,two_object:0,counting:0,colors:0,position:0"


def _minilm_colour_attribution(config, size):
    """`config` read by MiniLM (a tokenizer: binding labels need one), its data colour
    attribution only (a task left out of task_weights weighs 1)."""
    config.text = text_config(kind="minilm", path="", max_length=32)
    config.model.text_dim = 384
    config.data = _shapes_data(size=size, task_weights=_COLOR_ATTR_ONLY)
    return config


def test_binding_labels_name_each_shape_noun_and_the_colour_the_caption_gives_it():
    config = _minilm_colour_attribution(tiny(), size=64)
    data = wording_fit.Paraphrases(config, batch_size=8)
    captions = [data.captions(i)[0] for i in range(24)]
    sites, colors = data.binding_labels(range(24), captions)
    ids = np.asarray(data.encoder.tokenizer(captions)[0])
    names = list(COLORS)
    shape_of = {text_probe.word_id(data.encoder, shape): shape for shape in SHAPES}
    assert (sites >= 0).sum() >= 24  # most nouns are labelled (not: the same shape twice)
    for row, caption in enumerate(captions):
        bound = {o.shape: o.color for o in parse_prompt(caption).objects}
        for site, color in zip(sites[row], colors[row], strict=True):
            if site < 0:
                continue
            word = shape_of[int(ids[row, site])]
            assert bound[word] == names[color], (caption, word, names[color])


def test_the_binding_term_alone_puts_the_colour_in_the_refined_noun():
    """A freshly initialised stage's prediction ignores the caption (its output layers are
    zero), so the distillation term is zero and only the binding term moves the refiner: the
    grammar reader then reads the bound colour from the refined noun tokens of the records
    it was fitted on, which it read much less well from the frozen ones."""
    config = _minilm_colour_attribution(tiny(), size=96)
    config.model.text_refiner = 2
    model = state.make_network(config.model).build(nnx.Rngs(0))
    data = wording_fit.Paraphrases(config, batch_size=16, binding=True)
    reader = wording_fit.grammar_reader(model, data.encoder, prompts=500)
    fitted = [data.batch(range(start, start + 16)) for start in range(0, 80, 16)]
    before = wording_fit.binding_accuracy(model, fitted, reader)
    options = dict(steps=60, batch=16, lr=3e-3, min_time=0.3, val=16, binding_weight=1.0)
    options["reader_prompts"] = 500  # the fit holds the reader fitted above
    schedule = make_schedule(config.diffusion)
    result = wording_fit.fit_refiner(model, data, schedule=schedule, **options)
    assert result["val_loss"] == result["val_loss_before"] == 0.0  # no distillation signal
    after = wording_fit.binding_accuracy(model, fitted, reader)
    assert before < 0.8 and after > 0.9, (before, after)


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
