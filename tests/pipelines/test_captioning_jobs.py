"""The captioning job (caption.py's library call) on a tiny random GIT: captions equal to
transformers' processor + generate + batch_decode on the same files (grayscale, RGBA and
odd sizes converted as transformers converts them), bad files named, skipped and counted,
a killed job resumed to the same bytes, mismatching reruns refused by name, manifests'
prompts carried, two processes joined by jax.distributed, one-line errors of the main."""

from __future__ import annotations

import json
import os
import pathlib
import shutil
import socket
import subprocess
import sys

import jax
import numpy as np
import pytest
import torch
import transformers
from PIL import Image
from tiny_git import save_tiny_git

from imagen_jax import files, images
from imagen_jax.pipelines import captioning, captioning_jobs, jobs

ROOT = pathlib.Path(__file__).resolve().parents[2]
WORKER = pathlib.Path(__file__).with_name("captioning_worker.py")
MAX_LENGTH = 12
GOOD = ["a_rgb.png", "b_small.png", "c_gray.png", "d_rgba.png", "sub/e_wide.jpg"]
BAD = ["bad_truncated.png", "notes.txt"]


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    path = tmp_path_factory.mktemp("git")
    hf, tok = save_tiny_git(path)
    return path, hf, tok


def _write_images(folder: pathlib.Path) -> None:
    rng = np.random.default_rng(0)
    (folder / "sub").mkdir(parents=True)
    Image.fromarray(rng.integers(0, 256, (40, 48, 3), np.uint8)).save(folder / GOOD[0])
    Image.fromarray(rng.integers(0, 256, (20, 24, 3), np.uint8)).save(folder / GOOD[1])
    Image.fromarray(rng.integers(0, 256, (36, 30), np.uint8), "L").save(folder / GOOD[2])
    rgba = rng.integers(0, 256, (44, 38, 4), np.uint8)
    Image.fromarray(rgba, "RGBA").save(folder / GOOD[3])
    Image.fromarray(rng.integers(0, 256, (32, 80, 3), np.uint8)).save(folder / GOOD[4])
    whole = (folder / GOOD[0]).read_bytes()
    (folder / BAD[0]).write_bytes(whole[: len(whole) // 2])
    (folder / BAD[1]).write_text("not an image\n")


@pytest.fixture(scope="module")
def image_dir(tmp_path_factory):
    folder = tmp_path_factory.mktemp("images")
    _write_images(folder)
    return folder


@pytest.fixture(scope="module")
def captioner(model):
    """Batches of 2 on one device: several batches for 5 images."""
    return captioning.load_captioner(
        model[0], max_length=MAX_LENGTH, batch_size=2, devices=jax.local_devices()[:1]
    )


def _record(model_path, folder, captioner):
    items = captioning_jobs.list_images(str(folder))
    record = captioning_jobs.job_record(
        items,
        str(folder),
        model_sha256=files.folder_sha256(model_path),
        decoding=captioner.decoding,
        bos_token_id=captioner.bos_token_id,
    )
    return items, record


def _lines(path) -> list[dict]:
    return [json.loads(line) for line in pathlib.Path(path).read_text().splitlines()]


def test_captions_equal_transformers_and_bad_files_are_skipped(model, image_dir, tmp_path):
    path, hf, tok = model
    outdir = tmp_path / "out"
    summary = captioning_jobs.run_captioning_job(
        model=str(path), images=str(image_dir), outdir=str(outdir), batch_size=2,
        max_length=MAX_LENGTH, progress=False, devices=jax.local_devices()[:1],
    )  # fmt: skip
    assert summary["captioned"] == len(GOOD) and summary["already"] == 0
    assert sorted(summary["skipped"]) == sorted(BAD)
    assert "UnidentifiedImageError" in summary["skipped"]["notes.txt"]
    assert "truncated" in summary["skipped"]["bad_truncated.png"]
    lines = _lines(outdir / "captions.jsonl")
    assert [line["file"] for line in lines] == sorted(GOOD)
    # transformers end to end on the same files: its PIL processor (RGB conversion onto
    # white, resize, crop, normalize), generate, batch_decode.
    processor = transformers.CLIPImageProcessorPil.from_pretrained(path)
    pil = [Image.open(image_dir / f) for f in sorted(GOOD)]
    pixels = processor(images=pil, return_tensors="pt").pixel_values
    with torch.no_grad():
        ids = hf.generate(pixel_values=pixels, max_length=MAX_LENGTH, do_sample=False)
    want = tok.batch_decode(ids, skip_special_tokens=True)
    assert [line["caption"] for line in lines] == want
    assert len(set(want)) > 1
    job = json.loads((outdir / "job.json").read_text())
    assert job["kind"] == "captioning" and len(job["images"]) == len(GOOD) + len(BAD)


def test_rgb_conversion_is_transformers(image_dir):
    from transformers.image_transforms import convert_to_rgb

    for name in ("c_gray.png", "d_rgba.png"):
        with Image.open(image_dir / name) as im:
            want = convert_to_rgb(im, return_numpy=True)
        got = images.load_rgb(image_dir / name)
        assert got.shape == (*want.shape[:2], 3) and got.dtype == np.uint8
        np.testing.assert_array_equal(got, want)
    rgba = np.asarray(Image.open(image_dir / "d_rgba.png"))
    assert not np.array_equal(images.load_rgb(image_dir / "d_rgba.png"), rgba[..., :3])


class _Killed(Exception):
    pass


class _KilledAfter:
    """A captioner that dies (as a killed process would) at its n-th batch."""

    def __init__(self, captioner, batches: int):
        self._captioner, self._left = captioner, batches

    def __getattr__(self, name):
        return getattr(self._captioner, name)

    def generate(self, pixels):
        if self._left == 0:
            raise _Killed
        self._left -= 1
        return self._captioner.generate(pixels)


def test_a_killed_job_resumes_to_the_same_file(model, image_dir, captioner, tmp_path):
    items, record = _record(model[0], image_dir, captioner)
    whole, resumed = tmp_path / "whole", tmp_path / "resumed"
    args = dict(record=record, progress=False)
    first = captioning_jobs.run_job(captioner, items, str(image_dir), str(whole), **args)
    assert first["state"] == "new" and first["captioned"] == len(GOOD)
    with pytest.raises(_Killed):
        captioning_jobs.run_job(
            _KilledAfter(captioner, 1), items, str(image_dir), str(resumed), **args
        )
    done = _lines(resumed / "captions.jsonl")
    assert len(done) == 2  # the first batch's lines are on disk
    with open(resumed / "captions.jsonl", "a") as f:
        f.write('{"caption": "ba be", "fi')  # a line cut by the kill
    again = captioning_jobs.run_job(captioner, items, str(image_dir), str(resumed), **args)
    assert again["state"] == "resume"
    assert (again["already"], again["captioned"]) == (2, len(GOOD) - 2)
    assert (resumed / "captions.jsonl").read_bytes() == (whole / "captions.jsonl").read_bytes()
    # A finished job's rerun captions nothing.
    last = captioning_jobs.run_job(captioner, items, str(image_dir), str(resumed), **args)
    assert last["captioned"] == 0 and last["already"] == len(GOOD) + len(BAD) - 2


def test_a_mismatching_rerun_is_refused_by_name(model, image_dir, captioner, tmp_path):
    items, record = _record(model[0], image_dir, captioner)
    outdir = tmp_path / "out"
    captioning_jobs.run_job(
        captioner, items[:2], str(image_dir), str(outdir), record=record, progress=False
    )
    beams = captioning_jobs.job_record(
        items, str(image_dir), model_sha256=record["model_sha256"],
        decoding=captioning.Decoding(max_length=MAX_LENGTH, num_beams=3, eos_token_id=(3,)),
        bos_token_id=2,
    )  # fmt: skip
    with pytest.raises(jobs.JobMismatchError, match=r"differs in decoding\.num_beams: 1 -> 3\."):
        captioning_jobs.check_outdir(str(outdir), beams)
    other_model = dict(record, model_sha256="0" * 64)
    other_model = jobs.fingerprinted({k: v for k, v in other_model.items() if k != "fingerprint"})
    with pytest.raises(jobs.JobMismatchError, match=r'model_sha256: "[0-9a-f]+\.\.\. -> "0000'):
        captioning_jobs.check_outdir(str(outdir), other_model)
    changed = tmp_path / "changed"
    shutil.copytree(image_dir, changed)
    Image.fromarray(np.zeros((8, 8, 3), np.uint8)).save(changed / "b_small.png")
    _, changed_record = _record(model[0], changed, captioner)
    index = [it.file for it in items].index("b_small.png")
    with pytest.raises(jobs.JobMismatchError, match=rf"images\[{index}\]\.sha256"):
        captioning_jobs.check_outdir(str(outdir), changed_record)
    # --overwrite replaces the captions
    assert captioning_jobs.check_outdir(str(outdir), beams, overwrite=True) == "overwrite"
    # A sampling job's folder is refused even with --overwrite.
    sampled = tmp_path / "sampled"
    jobs.prepare_outdir(str(sampled), jobs.job_record([], images_per_prompt=1, seed=0, settings={}))
    with pytest.raises(jobs.JobMismatchError, match="not a captioning job's"):
        captioning_jobs.check_outdir(str(sampled), record, overwrite=True)


def test_a_sample_folder_gives_each_line_its_prompt(model, captioner, tmp_path):
    folder = tmp_path / "samples"
    rng = np.random.default_rng(3)
    prompts = ["a red circle", "two blue stars", "a green heart"]
    metas = []
    for p, prompt in enumerate(prompts):
        item = jobs.plan([jobs.PromptEntry(prompt, extra={"task": "colors"})], 1)[0]
        item = jobs.WorkItem(p, 0, item.entry)
        meta = jobs.image_metadata(item, seed=7, settings={"stages": []}, job="abc")
        jobs.write_png(str(folder / item.file), rng.integers(0, 256, (16, 16, 3), np.uint8), meta)
        metas.append(meta)
    jobs.write_manifest(str(folder))
    items, record = _record(model[0], folder, captioner)
    outdir = tmp_path / "captions"
    captioning_jobs.run_job(
        captioner, items, str(folder), str(outdir), record=record, progress=False
    )
    lines = _lines(outdir / "captions.jsonl")
    assert [line["file"] for line in lines] == [m["file"] for m in metas]
    assert [line["prompt"] for line in lines] == prompts
    assert lines[1]["metadata"]["task"] == "colors" and lines[1]["metadata"]["seed"] == 7
    assert record["manifest_sha256"] is not None


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_two_processes_caption_their_shares(model, image_dir, captioner, tmp_path):
    """Two processes (one CPU device each) joined by jax.distributed on 127.0.0.1 write
    the same captions.jsonl as one process."""
    items, record = _record(model[0], image_dir, captioner)
    one, two = tmp_path / "one", tmp_path / "two"
    captioning_jobs.run_job(
        captioner, items, str(image_dir), str(one), record=record, progress=False
    )
    env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
    port = _free_port()
    common = [f"--model={model[0]}", f"--images={image_dir}", f"--outdir={two}",
              f"--max_length={MAX_LENGTH}", "--batch_size=2", "--num_processes=2",
              f"--coordinator_address=127.0.0.1:{port}"]  # fmt: skip
    procs = [
        subprocess.Popen(
            [sys.executable, str(WORKER), *common, f"--process_id={k}"],
            cwd=WORKER.parent,
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )  # fmt: skip
        for k in range(2)
    ]
    try:
        outputs = [p.communicate(timeout=240)[0] for p in procs]
    finally:
        for p in procs:
            p.kill()
    for p, out in zip(procs, outputs, strict=True):
        assert p.returncode == 0, out[-3000:]
    # process 0 took the first 4 files in sorted order, process 1 the other 3
    assert "share: 4 of 7 images" in outputs[0] and "share: 3 of 7 images" in outputs[1]
    assert (two / "captions.jsonl").read_bytes() == (one / "captions.jsonl").read_bytes()
    assert not list(two.glob("captions.process*"))


def test_the_main_ends_bad_input_in_one_line(model, tmp_path):
    out = subprocess.run(
        [sys.executable, "caption.py", f"--model={model[0]}", f"--images={tmp_path / 'nope'}",
         f"--outdir={tmp_path / 'out'}"],
        cwd=ROOT, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert out.returncode == 1
    assert "Traceback" not in out.stderr
    assert (
        out.stderr.strip()
        .splitlines()[-1]
        .startswith("caption.py: FileNotFoundError: images folder")
    )


def test_max_length_defaults_to_the_generation_config(model, tmp_path):
    """Without max_length, decoding stops where transformers' generate would: at
    generation_config.json's max_length, else 20; an explicit value wins."""
    path = tmp_path / "git"
    shutil.copytree(model[0], path)
    generation = path / captioning.GENERATION_CONFIG
    settings = json.loads(generation.read_text()) if generation.exists() else {}
    generation.write_text(json.dumps({**settings, "max_length": 7}))
    assert captioning.read_decoding(path)[0].max_length == 7
    assert captioning.read_decoding(path, max_length=9)[0].max_length == 9
    generation.unlink()
    assert captioning.read_decoding(path)[0].max_length == captioning.DEFAULT_MAX_LENGTH == 20
