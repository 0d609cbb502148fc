"""Sampling jobs: prompt files, host shares, atomic PNGs with metadata, resume, manifest."""

import json
import os

import jax
import numpy as np
import pytest

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
