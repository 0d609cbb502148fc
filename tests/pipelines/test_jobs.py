"""Sampling jobs: prompt files, host shares, atomic PNGs with metadata, resume, manifest."""

import json
import os

import jax
import numpy as np
import pytest
from PIL import Image

from imagen_jax.pipelines import jobs


def _write(path, text):
    path.write_text(text, encoding="utf-8")
    return str(path)


def test_prompt_files(tmp_path):
    txt = _write(tmp_path / "p.txt", "a red circle\n\n  two blue squares  \n")
    assert [e.prompt for e in jobs.read_prompts(txt)] == ["a red circle", "two blue squares"]
    lines = [
        {"prompt": "a star", "seed": 7, "negative_prompt": "blurry", "guidance_scale": 3},
        {"prompt": "a heart", "task": "colors", "spec": {"objects": []}},
    ]
    jl = _write(tmp_path / "p.jsonl", "\n".join(json.dumps(x) for x in lines) + "\n")
    a, b = jobs.read_prompts(jl)
    assert (a.seed, a.negative_prompt, a.guidance_scale) == (7, "blurry", 3.0)
    assert b.extra == {"task": "colors", "spec": {"objects": []}} and b.seed is None


@pytest.mark.parametrize(
    "text,message",
    [
        ('{"prompt": "ok"}\n{"prompt": 3}\n', "p.jsonl:2: expected a JSON object"),
        ('{"prompt": "ok"}\nnot json\n', "p.jsonl:2: not valid JSON"),
        ('{"prompt": "ok", "seed": -1}\n', "p.jsonl:1: 'seed' must be a non-negative"),
        ('{"prompt": "ok"}\n\n  \n{"prompt": 3}\n', "p.jsonl:4: expected a JSON object"),
        ("\n\n", "holds no prompts"),
    ],
)
def test_bad_prompt_files_name_file_and_line(tmp_path, text, message):
    with pytest.raises(ValueError, match=message):
        jobs.read_prompts(_write(tmp_path / "p.jsonl", text))
    with pytest.raises(FileNotFoundError, match="nope.txt"):
        jobs.read_prompts(str(tmp_path / "nope.txt"))


def test_text_prompt_files_skip_blank_lines_and_name_bad_bytes(tmp_path, caplog):
    path = tmp_path / "p.txt"
    path.write_bytes("\ufeffa red circle\r\n\n \t\r\nthree stars\n".encode())
    with caplog.at_level("INFO"):
        assert [e.prompt for e in jobs.read_prompts(str(path))] == ["a red circle", "three stars"]
    assert "2 prompts, 2 blank lines skipped" in caplog.text
    path.write_bytes(b"a red circle\n\nbad \xff byte\n")
    with pytest.raises(ValueError, match=r"p.txt:3: not valid UTF-8"):
        jobs.read_prompts(str(path))


def test_unusable_output_directories_are_named(tmp_path):
    jobs.check_outdir(str(tmp_path / "new" / "dir"))  # created, with its images/ folder
    assert (tmp_path / "new" / "dir" / "images").is_dir()
    assert not list((tmp_path / "new" / "dir").rglob("*.tmp"))
    file = tmp_path / "file.png"
    file.write_bytes(b"")
    with pytest.raises(NotADirectoryError, match="'.*file.png' exists and is not a directory"):
        jobs.check_outdir(str(file))
    with pytest.raises(OSError, match="output directory '.*file.png/out' is not writable"):
        jobs.check_outdir(str(file / "out"))


def test_hosts_split_the_prompts():
    entries = [jobs.PromptEntry(f"p{i}") for i in range(10)]
    shares = [jobs.plan(entries, 3, process_index=k, process_count=3) for k in range(3)]
    got = sorted((it.prompt_index, it.image_index) for share in shares for it in share)
    assert got == [(p, i) for p in range(10) for i in range(3)]
    assert len(jobs.plan(entries, 3)) == 30


def test_batches_are_padded_to_a_fixed_size():
    items = jobs.plan([jobs.PromptEntry("a")], 5)
    out = jobs.batches(items, 4)
    assert [len(b) for b, _ in out] == [4, 4] and [n for _, n in out] == [4, 1]
    assert out[1][0][1:] == [items[-1]] * 3


def test_keys_depend_on_the_image_only():
    items = jobs.plan([jobs.PromptEntry("a"), jobs.PromptEntry("b", seed=9)], 2)
    data = lambda k: jax.random.key_data(k).tolist()  # noqa: E731
    keys = {(it.prompt_index, it.image_index): data(jobs.image_key(1, it, 0)) for it in items}
    assert len({tuple(v) for v in keys.values()}) == 4
    assert data(jobs.image_key(1, items[0], 1)) != keys[(0, 0)]  # stages differ
    # A prompt's own seed replaces the job's.
    assert data(jobs.image_key(1, items[2], 0)) == data(jobs.image_key(2, items[2], 0))


