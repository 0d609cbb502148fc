"""Compositional accuracy of a folder of generated images, GenEval style.

The folder holds the images and `manifest.jsonl`, one JSON object per line per image:

    {"file": "images/00012.png", "prompt": "two blue stars", "task": "counting",
     "split": "train", "spec": {"objects": [{"shape": "star", "color": "blue", "count": 2}]}}

* `file` (required): the image's path, relative to the folder (PNG, JPEG, anything Pillow
  reads; converted to RGB).
* `prompt` (required): the prompt the image was generated from.
* `spec` (optional): the prompt's constraints, `PromptSpec.to_dict()` (as in the prompt
  files); by default parsed from `prompt`. If it carries a task, that task is used.
* `task` (optional): what is scored, one of the six GenEval tasks; by default the task
  `infer_task` reads from the constraints.
* `split` (optional): "train" or "heldout"; the table then has a block per split.
* Anything else (seed, sampler settings, ...) is kept in the per-image results.

Each image is scored by `scorer.score` (see its docstring for the semantics of each task).
An image whose prompt is outside the shapes domain (the grammar cannot read it, or its
constraints fit no GenEval task) is skipped, not scored: the table counts the skipped
images and says why (`OutOfDomain`), so that one foreign prompt does not stop the scoring
of a folder. The table gives, per split, each task's accuracy and count, its failures by
kind (`scorer.failure_kind`: an object missing, a colour swapped between objects, ...) and
the overall score: the mean of the six task accuracies, as GenEval reports it (over the
tasks present, when some are missing, which the table says).
"""

from __future__ import annotations

import collections
import dataclasses
import json
import pathlib
from collections.abc import Iterator
from typing import Any

import numpy as np
from PIL import Image

from imagen_jax.shapes import grammar, scorer, splits
from imagen_jax.shapes.spec import TASKS, PromptSpec, check_task

MANIFEST = "manifest.jsonl"
NO_SPLIT = "all"
SKIPPED_WHY = "their prompts are outside the shapes domain"
SKIPPED_EXAMPLES = 3  # skipped images the table names


class OutOfDomain(ValueError):
    """A prompt the shapes domain has no constraints for: its image is skipped, not scored."""


@dataclasses.dataclass(frozen=True)
class Skipped:
    """A manifest line whose prompt is outside the shapes domain."""

    line: int
    file: str
    prompt: str
    reason: str


@dataclasses.dataclass(frozen=True)
class ManifestEntry:
    """One line of a manifest: the image, and the spec (with task) to score it by."""

    path: pathlib.Path
    prompt: str
    spec: PromptSpec
    split: str
    extra: dict[str, Any]


def infer_task(spec: PromptSpec) -> str:
    """The GenEval task a prompt's constraints belong to, by their form: a relation makes
    position, a count above one counting, two coloured objects color_attr, two objects
    two_object, one coloured object colors, one object single_object."""
    groups = spec.objects
    if spec.relation is not None:
        return "position"
    if len(groups) == 1 and groups[0].count > 1:
        return "counting"
    if len(groups) == 1:
        return "colors" if groups[0].color else "single_object"
    if len(groups) == 2 and all(g.count == 1 for g in groups):
        return "color_attr" if all(g.color for g in groups) else "two_object"
    raise OutOfDomain(f"no GenEval task fits {spec}; give the entry a 'task'")


def record_spec(data: dict[str, Any]) -> tuple[PromptSpec, str]:
    """(spec with its task, split) of a manifest or prompt-file record: `spec` if given, else
    parsed from `prompt`; `task` if given (it must agree with the spec's), else inferred.
    OutOfDomain when the prompt cannot be parsed or its constraints fit no task."""
    if data.get("spec") is not None:
        spec = PromptSpec.from_dict(data["spec"])
    else:
        try:
            spec = grammar.parse_prompt(data["prompt"])
        except ValueError as e:
            raise OutOfDomain(str(e)) from None
    task = data.get("task")
    if task is not None:
        check_task(task)
        if spec.task is not None and spec.task != task:
            raise ValueError(f"'task' {task!r} disagrees with the spec's task {spec.task!r}")
    task = task or spec.task or infer_task(spec)
    split = data.get("split", NO_SPLIT)
    if split != NO_SPLIT:
        splits.check_split(split)
    return dataclasses.replace(spec, task=task), split


def _entry(data: Any, folder: pathlib.Path) -> ManifestEntry:
    if not isinstance(data, dict):
        raise ValueError(f"expected a JSON object, got {type(data).__name__}")
    for key in ("file", "prompt"):
        if not isinstance(data.get(key), str):
            raise ValueError(f"needs a string {key!r}")
    extra = {k: v for k, v in data.items() if k not in ("file", "prompt", "spec", "task", "split")}
    spec, split = record_spec(data)
    path = folder / data["file"]
    if not path.is_file():
        raise FileNotFoundError(f"image {str(path)!r} (for prompt {data['prompt']!r}) is missing")
    return ManifestEntry(path, data["prompt"], spec, split, extra)


