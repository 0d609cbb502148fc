"""Checkpoints: an interrupted run resumes to the same weights (and metrics.jsonl holds each
step once), a run stopped by SIGTERM checkpoints its step and train.py exits 143, a
checkpoint restores onto another device count, and runs stop loudly on another model's
checkpoint or a NaN loss."""

import os
import shutil
import signal
import subprocess
import sys
import time

import jax
import numpy as np
import pytest
from conftest import (
    ROOT,
    Crash,
    assert_same_tree,
    checkpoint_steps,
    host_tree,
    logged_steps,
    patch_batches,
    tiny,
)
from safetensors.numpy import load_file, save_file

from imagen_jax import stages
from imagen_jax.training import (
    PREEMPTED_EXIT_CODE,
    CheckpointMismatchError,
    NonFiniteLossError,
    Preempted,
    checkpoint,
    export,
    train_and_evaluate,
)
from imagen_jax.training import state as state_lib


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """Three uninterrupted steps on 8 devices, checkpoints at steps 2 and 3."""
    workdir = tmp_path_factory.mktemp("reference")
    state, _ = train_and_evaluate(tiny(steps=3, checkpoint_every=2), str(workdir))
    return workdir, state


def test_resumed_run_matches_uninterrupted_run(reference, tmp_path, monkeypatch):
    config = tiny(steps=3, checkpoint_every=2)

    def crash(batch):
        raise Crash

    with monkeypatch.context() as m:
        patch_batches(m, 3, crash)  # dies while fetching step 3's batch
        with pytest.raises(Crash):
            train_and_evaluate(config, str(tmp_path))
    assert checkpoint_steps(tmp_path) == [2]
    # As if killed (kill -9) after logging steps past the checkpoint, in the middle of a line:
    # the resumed run logs those steps again, each once.
    with open(tmp_path / "metrics.jsonl", "a") as f:
        f.write('{"step": 3, "loss": 9.0}\n{"step": 4, "loss": 9.0}\n{"step": 5, "lo')
    state, metrics = train_and_evaluate(config, str(tmp_path))
    assert_same_tree(state, reference[1])  # params, EMA, optimizer state, step, key: bitwise
    assert logged_steps(tmp_path) == [1, 2, 3]
    assert metrics["loss"] != 9.0

    # The reference run's checkpoint 2 was saved asynchronously just before step 3
    # donated the state's buffers: it resumes to the same weights too.
    resumed = tmp_path / "from_reference"
    shutil.copytree(reference[0] / "checkpoints" / "2", resumed / "checkpoints" / "2")
    state, _ = train_and_evaluate(config, str(resumed))
    assert_same_tree(state, reference[1])


def test_sigterm_checkpoints_the_step_and_resumes_to_the_same_weights(
    reference, tmp_path, monkeypatch
):
    config = tiny(steps=3, checkpoint_every=2)

    def sigterm(batch):
        os.kill(os.getpid(), signal.SIGTERM)  # as a scheduler's preemption or `timeout` would
        return batch

    previous = signal.getsignal(signal.SIGTERM)
    with monkeypatch.context() as m:
        patch_batches(m, 1, sigterm)  # arrives while step 1's batch is prepared
        with pytest.raises(Preempted, match="after step 1") as stopped:
            train_and_evaluate(config, str(tmp_path))
    assert signal.getsignal(signal.SIGTERM) is previous  # the handler is put back
    assert stopped.value.step == 1 and stopped.value.signum == signal.SIGTERM
    assert int(stopped.value.state.step) == 1 and np.isfinite(stopped.value.metrics["loss"])
    assert checkpoint_steps(tmp_path) == [1]  # saved off the checkpoint_every grid
    state, _ = train_and_evaluate(config, str(tmp_path))
    assert_same_tree(state, reference[1])


def test_sigterm_on_the_last_step_finishes_the_run(tmp_path, monkeypatch):
    """A signal that arrives with the last step taken stops nothing: the run is complete."""

    def sigterm(batch):
        os.kill(os.getpid(), signal.SIGTERM)
        return batch

    patch_batches(monkeypatch, 2, sigterm)  # arrives while step 2 (the last) is prepared
    state, _ = train_and_evaluate(tiny(steps=2), str(tmp_path))
    assert int(state.step) == 2 and checkpoint_steps(tmp_path) == [2]


def _train_py(workdir, *overrides) -> list[str]:
    return [
        sys.executable,
        str(ROOT / "train.py"),
        "--config=configs/shapes_base.py:runlocal",
        f"--workdir={workdir}",
        "--config.train.log_every=1",
        "--config.train.sample_every=0",
        "--config.train.progress=False",
        *overrides,
    ]


def _subprocess_env() -> dict:
    """The test's environment (8 CPU devices), with its compilation cache."""
    env = dict(os.environ)
    env["JAX_COMPILATION_CACHE_DIR"] = jax.config.jax_compilation_cache_dir
    env["JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS"] = "0"
    env["JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES"] = "0"
    env["JAX_COMPILATION_CACHE_MAX_SIZE"] = str(jax.config.jax_compilation_cache_max_size)
    return env


