"""The fixed evaluation prompts: one JSONL file per prompt set, checked in with the package.

The prompt sets (`PROMPT_SETS`: name -> the combinations' split, the wording set):

    train            training combinations, the grammar's wordings
    heldout          held-out combinations, the grammar's wordings
    heldout_wording  the same held-out prompts, line for line (same spec, same task),
                     worded with the held-out templates of `wordings.py` only
    validation       other held-out prompts (`VALIDATION_PER_TASK` a task, new draws in
                     held-out wordings, no text shared with `heldout_wording`; the tasks
                     with few held-out specs, single objects and colours, share specs with
                     it): what checkpoints and settings are chosen on, so that the
                     reported sets stay unseen by the choice

`imagen_jax/shapes/prompts/<set>.jsonl` hold the prompts of each of the six tasks, one JSON
object per line:

    {"prompt": "a red circle to the left of a blue star", "task": "position",
     "split": "train", "spec": {"objects": [...], "relation": "left of"}}

`spec` is the prompt's constraints (`PromptSpec.to_dict()`, without the task), `task` what
is scored, `split` the combinations' split; a record worded outside the grammar also has
`"wording": "heldout"`. Within a task no prompt repeats.
`python -m imagen_jax.shapes.make_prompts` writes the files from `generate(name)`, which is
deterministic (seeded by set and task); a test checks that the files in the package are
exactly what it writes.
"""

from __future__ import annotations

import dataclasses
import importlib.resources
import json
import pathlib
from collections.abc import Iterable

import numpy as np

from imagen_jax.shapes import grammar, splits, tasks, wordings
from imagen_jax.shapes.spec import TASKS, PromptSpec, check_task

PROMPTS_PER_TASK = 60
VALIDATION_PER_TASK = 20
SEED = 20240611
_MAX_DRAWS = 100_000
PROMPT_SETS = {
    "train": ("train", "grammar"),
    "heldout": ("heldout", "grammar"),
    "heldout_wording": ("heldout", "heldout"),
    "validation": ("heldout", "heldout"),
}


def check_prompt_set(name: str) -> str:
    if name not in PROMPT_SETS:
        raise ValueError(f"unknown prompt set {name!r}; expected one of {tuple(PROMPT_SETS)}")
    return name


@dataclasses.dataclass(frozen=True)
class PromptRecord:
    """One evaluation prompt: its text, split and spec (whose task is what is scored)."""

    prompt: str
    split: str
    spec: PromptSpec
    wording: str = "grammar"

    @property
    def task(self) -> str:
        return self.spec.task

    def to_json(self) -> str:
        data = {
            "prompt": self.prompt,
            "task": self.task,
            "split": self.split,
            "spec": self.spec.constraints().to_dict(),
        }
        if self.wording != "grammar":
            data["wording"] = self.wording
        return json.dumps(data)


def _draw(split: str, wording: str, per_task: int, stream: int, exclude=frozenset()):
    """`per_task` distinct prompts a task of new specs, worded in `wording`, none of whose
    texts is in `exclude`."""
    records = []
    for t, task in enumerate(TASKS):
        rng = np.random.default_rng([SEED, stream, t])
        seen: set[str] = set()
        for _ in range(_MAX_DRAWS):
            if len(seen) == per_task:
                break
            spec = tasks.sample_prompt_spec(rng, task, split)
            text = wordings.caption(spec, rng, wording)
            if text not in seen and text not in exclude:
                seen.add(text)
                records.append(PromptRecord(text, split, spec, wording))
        else:
            raise RuntimeError(f"found only {len(seen)} distinct {split} {task} prompts")
    return records


def _reword(records: list[PromptRecord], wording: str, stream: int) -> list[PromptRecord]:
    """The records' specs, line for line, worded again in `wording` (distinct in a task)."""
    out, seen = [], set()
    for i, record in enumerate(records):
        rng = np.random.default_rng([SEED, stream, i])
        for _ in range(_MAX_DRAWS):
            text = wordings.caption(record.spec.constraints(), rng, wording)
            if (record.task, text) not in seen:
                break
        else:
            raise RuntimeError(f"cannot word {record.prompt!r} in a new way")
        seen.add((record.task, text))
        out.append(PromptRecord(text, record.split, record.spec, wording))
    return out


def generate(name: str) -> list[PromptRecord]:
    """A prompt set's prompts, task after task, in a fixed order."""
    split, wording = PROMPT_SETS[check_prompt_set(name)]
    if name in splits.SPLITS:  # the combinations' own sets, in the grammar's wordings
        return _draw(split, wording, PROMPTS_PER_TASK, splits.SPLITS.index(split))
    reworded = _reword(generate("heldout"), wording, stream=2)
    if name == "heldout_wording":
        return reworded
    exclude = frozenset(r.prompt for r in reworded)
    return _draw(split, wording, VALIDATION_PER_TASK, stream=3, exclude=exclude)


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
        wording = wordings.check_wordings(data.get("wording", "grammar"))
        stated = grammar.parse_prompt(data["prompt"])
        if stated.canonical() != spec.constraints().canonical():
            raise ValueError(f"'spec' {data['spec']} is not what the prompt states: {stated}")
    except ValueError as e:  # json.JSONDecodeError is a ValueError too
        raise ValueError(f"{where}: malformed prompt line: {e}") from None
    return PromptRecord(data["prompt"], split, spec, wording)


def read(path: str | pathlib.Path) -> list[PromptRecord]:
    """The records of a prompt file; blank lines are skipped."""
    path = pathlib.Path(path)
    lines = path.read_text(encoding="utf-8").splitlines()
    return [parse_record(line, f"{path}:{i}") for i, line in enumerate(lines, 1) if line.strip()]


def packaged_path(name: str) -> pathlib.Path:
    """Where the package keeps a prompt set's file."""
    check_prompt_set(name)
    return pathlib.Path(str(importlib.resources.files(__package__) / "prompts" / f"{name}.jsonl"))


def load_prompts(name: str = "train", task: str | None = None) -> list[PromptRecord]:
    """The checked-in evaluation prompts of a prompt set, all tasks or one."""
    records = read(packaged_path(name))
    if task is not None:
        check_task(task)
        records = [r for r in records if r.task == task]
    return records


def first_per_task(name: str, per_task: int, tasks=()) -> list[PromptRecord]:
    """The first `per_task` evaluation prompts of each task of a prompt set (of each of
    `tasks`, if given), in file order."""
    for task in tasks:
        check_task(task)
    taken: dict[str, int] = {}
    out = []
    for record in load_prompts(name):
        if (not tasks or record.task in tasks) and taken.get(record.task, 0) < per_task:
            taken[record.task] = taken.get(record.task, 0) + 1
            out.append(record)
    return out
