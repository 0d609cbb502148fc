"""The fixed evaluation prompts: one JSONL file per split, checked in with the package.

`imagen_jax/shapes/prompts/{train,heldout}.jsonl` hold `PROMPTS_PER_TASK` prompts for each
of the six tasks, one JSON object per line:

    {"prompt": "a red circle to the left of a blue star", "task": "position",
     "split": "train", "spec": {"objects": [...], "relation": "left of"}}

`spec` is the prompt's constraints (`PromptSpec.to_dict()`, without the task), `task` what
is scored. Within a task no prompt repeats. `python -m imagen_jax.shapes.make_prompts`
writes the files from `generate(split)`, which is deterministic (seeded by split and task);
a test checks that the files in the package are exactly what it writes.
"""

from __future__ import annotations

import dataclasses
import importlib.resources
import json
import pathlib
from collections.abc import Iterable

import numpy as np

from imagen_jax.shapes import grammar, splits, tasks
from imagen_jax.shapes.spec import TASKS, PromptSpec, check_task

PROMPTS_PER_TASK = 60
SEED = 20240611
_MAX_DRAWS = 100_000


@dataclasses.dataclass(frozen=True)
class PromptRecord:
    """One evaluation prompt: its text, split and spec (whose task is what is scored)."""

    prompt: str
    split: str
    spec: PromptSpec

    @property
    def task(self) -> str:
        return self.spec.task

    def to_json(self) -> str:
        return json.dumps(
            {
                "prompt": self.prompt,
                "task": self.task,
                "split": self.split,
                "spec": self.spec.constraints().to_dict(),
            }
        )


def generate(split: str) -> list[PromptRecord]:
    """The split's prompts, task after task, in a fixed order."""
    splits.check_split(split)
    records = []
    for t, task in enumerate(TASKS):
        rng = np.random.default_rng([SEED, splits.SPLITS.index(split), t])
        seen: set[str] = set()
        for _ in range(_MAX_DRAWS):
            if len(seen) == PROMPTS_PER_TASK:
                break
            spec = tasks.sample_prompt_spec(rng, task, split)
            text = grammar.caption(spec, rng)
            if text not in seen:
                seen.add(text)
                records.append(PromptRecord(text, split, spec))
        else:
            raise RuntimeError(f"found only {len(seen)} distinct {split} {task} prompts")
    return records


def write(records: Iterable[PromptRecord], path: str | pathlib.Path) -> None:
    text = "".join(r.to_json() + "\n" for r in records)
    pathlib.Path(path).write_text(text, encoding="utf-8")


def parse_record(line: str, where: str) -> PromptRecord:
    """One prompt-file line; ValueError naming `where` (file:line) if it is malformed."""
    try:
        data = json.loads(line)
        if not isinstance(data, dict):
            raise ValueError(f"expected a JSON object, got {type(data).__name__}")
        missing = sorted({"prompt", "task", "spec"} - set(data))
        if missing:
            raise ValueError(f"missing keys {missing}")
        task = check_task(data["task"])
        spec = dataclasses.replace(PromptSpec.from_dict(data["spec"]), task=task)
        split = splits.check_split(data.get("split", "train"))
        if not isinstance(data["prompt"], str):
            raise ValueError(f"'prompt' must be a string, got {data['prompt']!r}")
        stated = grammar.parse_prompt(data["prompt"])
        if stated != spec.constraints():
            raise ValueError(f"'spec' {data['spec']} is not what the prompt states: {stated}")
    except ValueError as e:  # json.JSONDecodeError is a ValueError too
        raise ValueError(f"{where}: malformed prompt line: {e}") from None
    return PromptRecord(data["prompt"], split, spec)


def read(path: str | pathlib.Path) -> list[PromptRecord]:
    """The records of a prompt file; blank lines are skipped."""
    path = pathlib.Path(path)
    lines = path.read_text(encoding="utf-8").splitlines()
    return [parse_record(line, f"{path}:{i}") for i, line in enumerate(lines, 1) if line.strip()]


def packaged_path(split: str) -> pathlib.Path:
    """Where the package keeps the split's prompt file."""
    splits.check_split(split)
    return pathlib.Path(str(importlib.resources.files(__package__) / "prompts" / f"{split}.jsonl"))


def load_prompts(split: str = "train", task: str | None = None) -> list[PromptRecord]:
    """The checked-in evaluation prompts of a split, all tasks or one."""
    records = read(packaged_path(split))
    if task is not None:
        check_task(task)
        records = [r for r in records if r.task == task]
    return records


def first_per_task(split: str, per_task: int, tasks=()) -> list[PromptRecord]:
    """The first `per_task` evaluation prompts of each task of a split (of each of `tasks`,
    if given), in file order."""
    for task in tasks:
        check_task(task)
    taken: dict[str, int] = {}
    out = []
    for record in load_prompts(split):
        if (not tasks or record.task in tasks) and taken.get(record.task, 0) < per_task:
            taken[record.task] = taken.get(record.task, 0) + 1
            out.append(record)
    return out