def test_train_py_exits_143_when_sigterm_stops_it_and_0_once_resumed_to_the_end(tmp_path):
    """A scheduler's SIGTERM after the first step: train.py checkpoints the step it stopped
    at and exits 143 (a preemption, to requeue); the same command resumes, and a run that
    reaches train.steps exits 0."""
    workdir, log = tmp_path / "run", tmp_path / "log.txt"
    env = _subprocess_env()
    with open(log, "w") as out:
        proc = subprocess.Popen(
            _train_py(workdir, "--config.train.steps=1000", "--config.train.checkpoint_every=1000"),
            cwd=ROOT,
            env=env,
            stdout=out,
            stderr=subprocess.STDOUT,
        )
        try:
            deadline = time.monotonic() + 300
            metrics = workdir / "metrics.jsonl"
            while not metrics.exists() or "\n" not in metrics.read_text():  # a whole line
                assert proc.poll() is None, log.read_text()[-4000:]
                assert time.monotonic() < deadline, "no step logged in 300 s"
                time.sleep(0.2)
            proc.send_signal(signal.SIGTERM)
            code = proc.wait(timeout=120)
        finally:
            proc.kill()
    assert code == PREEMPTED_EXIT_CODE == 143, log.read_text()[-4000:]
    stopped = logged_steps(workdir)[-1]
    assert 1 <= stopped < 1000 and checkpoint_steps(workdir) == [stopped]
    assert f"after step {stopped}" in log.read_text()

    steps = f"--config.train.steps={stopped + 1}"  # resume for one more step, to the end
    rerun = subprocess.run(
        _train_py(workdir, steps), cwd=ROOT, env=env, capture_output=True, text=True, timeout=300
    )
    assert rerun.returncode == 0, rerun.stderr[-4000:]
    assert f"Resumed from {workdir / 'checkpoints'}/{stopped}" in rerun.stderr
    assert checkpoint_steps(workdir)[-1] == stopped + 1
    assert logged_steps(workdir) == list(range(1, stopped + 2))


@pytest.mark.parametrize("mesh", [[("data", 1)], [("data", 4), ("fsdp", 2)]])
def test_checkpoint_restores_onto_another_mesh(reference, mesh, tmp_path):
    workdir, saved = reference
    shutil.copytree(workdir / "checkpoints", tmp_path / "checkpoints")
    state, _ = train_and_evaluate(tiny(steps=3, mesh=mesh, fsdp_min_size=0), str(tmp_path))
    kernel = state.params["conv_in"]["kernel"]
    if mesh == [("data", 1)]:
        assert kernel.sharding.device_set == {jax.devices()[0]}
    else:
        assert "fsdp" in tuple(kernel.sharding.spec)
    assert_same_tree(state, saved)


def test_new_run_starts_from_an_exported_stage(reference, tmp_path):
    stage = export.export_stage(
        tiny(steps=3), str(reference[0]), str(tmp_path / "stage"), storage_dtype="float32"
    )
    # Weights far from any initialisation: every parameter of the run's EMA, plus 0.5.
    file = tmp_path / "stage" / "params.safetensors"
    weights = {k: v + 0.5 for k, v in load_file(file).items()}
    save_file(weights, file)
    config = tiny(steps=1)
    config.train.init_from = stage
    state, _ = train_and_evaluate(config, str(tmp_path / "run"))

    def largest_gap(tree):
        got = stages.flatten(host_tree(tree))
        assert got.keys() == weights.keys()
        return max(float(np.abs(got[k] - weights[k]).max()) for k in weights)

    lr = config.optim.lr  # one AdamW step moves a weight by at most about the learning rate
    assert largest_gap(state.params) <= 1.5 * lr
    assert largest_gap(state.ema_params) <= 1.5 * lr
    assert int(state.step) == 1  # a new run: step and optimizer start afresh
    fresh, _ = train_and_evaluate(tiny(steps=1), str(tmp_path / "fresh"))
    assert largest_gap(fresh.params) > 0.4


def test_init_from_a_stage_that_does_not_fit_stops_the_run(reference, tmp_path):
    stage = export.export_stage(tiny(steps=3), str(reference[0]), str(tmp_path / "stage"))
    config = tiny(steps=1)
    config.model.channels = 8
    config.train.init_from = stage
    with pytest.raises(
        ValueError,
        match=r"(?s)do not fit.*conv_in/kernel: file \(3, 3, 3, 16\), config \(3, 3, 3, 8\)"
        r".*and \d+ more",
    ):
        train_and_evaluate(config, str(tmp_path / "run"))
    config.train.init_from = str(tmp_path)
    with pytest.raises(FileNotFoundError, match="is not a stage directory"):
        train_and_evaluate(config, str(tmp_path / "run2"))


def test_another_models_checkpoint_stops_the_run(reference, tmp_path):
    shutil.copytree(reference[0] / "checkpoints", tmp_path / "checkpoints")
    config = tiny(steps=3)
    config.model.channels = 8
    with pytest.raises(CheckpointMismatchError, match=r"channels: checkpoint 16, config 8"):
        train_and_evaluate(config, str(tmp_path))


