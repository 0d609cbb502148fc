"""Tests for imagen_jax.shapes.accuracy and eval/compositional.py: a folder of samples."""

import json
import pathlib
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

from imagen_jax.shapes import accuracy, prompt_sets, tasks
from imagen_jax.shapes.render import render
from imagen_jax.shapes.spec import TASKS

ROOT = pathlib.Path(__file__).resolve().parents[2]


def write_folder(folder: pathlib.Path, *, noise: bool, per_task: int = 8, res: int = 64):
    """Images for the first prompts of each task of both splits, and their manifest. Half
    the entries carry spec and task; the others only the prompt (parsed, task inferred),
    so that counting/position/color_attr still come out right."""
    rng = np.random.default_rng(0)
    lines = []
    (folder / "images").mkdir(parents=True)
    for split in ("train", "heldout"):
        for task in TASKS:
            for i, record in enumerate(prompt_sets.load_prompts(split, task)[:per_task]):
                if noise:
                    image = rng.integers(0, 256, (res, res, 3), dtype=np.uint8)
                else:
                    image = render(tasks.scene_for(rng, record.spec, split), res)
                name = f"images/{split}_{task}_{i}.png"
                Image.fromarray(image).save(folder / name)
                entry = {"file": name, "prompt": record.prompt, "split": split, "seed": i}
                if i % 2 == 0 or task in ("single_object", "two_object"):
                    entry |= {"task": task, "spec": record.spec.constraints().to_dict()}
                lines.append(json.dumps(entry))
    (folder / "manifest.jsonl").write_text("\n".join(lines) + "\n")
    return len(lines)


def test_scores_rendered_samples_perfectly(tmp_path):
    n = write_folder(tmp_path, noise=False)
    table = accuracy.evaluate_folder(tmp_path, results_path=tmp_path / "results.jsonl")
    assert table["num_images"] == n
    for split in ("train", "heldout"):
        block = table["splits"][split]
        assert set(block["tasks"]) == set(TASKS) and not block["missing_tasks"]
        assert all(row["total"] == 8 for row in block["tasks"].values())
        assert block["overall"] == 1.0, accuracy.format_table(table)
    lines = (tmp_path / "results.jsonl").read_text().splitlines()
    first = json.loads(lines[0])
    assert len(lines) == n and first["passed"] and first["seed"] == 0 and first["objects"]
    text = accuracy.format_table(table)
    assert "heldout  color_attr" in text and "mean of the six task accuracies" in text
    assert all(not row["failures"] for row in block["tasks"].values())


def test_scores_noise_as_nothing(tmp_path):
    write_folder(tmp_path, noise=True, per_task=3)
    table = accuracy.evaluate_folder(tmp_path)
    assert all(block["overall"] == 0.0 for block in table["splits"].values())
    for block in table["splits"].values():  # noise has no plain background to read
        assert all(row["failures"] == {"unreadable": 3} for row in block["tasks"].values())
    assert "unreadable 3" in accuracy.format_table(table)


def test_infer_task():
    parse = accuracy.grammar.parse_prompt
    assert accuracy.infer_task(parse("a circle")) == "single_object"
    assert accuracy.infer_task(parse("a red circle")) == "colors"
    assert accuracy.infer_task(parse("three circles")) == "counting"
    assert accuracy.infer_task(parse("a circle and a star")) == "two_object"
    assert accuracy.infer_task(parse("a red circle and a blue star")) == "color_attr"
    assert accuracy.infer_task(parse("a circle above a star")) == "position"
    with pytest.raises(ValueError, match="no GenEval task"):
        accuracy.infer_task(parse("a circle and a star and a heart"))


def _manifest(folder, *entries):
    (folder / "manifest.jsonl").write_text("\n".join(entries) + "\n")