def read_manifest(folder: str | pathlib.Path) -> tuple[list[ManifestEntry], list[Skipped]]:
    """The entries of `folder/manifest.jsonl` to score, and the lines skipped because their
    prompt is outside the shapes domain; errors name the file and line."""
    folder = pathlib.Path(folder)
    manifest = folder / MANIFEST
    if not manifest.is_file():
        raise FileNotFoundError(f"no {MANIFEST} in {str(folder)!r}")
    entries, skipped = [], []
    for i, line in enumerate(manifest.read_text(encoding="utf-8").splitlines(), 1):
        if not line.strip():
            continue
        try:
            data = json.loads(line)
            entries.append(_entry(data, folder))
        except FileNotFoundError as e:
            raise FileNotFoundError(f"{manifest}:{i}: {e}") from None
        except OutOfDomain as e:
            skipped.append(Skipped(i, data["file"], data["prompt"], str(e)))
        except ValueError as e:  # json.JSONDecodeError included
            raise ValueError(f"{manifest}:{i}: {e}") from None
    if not entries and skipped:
        raise ValueError(
            f"{manifest}: none of its {len(skipped)} images has a prompt of the shapes domain "
            f"(line {skipped[0].line}: {skipped[0].reason})"
        )
    if not entries:
        raise ValueError(f"{manifest} lists no images")
    return entries, skipped


def load_image(path: str | pathlib.Path) -> np.ndarray:
    """A uint8 RGB image [H, W, 3]."""
    with Image.open(path) as im:
        return np.asarray(im.convert("RGB"))


def score_entries(entries: list[ManifestEntry]) -> Iterator[tuple[ManifestEntry, scorer.Result]]:
    for entry in entries:
        yield entry, scorer.score(load_image(entry.path), entry.spec)


def summarize(results: list[tuple[ManifestEntry, scorer.Result]]) -> dict[str, Any]:
    """The GenEval table: per split, per task {accuracy, correct, total, failures}; overall.
    `failures` counts the failed images by `scorer.failure_kind`, in `FAILURE_KINDS` order."""
    table: dict[str, Any] = {"num_images": len(results), "splits": {}}
    for split in sorted({e.split for e, _ in results}, key=lambda s: (s != "train", s)):
        rows = {}
        for task in TASKS:
            scored = [r for e, r in results if e.split == split and r.task == task]
            if scored:
                passed = [r.passed for r in scored]
                kinds = collections.Counter(scorer.failure_kind(r) for r in scored)
                rows[task] = {
                    "accuracy": float(np.mean(passed)),
                    "correct": int(np.sum(passed)),
                    "total": len(passed),
                    "failures": {k: kinds[k] for k in scorer.FAILURE_KINDS if kinds[k]},
                }
        table["splits"][split] = {
            "tasks": rows,
            "overall": float(np.mean([row["accuracy"] for row in rows.values()])),
            "missing_tasks": [t for t in TASKS if t not in rows],
        }
    return table


def format_table(table: dict[str, Any]) -> str:
    """The table as text: one row per (split, task) with its failures by kind, then each
    split's overall score, then how many images were skipped, and why."""
    lines = [f"{'split':<8} {'task':<14} {'accuracy':>8}  {'correct':>7} / total  failures"]
    for split, block in table["splits"].items():
        for task, row in block["tasks"].items():
            kinds = ", ".join(f"{k} {n}" for k, n in row["failures"].items())
            count = f"{row['correct']:>7} / {row['total']}"
            lines.append(f"{split:<8} {task:<14} {row['accuracy']:>8.4f}  {count:<15}  {kinds}")
        missing = ", ".join(block["missing_tasks"])
        note = (
            f"mean over {len(block['tasks'])} tasks; missing: {missing}"
            if missing
            else "mean of the six task accuracies"
        )
        lines.append(f"{split:<8} {'overall':<14} {block['overall']:>8.4f}  ({note})")
    skipped = table.get("skipped")
    if skipped and skipped["images"]:
        n, total = skipped["images"], skipped["images"] + table["num_images"]
        first = skipped["examples"][0]
        lines.append(
            f"skipped {n} of {total} images, not scored: {skipped['why']} "
            f"(first: {first['file']}: {first['reason']})"
        )
    return "\n".join(lines)


def evaluate_folder(
    folder: str | pathlib.Path, *, results_path: str | pathlib.Path | None = None
) -> dict[str, Any]:
    """Scores every image the folder's manifest lists whose prompt is in the shapes domain;
    returns the table (`summarize`) with "skipped": the number of the other images, why,
    and the first few. `results_path`: also write one JSON line per image (entry, verdict,
    what was read; or "skipped" and the reason)."""
    entries, skipped = read_manifest(folder)
    results = list(score_entries(entries))
    if results_path is not None:
        with open(results_path, "w", encoding="utf-8") as f:
            for entry, result in results:
                record = {
                    "file": str(entry.path.relative_to(pathlib.Path(folder))),
                    "prompt": entry.prompt,
                    "split": entry.split,
                    **entry.extra,
                    **result.to_dict(),
                }
                f.write(json.dumps(record) + "\n")
            for s in skipped:
                f.write(json.dumps({"file": s.file, "prompt": s.prompt, "skipped": s.reason}))
                f.write("\n")
    table = summarize(results)
    table["skipped"] = {
        "images": len(skipped),
        "why": SKIPPED_WHY,
        "examples": [dataclasses.asdict(s) for s in skipped[:SKIPPED_EXAMPLES]],
    }
    return table
