"""A folder that holds images of prompts outside the shapes domain: eval/compositional.py,
`accuracy.evaluate_folder` and the `compositional` evaluator skip them, count them and say
why, and score the rest."""

import json
import pathlib
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

from imagen_jax.evaluation import evaluators
from imagen_jax.shapes import accuracy, prompt_sets, tasks
from imagen_jax.shapes.render import render

ROOT = pathlib.Path(__file__).resolve().parents[2]
FOREIGN = ("an astronaut riding a horse", "a circle and a star and a heart")


def write_folder(folder: pathlib.Path, foreign=FOREIGN) -> list[dict]:
    """Rendered images of three held-out single-object prompts, then one image per foreign
    prompt (a prompt the grammar cannot read, and constraints no task fits)."""
    rng = np.random.default_rng(0)
    (folder / "images").mkdir(parents=True)
    lines = []
    for i, record in enumerate(prompt_sets.load_prompts("heldout", "single_object")[:3]):
        image = render(tasks.scene_for(rng, record.spec, "heldout"), 64)
        Image.fromarray(image).save(folder / f"images/{i}.png")
        lines.append({"file": f"images/{i}.png", "prompt": record.prompt, "split": "heldout"})
    for j, prompt in enumerate(foreign):
        Image.fromarray(np.zeros((64, 64, 3), np.uint8)).save(folder / f"images/x{j}.png")
        lines.append({"file": f"images/x{j}.png", "prompt": prompt, "split": "heldout"})
    (folder / "manifest.jsonl").write_text("".join(json.dumps(x) + "\n" for x in lines))
    return lines


def test_evaluate_folder_skips_and_counts(tmp_path):
    write_folder(tmp_path)
    table = accuracy.evaluate_folder(tmp_path, results_path=tmp_path / "results.jsonl")
    assert table["num_images"] == 3
    assert table["splits"]["heldout"]["overall"] == 1.0
    skipped = table["skipped"]
    assert skipped["images"] == 2 and skipped["why"] == accuracy.SKIPPED_WHY
    assert [x["line"] for x in skipped["examples"]] == [4, 5]
    assert "astronaut" in skipped["examples"][0]["reason"]
    assert "no GenEval task fits" in skipped["examples"][1]["reason"]
    text = accuracy.format_table(table)
    assert "skipped 2 of 5 images, not scored: their prompts are outside the shapes domain" in text
    assert "(first: images/x0.png: cannot parse prompt 'an astronaut riding a horse'" in text
    results = [json.loads(x) for x in (tmp_path / "results.jsonl").read_text().splitlines()]
    assert len(results) == 5 and results[-1]["skipped"].startswith("no GenEval task fits")


def test_only_foreign_prompts_is_an_error(tmp_path):
    write_folder(tmp_path)
    manifest = tmp_path / "manifest.jsonl"
    manifest.write_text("".join(manifest.read_text().splitlines(keepends=True)[3:]))
    with pytest.raises(ValueError, match="none of its 2 images has a prompt of the shapes domain"):
        accuracy.evaluate_folder(tmp_path)


def test_command_line_skips_one_foreign_prompt(tmp_path):
    write_folder(tmp_path / "samples", foreign=FOREIGN[:1])
    out = subprocess.run(
        [sys.executable, str(ROOT / "eval" / "compositional.py"), f"--samples={tmp_path}/samples"],
        capture_output=True,
        text=True,
        cwd=ROOT,
    )
    assert out.returncode == 0, out.stderr
    assert "heldout  overall          1.0000" in out.stdout, out.stdout
    assert "skipped 1 of 4 images, not scored" in out.stdout


def test_compositional_evaluator_skips_and_counts(tmp_path):
    lines = write_folder(tmp_path)
    samples = evaluators.samples_from_folder(tmp_path)
    metrics = evaluators.Compositional()(samples)
    assert metrics["compositional/skipped"] == 2.0 and len(samples) == len(lines)
    assert metrics["compositional/heldout/overall"] == 1.0
    only_foreign = evaluators.Samples(samples.images[3:], samples.records[3:])
    with pytest.raises(ValueError, match="no sample has a prompt of the shapes domain"):
        evaluators.Compositional()(only_foreign)