def test_clear_errors(tmp_path):
    Image.fromarray(np.zeros((32, 32, 3), np.uint8)).save(tmp_path / "a.png")
    good = json.dumps({"file": "a.png", "prompt": "a red circle"})
    with pytest.raises(FileNotFoundError, match="no manifest.jsonl"):
        accuracy.read_manifest(tmp_path)
    cases = [
        (json.dumps({"file": "b.png", "prompt": "a red circle"}), FileNotFoundError, "b.png"),
        ("{oops", ValueError, "Expecting property name"),
        (json.dumps({"file": "a.png"}), ValueError, "needs a string 'prompt'"),
        (
            json.dumps({"file": "a.png", "prompt": "a red circle", "task": "x"}),
            ValueError,
            "unknown task",
        ),
        (
            json.dumps({"file": "a.png", "prompt": "a circle", "split": "val"}),
            ValueError,
            "unknown split",
        ),
    ]
    for line, error, message in cases:
        _manifest(tmp_path, good, line)
        with pytest.raises(error, match=message) as info:
            accuracy.read_manifest(tmp_path)
        assert "manifest.jsonl:2:" in str(info.value)


def test_command_line(tmp_path):
    write_folder(tmp_path / "samples", noise=False, per_task=1)
    out = subprocess.run(
        [
            sys.executable,
            str(ROOT / "eval" / "compositional.py"),
            f"--samples={tmp_path / 'samples'}",
            f"--json={tmp_path / 'table.json'}",
        ],
        capture_output=True,
        text=True,
        check=True,
        cwd=ROOT,
    )
    assert "train    overall          1.0000" in out.stdout, out.stdout
    table = json.loads((tmp_path / "table.json").read_text())
    assert table["splits"]["heldout"]["overall"] == 1.0


def test_results_table(tmp_path):
    """eval/shapes_table.py: a row per name (its last line), then the failure kinds of the
    main rows that carry them."""
    line = dict(
        split="heldout",
        images=8,
        overall=0.5,
        tasks=dict.fromkeys(TASKS, 0.5),
        seconds_per_image=0.25,
    )
    lines = [
        dict(line, name="cascade_heldout", overall=0.1),
        dict(line, name="guidance_3"),
        dict(line, name="sr_aug_level_0.25"),
        dict(line, name="layout_scale_1.5"),
        dict(line, name="sr_shipped"),
        dict(line, name="cascade_heldout", failures={"color_attr": {"missing": 3, "swapped": 1}}),
    ]
    path = tmp_path / "shapes.jsonl"
    path.write_text("".join(json.dumps(x) + "\n" for x in lines))
    script = str(ROOT / "eval" / "shapes_table.py")
    out = subprocess.run(
        [sys.executable, script, str(path)], capture_output=True, text=True, check=True
    ).stdout
    assert out.count("| cascade, shipped settings | heldout | 8 |") == 1, out
    assert "**0.500**" in out and "**0.100**" not in out and "| base, guidance 3 |" in out
    assert "| cascade, SR augmentation level 0.25 |" in out
    assert "| base, layout scale 1.5 |" in out
    assert "| cascade, shipped settings (sweep prompts) |" in out
    assert "| none | missing 3, swapped 1 |" in out, out
    path.write_text("")
    empty = subprocess.run([sys.executable, script, str(path)], capture_output=True, text=True)
    assert empty.returncode != 0 and "no results lines" in empty.stderr


def test_first_prompts_per_task_and_of_a_subset():
    """prompt_sets.first_per_task (eval/shapes_cascade.py's prompts): the first N prompts of
    each task in file order, or of the tasks asked for; an unknown task is named."""
    records = prompt_sets.first_per_task("heldout", 3)
    assert len(records) == 3 * len(TASKS)
    assert [r.prompt for r in records if r.task == "counting"] == [
        r.prompt for r in prompt_sets.load_prompts("heldout", "counting")[:3]
    ]
    subset = prompt_sets.first_per_task("heldout", 2, ["position", "color_attr"])
    assert sorted(r.task for r in subset) == ["color_attr"] * 2 + ["position"] * 2
    assert subset[0].prompt in [r.prompt for r in records]
    with pytest.raises(ValueError, match="colour"):
        prompt_sets.first_per_task("heldout", 2, ["colour"])
