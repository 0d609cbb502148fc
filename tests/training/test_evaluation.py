"""Periodic evaluation inside a runlocal training run: its metrics reach metrics.jsonl and
TensorBoard, its report and contact sheet are written, and its images are exactly what
sample.py's pipeline makes from the same EMA weights, prompts and seed."""

import json

import numpy as np
import pytest
from conftest import tiny
from PIL import Image
from test_smoke import read_scalars

from imagen_jax.pipelines import jobs, sampling
from imagen_jax.shapes.spec import TASKS
from imagen_jax.training import export, train_and_evaluate
from imagen_jax.training import periodic_eval as evaluation


def eval_config(**evals):
    config = tiny("shapes_base", steps=2)
    config.evals.every = 2
    config.evals.prompts_per_task = 1
    config.evals.batch_size = 4
    config.sample.steps = 3
    for key, value in evals.items():
        config.evals[key] = value
    return config


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    workdir = tmp_path_factory.mktemp("run")
    config = eval_config()
    train_and_evaluate(config, str(workdir))
    return config, workdir


def test_metrics_reach_jsonl_tensorboard_and_report(run):
    config, workdir = run
    lines = [json.loads(x) for x in (workdir / "metrics.jsonl").read_text().splitlines()]
    evals = [x for x in lines if "eval/compositional/heldout/overall" in x]
    assert [x["step"] for x in evals] == [2]
    names = {f"eval/compositional/heldout/{t}" for t in (*TASKS, "overall")}
    assert names <= set(evals[0])
    assert all(0.0 <= evals[0][n] <= 1.0 for n in names)
    tensorboard = read_scalars(workdir / "tensorboard")
    for name in names:
        assert tensorboard[name][2] == pytest.approx(evals[0][name])
    report = json.loads((workdir / "evals" / "step_00000002.json").read_text())
    assert report["num_images"] == len(TASKS)
    assert report["evaluators"][0]["name"] == "compositional"
    overall = report["metrics"]["compositional/heldout/overall"]
    assert overall == evals[0]["eval/compositional/heldout/overall"]
    sheet = np.asarray(Image.open(workdir / "evals" / "step_00000002.png"))
    res = config.model.resolution
    assert sheet.shape == (res, len(TASKS) * res, 3)


def test_images_equal_the_sampling_pipeline(run, tmp_path):
    """The evaluation's images are sample.py's images of the exported EMA weights."""
    config, workdir = run
    stage_dir = export.export_stage(
        config, str(workdir), str(tmp_path / "stage"), storage_dtype="float32"
    )
    sheet = np.asarray(Image.open(workdir / "evals" / "step_00000002.png"))
    cascade, _ = sampling.load_cascade([stage_dir])
    entries, _ = evaluation.eval_prompts(config.evals)
    items = jobs.plan(entries, 1)
    (images,) = cascade(items[:4], config.evals.seed)[-1:]
    res = config.model.resolution
    for i, image in enumerate(images):
        np.testing.assert_array_equal(image, sheet[:, i * res : (i + 1) * res])


def test_bad_evals_stop_before_training(tmp_path):
    config = tiny("shapes_sr", steps=2)
    config.evals.every = 1
    with pytest.raises(ValueError, match="super-resolution stage"):
        train_and_evaluate(config, str(tmp_path / "sr"))
    with pytest.raises(ValueError, match="shapes:train"):
        train_and_evaluate(eval_config(prompts="shapes:test"), str(tmp_path / "a"))
    with pytest.raises(FileNotFoundError, match="prompt file"):
        train_and_evaluate(eval_config(prompts=str(tmp_path / "none.txt")), str(tmp_path / "b"))
    assert not (tmp_path / "b" / "checkpoints").exists() or not any(
        (tmp_path / "b" / "checkpoints").iterdir()
    )