def test_pngs_resume_and_manifest(tmp_path):
    out = str(tmp_path)
    items = jobs.plan([jobs.PromptEntry("a red circle", extra={"task": "colors"})], 3)
    image = np.zeros((8, 8, 3), np.uint8)
    for it in items[:2]:
        meta = jobs.image_metadata(it, seed=0, settings={"stages": [{"steps": 5}]})
        jobs.write_png(os.path.join(out, it.file), image, meta)
    # A truncated file (a job killed mid-write without the atomic rename) counts as missing.
    with open(os.path.join(out, items[2].file), "wb") as f:
        f.write(b"\x89PNG\r\n\x1a\n")
    assert jobs.pending(items, out) == [items[2]]
    assert jobs.read_metadata(os.path.join(out, items[0].file))["stages"] == [{"steps": 5}]
    with open(jobs.write_manifest(out)) as f:
        lines = f.read().splitlines()
    records = [json.loads(line) for line in lines]
    assert [r["file"] for r in records] == [items[0].file, items[1].file]
    assert records[0]["task"] == "colors" and records[0]["prompt"] == "a red circle"
    assert not [n for n in os.listdir(os.path.join(out, "images")) if n.endswith(".tmp")]


def test_grid_places_images_row_by_row_with_white_gaps(tmp_path):
    from PIL import Image

    images = [np.full((2, 3, 3), 10 * (k + 1), np.uint8) for k in range(3)]
    path = str(tmp_path / "grid.png")
    jobs.save_grid(images, path, columns=2, gap=1)
    sheet = np.asarray(Image.open(path))
    assert sheet.shape == (5, 7, 3)  # 2 rows of 2 px and 2 columns of 3 px, 1 px apart
    assert (sheet[0:2, 0:3] == 10).all() and (sheet[0:2, 4:7] == 20).all()
    assert (sheet[3:5, 0:3] == 30).all() and (sheet[3:5, 4:7] == 255).all()
    assert (sheet[2] == 255).all() and (sheet[:, 3] == 255).all()  # the gaps
    with pytest.raises(ValueError, match=r"image 1 is \(2, 2, 3\)"):
        jobs.save_grid([images[0], images[0][:, :2]], path, columns=2)


class _FakeCascade:
    """A job's callable without a network: image (p, i) is filled with 10 p + i (+ 100 per
    seed), and the call can be made to fail after a number of batches (a killed job)."""

    def __init__(self, fail_after=None):
        self.calls, self.fail_after = 0, fail_after

    def __call__(self, items, seed):
        if self.fail_after is not None and self.calls >= self.fail_after:
            raise KeyboardInterrupt("killed")
        self.calls += 1
        value = [10 * it.prompt_index + it.image_index + 100 * seed for it in items]
        return [np.stack([np.full((4, 4, 3), v, np.uint8) for v in value])]


SETTINGS = {
    "stages": [{"path": "/a/base", "sample": {"guidance_scale": 5.0}, "weights_sha256": "aa"}]
}


def _job(out, entries=None, fake=None, **kw):
    entries = entries or [jobs.PromptEntry("a red circle"), jobs.PromptEntry("a blue star")]
    args = dict(images_per_prompt=2, seed=0, batch_size=2, settings=SETTINGS, progress=False)
    return jobs.run_job(fake or _FakeCascade(), entries, str(out), **{**args, **kw})


def _manifest(out):
    with open(out / "manifest.jsonl") as f:
        return [json.loads(line) for line in f]


