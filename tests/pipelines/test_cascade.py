"""The cascade pipeline and sample.py's job on tiny random stages (`stage_dirs`,
conftest.py)."""

import json
import os

import jax
import numpy as np
import pytest

from imagen_jax import stages
from imagen_jax.pipelines import jobs, sampling
from imagen_jax.weights import CheckpointError


def _job(stage_dirs, outdir, batch_size, prompts=("a red circle", "two blue squares", "")):
    return sampling.run_sampling_job(
        stages=stage_dirs,
        prompts=list(prompts),
        prompts_file=None,
        negative_prompt="",
        images_per_prompt=2,
        seed=5,
        batch_size=batch_size,
        outdir=str(outdir),
        overrides=[],
        grid=True,
    )


def _images(outdir):
    folder = os.path.join(outdir, "images")
    return {
        n: np.asarray(__import__("PIL.Image").Image.open(os.path.join(folder, n)))
        for n in sorted(os.listdir(folder))
    }


def test_images_do_not_depend_on_batching_and_jobs_resume(stage_dirs, tmp_path):
    a, b = tmp_path / "a", tmp_path / "b"
    summary = _job(stage_dirs, a, batch_size=4)
    assert summary["made"] == 6
    _job(stage_dirs, b, batch_size=1)
    images_a, images_b = _images(a), _images(b)
    assert list(images_a) == list(images_b) and len(images_a) == 6
    for name in images_a:
        assert images_a[name].shape == (16, 16, 3)
        diff = np.abs(images_a[name].astype(int) - images_b[name].astype(int)).max()
        assert diff <= 1, f"{name} differs by {diff}/255 between batch sizes 4 and 1"
    assert not np.array_equal(images_a["000000_000.png"], images_a["000000_001.png"])
    # Kill-and-restart: a missing image is made again, identical; the rest are skipped.
    os.remove(a / "images" / "000001_001.png")
    summary = _job(stage_dirs, a, batch_size=4)
    assert (summary["made"], summary["skipped"]) == (1, 5)
    np.testing.assert_array_equal(_images(a)["000001_001.png"], images_a["000001_001.png"])
    with open(a / "manifest.jsonl") as f:
        records = [json.loads(line) for line in f]
    assert [r["prompt"] for r in records][:2] == ["a red circle"] * 2
    assert records[0]["stages"][1]["aug_level"] == 0.1 and os.path.exists(a / "grid.png")


def test_sample_overrides_and_bad_input(stage_dirs, tmp_path):
    assert jobs.parse_overrides(["1.steps=7", "0.sampler=ddim"], 2) == [
        {"sampler": "ddim"},
        {"steps": 7},
    ]
    with pytest.raises(ValueError, match="unknown sample key 'stpes'"):
        jobs.parse_overrides(["0.stpes=3"], 2)
    with pytest.raises(ValueError, match="STAGE < 2"):
        jobs.parse_overrides(["2.steps=3"], 2)
    assert jobs.parse_overrides(["1.aug_level=0.25"], 2, sampling.STAGE_KEYS) == [
        {},
        {"aug_level": 0.25},
    ]
    with pytest.raises(ValueError, match="unknown sample key 'aug_level'"):
        jobs.parse_overrides(["1.aug_level=0.25"], 2)  # public pipelines have none
    assert stages.load_stage(stage_dirs[1], aug_level=0.3).settings()["aug_level"] == 0.3
    with pytest.raises(ValueError, match="is a base stage"):
        sampling.load_cascade(stage_dirs, ["0.aug_level=0.2"])
    with pytest.raises(ValueError, match=r"aug_level=1.5: expected a unit time in \[0, 1\]"):
        sampling.load_cascade(stage_dirs, ["1.aug_level=1.5"])
    with pytest.raises(ValueError, match="is a super-resolution stage"):
        sampling.load_cascade(stage_dirs[1:])
    with pytest.raises(FileNotFoundError, match="not a stage directory"):
        stages.load_stage(str(tmp_path))
    # Weights that do not fit the config: every mismatch is named.
    meta_path = os.path.join(stage_dirs[0], "stage.json")
    bad = tmp_path / "bad"
    bad.mkdir()
    with open(meta_path) as f:
        meta = json.load(f)
    meta["unet"]["channels"] = 8
    (bad / "stage.json").write_text(json.dumps(meta))
    os.symlink(os.path.join(stage_dirs[0], "params.safetensors"), bad / "params.safetensors")
    with pytest.raises(ValueError, match="do not fit its UNet config"):
        stages.load_stage(str(bad))
    # A truncated weights file and a corrupt stage.json name the file.
    meta["unet"]["channels"] = stages.load_stage(stage_dirs[0]).unet.channels
    (bad / "stage.json").write_text(json.dumps(meta))
    os.remove(bad / "params.safetensors")
    with open(os.path.join(stage_dirs[0], "params.safetensors"), "rb") as f:
        (bad / "params.safetensors").write_bytes(f.read()[:1000])
    with pytest.raises(CheckpointError, match=r"bad/params.safetensors is not a readable"):
        stages.load_stage(str(bad))
    (bad / "stage.json").write_text('{"unet": ')
    with pytest.raises(CheckpointError, match=r"bad/stage.json is not valid JSON"):
        stages.load_stage(str(bad))
    with pytest.raises(ValueError, match=r"--set='0.steps=abc': steps takes int values"):
        jobs.parse_overrides(["0.steps=abc"], 2)
    with pytest.raises(ValueError, match=r"--set='0.karras=maybe': karras takes true/false"):
        jobs.parse_overrides(["0.karras=maybe"], 2)
    with pytest.raises(ValueError, match=r"sample.guidance_scale=-2.0: expected a number in"):
        sampling.load_cascade(stage_dirs, ["0.guidance_scale=-2"])


def test_eight_devices_make_the_images_of_one(stage_dirs):
    """The batch split over 8 devices gives the images of one device."""
    cascade, _ = sampling.load_cascade(stage_dirs)
    items = jobs.plan([jobs.PromptEntry("a red circle"), jobs.PromptEntry("a blue star")], 4)
    single = cascade(items, seed=3)[-1]
    cascade.mesh = jax.make_mesh((8,), ("data",))
    sharded = cascade(items, seed=3)[-1]
    diff = np.abs(single.astype(int) - sharded.astype(int)).max()
    assert diff <= 1, f"8 devices differ from 1 by {diff}/255"
