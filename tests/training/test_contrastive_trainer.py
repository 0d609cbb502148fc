"""The contrastive trainer (configs/shapes_embedding.py:runlocal through train_and_evaluate,
8 simulated devices): the loss falls, the periodic embedding evaluation runs on the EMA
weights, a killed run resumes to the uninterrupted run's state bit for bit, the export loads
strictly with the EMA weights; hard negatives with a frozen image tower (no gradient, no
optimizer state for it); a trained SigLIP text tower exports as a SiglipModel directory;
settings that cannot work together stop in one line."""

import json

import jax
import numpy as np
import pytest
from conftest import (
    Crash,
    assert_same_tree,
    checkpoint_steps,
    crash,
    logged_steps,
    patch_batches,
    stage_config,
)
from safetensors.numpy import load_file

from imagen_jax.config_utils import ConfigError
from imagen_jax.evaluation import retrieval
from imagen_jax.models import two_towers
from imagen_jax.pipelines import embedding
from imagen_jax.training import contrastive_step, loop, train_and_evaluate
from imagen_jax.training import state as state_lib
from imagen_jax.training.contrastive_trainer import EXPORT_DIR

STEPS = 6


def _config(arg="runlocal", **train):
    config = stage_config("shapes_embedding", arg, steps=STEPS, log_every=1, checkpoint_every=3)
    config.evals.every = STEPS
    config.evals.size = 6
    config.evals.splits = ("heldout",)
    for key, value in train.items():
        config.train[key] = value
    return config


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """An uninterrupted runlocal run: checkpoints at 3 and 6, an evaluation at 6, the export."""
    workdir = tmp_path_factory.mktemp("embedding")
    state, metrics = train_and_evaluate(_config(), str(workdir))
    return workdir, state, metrics


def test_trains_and_evaluates(reference):
    workdir, state, metrics = reference
    assert int(state.step) == STEPS
    lines = [json.loads(line) for line in (workdir / "metrics.jsonl").read_text().splitlines()]
    losses = [line["loss"] for line in lines if "loss" in line]
    assert len(losses) == STEPS and losses[-1] < losses[0] - 1.0, losses
    names = {f"eval/{k}" for k in ("zero_shot/heldout/color", "retrieval/heldout/i2t_r1")}
    names.add("eval/hard_negatives/heldout/overall")
    assert names <= set(metrics) and names <= set(lines[-1])
    report = json.loads((workdir / "evals" / f"step_{STEPS:08d}.json").read_text())
    assert report["metrics"]["hard_negatives/heldout/overall"] == pytest.approx(
        metrics["eval/hard_negatives/heldout/overall"]
    )


def test_killed_run_resumes_to_the_same_state(reference, tmp_path, monkeypatch):
    config = _config()
    config.evals.every = 0
    with monkeypatch.context() as m:
        patch_batches(m, 5, crash)  # dies while fetching step 5's batch
        with pytest.raises(Crash):
            train_and_evaluate(config, str(tmp_path))
    assert checkpoint_steps(tmp_path) == [3]
    state, _ = train_and_evaluate(config, str(tmp_path))
    assert_same_tree(state, reference[1])  # params, EMA, optimizer state, step, key: bitwise
    assert logged_steps(tmp_path) == list(range(1, STEPS + 1))


def test_export_holds_the_ema_weights_and_embeds(reference):
    workdir, state, _ = reference
    export = workdir / EXPORT_DIR
    tensors = load_file(export / "model.safetensors")
    ema = np.asarray(state.ema_params["text_projection"]["kernel"])
    np.testing.assert_array_equal(tensors["text_projection/kernel"], ema.astype(np.float16))
    assert tensors["logit_scale"].dtype == np.float32
    embedder = embedding.load_embedder(export, batch_size=4)
    items = retrieval.shapes_items("heldout", 5, resolution=16)
    images = embedder.embed_images([it.image for it in items])
    texts = embedder.embed_texts([it.caption for it in items])
    assert images.shape == texts.shape == (5, 32)
    np.testing.assert_allclose(np.linalg.norm(texts, axis=1), 1.0, rtol=1e-5)


def test_hard_negatives_with_a_frozen_image_tower(tmp_path):
    config = _config("runlocal,hard_negatives,loss=clip,frozen_tower=image", steps=2)
    config.evals.every = 0
    assert config.data.counterfactuals and config.contrastive.loss == "softmax"
    state, metrics = train_and_evaluate(config, str(tmp_path))
    net = state_lib.make_network(config.model)
    mesh = loop.make_mesh(config)
    with jax.set_mesh(mesh):  # the run's initial state: the same program, the same values
        tx, _ = contrastive_step.make_optimizer(config, net)
        fresh = state_lib.create_train_state(config, net, tx, mesh)[0].params
    assert_same_tree(state.params["vision_model"], fresh["vision_model"])  # never moved
    moved = np.asarray(state.params["visual_projection"]["kernel"])
    assert not np.array_equal(moved, np.asarray(fresh["visual_projection"]["kernel"]))
    # Adam's two moments for the trainable parameters only.
    size = lambda tree: sum(x.size for x in jax.tree.leaves(tree))  # noqa: E731
    trainable = size(state.params) - size(state.params["vision_model"])
    assert 2 * trainable <= size(state.opt_state) < 2 * trainable + 16
    assert np.isfinite(metrics["loss"])


def test_trained_text_tower_exports_a_siglip_model(tmp_path):
    config = _config("runlocal,text_side=tower", steps=2)
    config.evals.every = 0
    train_and_evaluate(config, str(tmp_path))
    model = two_towers.load_siglip(tmp_path / EXPORT_DIR)
    assert model.text_model.config.family == "siglip"
    embedder = embedding.load_embedder(tmp_path / EXPORT_DIR, batch_size=2)
    assert embedder.embed_texts(["a red circle", "two blue stars"]).shape == (2, 32)


@pytest.mark.parametrize(
    ("arg", "override", "message"),
    [
        ("runlocal,hard_negatives", {"data.counterfactuals": ""}, "needs model.text_side"),
        ("runlocal", {"model.logit_bias": False}, "the sigmoid loss needs the learnable bias"),
        ("runlocal,frozen_tower=text", {}, "that text side is a frozen encoder already"),
        ("runlocal", {"train.sample_every": 5}, "an embedding model has no sample grid"),
    ],
)
def test_settings_that_cannot_work_stop_in_one_line(tmp_path, arg, override, message):
    config = _config(arg)
    for key, value in override.items():
        group, name = key.split(".")
        config[group][name] = value
    with pytest.raises(ConfigError, match=message) as e:
        train_and_evaluate(config, str(tmp_path))
    assert "\n" not in str(e.value)


def test_a_trained_text_tower_needs_a_vit_image_tower():
    config = stage_config("shapes_embedding", "text_side=tower")  # tower=conv by default
    with pytest.raises(ValueError, match="has a 'conv' image tower"):
        state_lib.make_network(config.model)