def test_resuming_with_other_training_settings_stops_unless_allowed(reference, tmp_path):
    """A checkpoint records its recipe: resuming with another loss setting stops with the key
    named, before anything is restored or saved; the same resume goes on once
    train.allow_changes names the key's group, and a longer train.steps needs no leave."""
    shutil.copytree(reference[0] / "checkpoints", tmp_path / "checkpoints")
    config = tiny(steps=4)
    config.train.loss.weighting = "uniform"
    with pytest.raises(
        CheckpointMismatchError,
        match=r'(?s)other settings.*train\.loss\.weighting: "min_snr" -> "uniform"',
    ):
        train_and_evaluate(config, str(tmp_path))
    assert checkpoint_steps(tmp_path) == [2, 3]
    config.train.allow_changes = "data.seed, train.loss"
    state, _ = train_and_evaluate(config, str(tmp_path))
    assert int(state.step) == 4


def test_a_recipe_key_only_one_side_has_is_a_difference():
    """An auxiliary loss added on resume is a change of recipe like any other; the recipe
    leaves out what may change (the length, the model, sampling)."""
    saved = checkpoint.recipe(tiny())
    assert "optim.lr" in saved and "train.steps" not in saved
    assert not any(key.startswith(("model.", "sample.")) for key in saved)
    grown = {**saved, "train.aux_losses.extra.weight": 0.5}
    assert checkpoint.describe_recipe_changes(saved, grown) == [
        "train.aux_losses.extra.weight: (absent) -> 0.5"
    ]
    assert checkpoint.describe_recipe_changes(saved, grown, ("train.aux_losses",)) == []


def test_nan_loss_stops_before_saving(tmp_path, monkeypatch):
    nan_text = lambda batch: dict(batch, text=batch["text"] * np.nan)  # noqa: E731
    patch_batches(monkeypatch, 3, nan_text)
    with pytest.raises(NonFiniteLossError, match=r"step 3: loss=nan.*checkpoint is step 2"):
        train_and_evaluate(tiny(steps=3, checkpoint_every=2), str(tmp_path))
    assert checkpoint_steps(tmp_path) == [2]


def test_init_from_grows_zero_positional_embeddings(reference, tmp_path):
    """A stage trained without `model.pos_emb` starts a run with it: every other weight is
    the stage's, the positional projections start at zero."""
    stage = export.export_stage(
        tiny(steps=3), str(reference[0]), str(tmp_path / "stage"), storage_dtype="float32"
    )
    weights = load_file(tmp_path / "stage" / "params.safetensors")
    config = tiny(steps=1)
    config.model.pos_emb = True
    config.train.init_from = stage
    state, _ = train_and_evaluate(config, str(tmp_path / "run"))
    got = stages.flatten(host_tree(state.params))
    grown = sorted(set(got) - set(weights))
    assert grown and all(key.split("/")[-2] == "pos" for key in grown)
    lr = config.optim.lr
    assert max(float(np.abs(got[k]).max()) for k in grown) <= 1.5 * lr
    assert max(float(np.abs(got[k] - weights[k]).max()) for k in weights) <= 1.5 * lr


def test_init_from_grows_a_fresh_text_refiner(reference, tmp_path):
    """A stage trained without `model.text_refiner` starts a run with one: the refiner's
    inner weights are the run's fresh initialisation (not zeros, which would leave it no
    gradient), its output projections start at zero, every other weight is the stage's."""
    stage = export.export_stage(
        tiny(steps=3), str(reference[0]), str(tmp_path / "stage"), storage_dtype="float32"
    )
    weights = load_file(tmp_path / "stage" / "params.safetensors")
    config = tiny(steps=1)
    config.model.text_refiner = 1
    config.train.init_from = stage
    state, _ = train_and_evaluate(config, str(tmp_path / "run"))
    got = stages.flatten(host_tree(state.params))
    grown = sorted(set(got) - set(weights))
    assert grown and all(key.startswith("text_refiner/") for key in grown)
    lr = config.optim.lr
    assert float(np.abs(got["text_refiner/attn/0/q/kernel"]).std()) > 10 * lr
    assert float(np.abs(got["text_refiner/ff_out/0/kernel"]).max()) <= 1.5 * lr
    assert max(float(np.abs(got[k] - weights[k]).max()) for k in weights) <= 1.5 * lr


def test_a_config_field_added_since_the_checkpoint_agrees_at_its_default():
    """A run checkpointed before a UNet field existed resumes (and exports) while the config
    leaves the field at its default, and not once it sets it."""
    net = state_lib.make_network(tiny().model)
    current = checkpoint.model_signature(net)
    saved = {**current, "unet": {k: v for k, v in current["unet"].items() if k != "layout_grid"}}
    assert checkpoint.describe_mismatch(saved, current) == []
    config = tiny()
    config.model.layout_grid = 4
    grown = checkpoint.model_signature(state_lib.make_network(config.model))
    diffs = checkpoint.describe_mismatch(saved, grown)
    assert diffs[0] == "layout_grid: checkpoint None, config 4"
    assert any(d.startswith("parameter layout/") for d in diffs)