def test_a_rerun_resumes_only_the_same_job(tmp_path):
    first = _job(tmp_path)
    assert (first["made"], first["state"]) == (4, "new")
    # The same job (the weights read from another folder, another batch size) resumes.
    moved = {"stages": [dict(SETTINGS["stages"][0], path="/elsewhere/base")]}
    again = _job(tmp_path, settings=moved, batch_size=3)
    assert (again["made"], again["skipped"], again["state"]) == (0, 4, "resume")
    assert again["job"] == first["job"]
    # Anything that determines the images refuses, and the message says what differs.
    other_weights = {"stages": [dict(SETTINGS["stages"][0], weights_sha256="bb")]}
    cases = [
        (dict(seed=1), r"seed: 0 -> 1"),
        (dict(images_per_prompt=3), r"images_per_prompt: 2 -> 3"),
        (dict(settings=other_weights), r'settings.stages\[0\].weights_sha256: "aa" -> "bb"'),
        (
            dict(entries=[jobs.PromptEntry("a red circle"), jobs.PromptEntry("a star")]),
            r'prompts\[1\].prompt: "a blue star" -> "a star"',
        ),
        (dict(entries=[jobs.PromptEntry("a red circle")]), r"prompts: 2 -> 1 entries"),
    ]
    for kw, message in cases:
        with pytest.raises(jobs.JobMismatchError, match=message) as e:
            _job(tmp_path, **kw)
        assert "--overwrite" in str(e.value) and str(tmp_path) in str(e.value)
    assert len(_manifest(tmp_path)) == 4  # nothing was touched
    # overwrite replaces the old job's images: one job per folder and manifest.
    third = _job(tmp_path, seed=1, overwrite=True)
    assert (third["made"], third["state"]) == (4, "overwrite")
    records = _manifest(tmp_path)
    assert {r["seed"] for r in records} == {1} and {r["job"] for r in records} == {third["job"]}
    with Image.open(tmp_path / "images" / "000001_001.png") as im:
        assert np.asarray(im)[0, 0, 0] == 111


def test_images_of_an_unknown_job_refuse(tmp_path):
    item = jobs.plan([jobs.PromptEntry("a red circle")], 1)[0]
    meta = jobs.image_metadata(item, seed=0, settings={})
    jobs.write_png(str(tmp_path / item.file), np.zeros((4, 4, 3), np.uint8), meta)
    with pytest.raises(jobs.JobMismatchError, match="holds 1 images and no job.json"):
        _job(tmp_path)
    (tmp_path / "job.json").write_text("{not json")
    with pytest.raises(jobs.JobMismatchError, match="job.json is unreadable"):
        _job(tmp_path)
    assert _job(tmp_path, overwrite=True)["made"] == 4


def test_a_killed_job_leaves_a_manifest_and_its_resume_cleans_up(tmp_path):
    entries = [jobs.PromptEntry(f"prompt {p}") for p in range(3)]
    with pytest.raises(KeyboardInterrupt):
        _job(tmp_path, entries, fake=_FakeCascade(fail_after=1), grid=True)
    assert [r["file"] for r in _manifest(tmp_path)] == [
        "images/000000_000.png",
        "images/000000_001.png",
    ]
    (tmp_path / "images" / "000001_000.png.x1y2.tmp").write_bytes(b"")  # a kill -9 mid-write
    summary = _job(tmp_path, entries, grid=True)
    assert (summary["made"], summary["skipped"]) == (4, 2)
    assert not list(tmp_path.rglob("*.tmp"))
    assert len(_manifest(tmp_path)) == 6
    with Image.open(tmp_path / "grid.png") as im:  # every image of the job, not this run's
        sheet = np.asarray(im)
    assert sheet.shape == (4, 24, 3)
    assert [sheet[0, 4 * k, 0] for k in range(6)] == [0, 1, 10, 11, 20, 21]


def test_recorded_settings_are_the_sampled_ones(tmp_path):
    settings = {
        "stages": [
            {"sample": {"guidance_scale": 5.0, "steps": 4}},
            {"sample": {"guidance_scale": 4.0}, "overrides": {"guidance_scale": 3.0}},
        ]
    }
    entries = [jobs.PromptEntry("a"), jobs.PromptEntry("b", guidance_scale=1.5)]
    _job(tmp_path, entries, settings=settings)
    by_prompt = {r["prompt"]: r["stages"] for r in _manifest(tmp_path)}
    assert [s["sample"]["guidance_scale"] for s in by_prompt["a"]] == [5.0, 4.0]
    assert [s["sample"]["guidance_scale"] for s in by_prompt["b"]] == [1.5, 1.5]
    assert by_prompt["b"][1]["overrides"] == {"guidance_scale": 1.5}
    assert by_prompt["b"][0]["sample"]["steps"] == 4


def test_outputs_have_the_usual_permissions(tmp_path):
    old = os.umask(0o022)
    try:
        _job(tmp_path, grid=True)
    finally:
        os.umask(old)
    for name in ("images/000000_000.png", "manifest.jsonl", "job.json", "grid.png"):
        assert (tmp_path / name).stat().st_mode & 0o777 == 0o644, name


def test_bad_guidance_in_a_prompt_file_is_named(tmp_path):
    path = _write(tmp_path / "p.jsonl", '{"prompt": "a", "guidance_scale": -1}\n')
    with pytest.raises(ValueError, match=r"p.jsonl:1: 'guidance_scale' must be a number >= 0"):
        jobs.read_prompts(path)
    with pytest.raises(ValueError, match="batch_size must be >= 1, got 0"):
        _job(tmp_path, batch_size=0)
