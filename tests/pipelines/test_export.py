"""Train -> export -> sample: a run's checkpoint becomes a stage that sample.py reads."""

import json
import os

import pytest

from configs import shapes_base
from imagen_jax import files, stages, training
from imagen_jax.pipelines import sampling
from imagen_jax.training import export


def test_exported_run_samples(tmp_path):
    config = shapes_base.get_config("runlocal")
    config.train.steps = 2
    config.train.sample_every = 0
    workdir, stage_dir = str(tmp_path / "run"), str(tmp_path / "stage")
    training.train_and_evaluate(config, workdir)
    export.export_stage(config, workdir, stage_dir, storage_dtype="float32")
    stage = stages.load_stage(stage_dir)
    assert stage.identity == {"workdir": workdir, "step": 2}
    assert stage.resolution == config.model.resolution
    summary = sampling.run_sampling_job(
        stages=[stage_dir],
        prompts=["a red circle"],
        prompts_file=None,
        negative_prompt="",
        images_per_prompt=1,
        seed=0,
        batch_size=1,
        outdir=str(tmp_path / "out"),
        overrides=["0.steps=2"],
        grid=False,
    )
    assert summary["made"] == 1
    with open(tmp_path / "out" / "manifest.jsonl") as f:
        record = json.loads(f.readline())
    # The images record the weights' hash, not the workdir they were exported from.
    weights = os.path.join(stage_dir, "params.safetensors")
    assert record["stages"][0]["weights_sha256"] == files.file_sha256(weights)
    assert workdir not in json.dumps(record)


def test_export_of_an_empty_workdir_raises(tmp_path):
    config = shapes_base.get_config("runlocal")
    with pytest.raises(FileNotFoundError, match="holds no checkpoint"):
        export.export_stage(config, str(tmp_path), str(tmp_path / "stage"))
    assert not os.path.exists(tmp_path / "stage")
