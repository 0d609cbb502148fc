"""sample.py's job (`sampling.run_sampling_job`, `jobs.run_job`): output checks before any
model loads, one compilation per stage for a whole job, non-square sizes, prompts cut to the
encoder's token limit."""

import json
import logging
import os
import re
import types

import jax
import numpy as np
import pytest
from PIL import Image

from imagen_jax import stages
from imagen_jax.pipelines import cascade as cascade_lib
from imagen_jax.pipelines import jobs, sampling

TRACE_EVENT = "/jax/core/compile/jaxpr_trace_duration"  # jax records one per traced jit call


def _main(stage_dirs, outdir, **kw):
    args = dict(
        stages=stage_dirs,
        prompts=["a red circle"],
        prompts_file=None,
        negative_prompt="",
        images_per_prompt=1,
        seed=0,
        batch_size=2,
        outdir=str(outdir),
        overrides=[],
        grid=False,
    )
    return sampling.run_sampling_job(**{**args, **kw})


def _refuse_to_load(*args, **kwargs):
    raise AssertionError("a model was loaded before the output directory was checked")


@pytest.mark.parametrize("kind", ["file", "under_a_file", "read_only"])
def test_unusable_outdir_fails_before_any_model_loads(tmp_path, monkeypatch, capsys, kind):
    if kind == "read_only" and os.geteuid() == 0:
        pytest.skip("root writes to read-only directories")
    monkeypatch.setattr(sampling, "load_cascade", _refuse_to_load)
    monkeypatch.setattr(stages, "load_stage", _refuse_to_load)
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a red circle\n\ntwo blue squares\n\n\na star\n")
    file = tmp_path / "taken"
    file.write_text("")
    outdir = {"file": file, "under_a_file": file / "out", "read_only": tmp_path / "ro"}[kind]
    if kind == "read_only":
        outdir.mkdir(mode=0o500)
    error = NotADirectoryError if kind == "file" else OSError
    with pytest.raises(error, match=re.escape(f"output directory '{outdir}'")):
        _main(["/no/such/stage"], outdir, prompts=[], prompts_file=str(prompts))
    assert f"3 prompts read from {prompts}" in capsys.readouterr().out


def test_each_stage_compiles_once_per_job(stage_dirs, tmp_path):
    """Several batches, a padded last batch, a second guidance scale and a resumed run of the
    same job in the same process: each stage's sampler is traced (and compiled) once."""
    cascade, _ = sampling.load_cascade(stage_dirs)
    entries = [jobs.PromptEntry(f"a red circle number {i}") for i in range(4)]
    entries.append(jobs.PromptEntry("a blue star", guidance_scale=5.0))
    traces = []

    def listen(event, duration, **kwargs):
        if event == TRACE_EVENT:
            traces.append(kwargs.get("fun_name"))

    jax.monitoring.register_event_duration_secs_listener(listen)
    try:
        # 4 images of scale 3 in 2 batches of 2, then 2 of scale 5 in 1 batch; then a
        # resumed run that makes 3 missing images: 2 batches, the second padded.
        summary = jobs.run_job(cascade, entries, str(tmp_path), images_per_prompt=2, batch_size=2)
        assert (summary["prompts"], summary["images"], summary["made"]) == (5, 10, 10)
        first = list(traces)
        for name in ("000000_001.png", "000002_000.png", "000004_001.png"):
            os.remove(tmp_path / "images" / name)
        summary = jobs.run_job(cascade, entries, str(tmp_path), images_per_prompt=2, batch_size=2)
        assert (summary["made"], summary["skipped"]) == (3, 7)
    finally:
        jax.monitoring.unregister_event_duration_listener(listen)
    assert first.count("run") == len(stage_dirs), f"sampler traces: {first}"
    assert traces == first, f"the resumed run traced {traces[len(first) :]}"


def _fake_stage(path, resolution, low_resolution=0, channel_mult=(1, 2)):
    unet = types.SimpleNamespace(channel_mult=channel_mult)
    return types.SimpleNamespace(
        path=path, resolution=resolution, low_resolution=low_resolution, unet=unet
    )


def test_stage_sizes_scale_by_each_super_resolution_factor():
    cascade = [_fake_stage("base", 32, channel_mult=(1, 2, 4)), _fake_stage("sr", 64, 32)]
    assert cascade_lib.stage_sizes(cascade) == [(32, 32), (64, 64)]
    assert cascade_lib.stage_sizes(cascade, 32, 64) == [(16, 32), (32, 64)]
    assert cascade_lib.stage_sizes(cascade, height=128) == [(64, 32), (128, 64)]
    with pytest.raises(ValueError, match=r"stage base would sample 16x18, not a multiple .* 4"):
        cascade_lib.stage_sizes(cascade, 32, 36)
    with pytest.raises(ValueError, match=r"stage sr scales 32 -> 64 px, .* 33x64 .* of 2"):
        cascade_lib.stage_sizes(cascade, 33, 64)
    with pytest.raises(ValueError, match="height must be a positive number of pixels, got -8"):
        cascade_lib.stage_sizes(cascade, -8, 64)
    # A 64 -> 256 stage (factor 4) after a 64 px base: the final size is a multiple of 4.
    sr256 = [_fake_stage("base", 64), _fake_stage("sr", 256, 64)]
    assert cascade_lib.stage_sizes(sr256, 256, 128) == [(64, 32), (256, 128)]
    with pytest.raises(ValueError, match="multiple of 4"):
        cascade_lib.stage_sizes(sr256, 256, 130)


def test_non_square_images_and_long_prompts(stage_dirs, tmp_path, caplog):
    long = "a red circle and a blue square above a green star"  # 11 words, 8 kept
    with caplog.at_level(logging.WARNING):
        summary = _main(stage_dirs, tmp_path, prompts=[long], height=16, width=32)
    assert summary["made"] == 1
    assert f"tokens lost in all, 3 from '{long}'" in caplog.text
    path = tmp_path / "images" / "000000_000.png"
    image = np.asarray(Image.open(path))
    assert image.shape == (16, 32, 3)
    meta = jobs.read_metadata(str(path))
    assert [(s["height"], s["width"]) for s in meta["stages"]] == [(8, 16), (16, 32)]
    with pytest.raises(ValueError, match=r"stage .*base would sample 8x7, not a multiple of"):
        _main(stage_dirs, tmp_path / "bad", height=16, width=14)


def test_negative_prompt_applies_to_a_prompt_file(stage_dirs, tmp_path):
    """--negative_prompt is the negative prompt of every entry of a prompt file without its
    own, and what the manifest records is what was sampled."""
    prompts = tmp_path / "p.jsonl"
    prompts.write_text(
        '{"prompt": "a red circle"}\n'
        '{"prompt": "a blue star", "negative_prompt": "green", "guidance_scale": 2}\n'
    )
    summary = _main(
        stage_dirs,
        tmp_path / "out",
        prompts=[],
        prompts_file=str(prompts),
        negative_prompt="blurry",
        overrides=["0.steps=2", "1.steps=2"],
    )
    assert summary["made"] == 2
    with open(tmp_path / "out" / "manifest.jsonl") as f:
        records = [json.loads(line) for line in f]
    assert [r["negative_prompt"] for r in records] == ["blurry", "green"]
    assert [[s["sample"]["guidance_scale"] for s in r["stages"]] for r in records] == [
        [stages.load_stage(d).sample.guidance_scale for d in stage_dirs],
        [2.0, 2.0],
    ]
    with pytest.raises(ValueError, match="--batch_size must be >= 1, got 0"):
        _main(stage_dirs, tmp_path / "out2", batch_size=0)
