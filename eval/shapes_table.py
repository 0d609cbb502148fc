"""The results table of the shipped shapes cascade (its card), from the JSON lines that
`eval/shapes_results.sh` appends (`docs/results/shapes_cascade.jsonl`), as Markdown.

    python eval/shapes_table.py [docs/results/shapes_cascade.jsonl]

One row per line, in file order; a name that appears twice keeps its last line (a rerun).
Then, for the lines that carry them, what the failed images got wrong (each task's failures
by `scorer.failure_kind`).
"""

import json
import sys

TASKS = ("single_object", "two_object", "counting", "colors", "position", "color_attr")
HEADER = (
    "| run | prompts | images | single | two objects | counting | colours | position | "
    "colour attr. | overall | s / image |"
)

FAILURE_HEADER = (
    "| run | prompts | single | two objects | counting | colours | position | colour attr. |"
)
SAMPLER_LABELS = {
    "ddim": "DDIM",
    "dpmpp_2m": "DPM-Solver++(2M)",
    "dpmpp_3m": "DPM-Solver++(3M)",
    "unipc": "UniPC",
    "ddpm": "DDPM",
}
MAIN_ROWS = (
    "cascade_heldout",
    "cascade_heldout_wording",
    "cascade_train",
    "base_heldout",
    "cascade_heldout_all",
)


def describe(name: str) -> str:
    """A row label for a sweep point's name (as shapes_results.sh names them)."""
    fixed = {
        "cascade_heldout": "cascade, shipped settings",
        "cascade_heldout_wording": "cascade, shipped settings",
        "cascade_heldout_all": "cascade, shipped settings, all 60 prompts a task",
        "cascade_train": "cascade, shipped settings",
        "base_heldout": "base stage alone (32 px)",
        "sr_shipped": "cascade, shipped settings (sweep prompts)",
    }
    if name in fixed:
        return fixed[name]
    if name.startswith("guidance_"):
        return f"base, guidance {name.removeprefix('guidance_')}"
    if name.startswith("layout_scale_"):
        return f"base, layout scale {name.removeprefix('layout_scale_')}"
    if name.startswith("sr_"):
        key, value = name.removeprefix("sr_").rsplit("_", 1)
        label = {"aug_level": "augmentation level", "guidance_scale": "guidance"}.get(key, key)
        return f"cascade, SR {label} {value}"
    if name.startswith("sampler_"):
        sampler, steps = name.removeprefix("sampler_").rsplit("_", 1)
        label = SAMPLER_LABELS.get(sampler)
        return f"base, {label or sampler} {steps} steps"
    return name


def latest(lines: list[dict]) -> list[dict]:
    """The last line of each name, in the order the names first appear."""
    by_name = {}
    for line in lines:
        by_name[line["name"]] = line  # dicts keep the first position, take the last value
    return list(by_name.values())


def rows(lines: list[dict]) -> list[str]:
    out = [HEADER, "| --- " * 11 + "|"]
    for line in latest(lines):
        tasks = " | ".join(f"{line['tasks'][t]:.2f}" for t in TASKS)
        out.append(
            f"| {describe(line['name'])} | {line['split']} | {line['images']} | {tasks} | "
            f"**{line['overall']:.3f}** | {line['seconds_per_image']:.2f} |"
        )
    return out


def failure_rows(lines: list[dict], names=MAIN_ROWS) -> list[str]:
    """Per task, the failed images by kind, for the named lines that carry failures."""
    chosen = [line for line in latest(lines) if line["name"] in names and "failures" in line]
    if not chosen:
        return []
    out = [FAILURE_HEADER, "| --- " * 8 + "|"]
    for line in chosen:
        cells = []
        for task in TASKS:
            kinds = line["failures"].get(task, {})
            cells.append(", ".join(f"{kind} {n}" for kind, n in kinds.items()) or "none")
        out.append(f"| {describe(line['name'])} | {line['split']} | {' | '.join(cells)} |")
    return out


def main(argv: list[str]) -> None:
    path = argv[1] if len(argv) > 1 else "docs/results/shapes_cascade.jsonl"
    with open(path, encoding="utf-8") as f:
        lines = [json.loads(text) for text in f if text.strip()]
    if not lines:
        raise SystemExit(f"{path}: no results lines")
    print("\n".join(rows(lines)))
    failures = failure_rows(lines)
    if failures:
        print("\nFailed images by kind (scorer.failure_kind):\n")
        print("\n".join(failures))


if __name__ == "__main__":
    main(sys.argv)
