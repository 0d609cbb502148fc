"""The README's results table of the shipped shapes cascade, from the JSON lines that
`eval/shapes_results.sh` appends (`docs/results/shapes.jsonl`), as Markdown.

    python eval/shapes_table.py [docs/results/shapes.jsonl]

One row per line, in file order; a name that appears twice keeps its last line (a rerun).
"""

import json
import sys

TASKS = ("single_object", "two_object", "counting", "colors", "position", "color_attr")
HEADER = (
    "| run | prompts | images | single | two objects | counting | colours | position | "
    "colour attr. | overall | s / image |"
)


def describe(name: str) -> str:
    """A row label for a sweep point's name (as shapes_results.sh names them)."""
    fixed = {
        "cascade_heldout": "cascade, shipped settings",
        "cascade_train": "cascade, shipped settings",
        "base_heldout": "base stage alone (32 px)",
    }
    if name in fixed:
        return fixed[name]
    if name.startswith("guidance_"):
        return f"base, guidance {name.removeprefix('guidance_')}"
    if name.startswith("sampler_"):
        sampler, steps = name.removeprefix("sampler_").rsplit("_", 1)
        label = {"ddim": "DDIM", "dpmpp_2m": "DPM-Solver++(2M)", "ddpm": "DDPM"}.get(sampler)
        return f"base, {label or sampler} {steps} steps"
    return name


def rows(lines: list[dict]) -> list[str]:
    latest = {}
    for line in lines:
        latest[line["name"]] = line  # dicts keep the first position, take the last value
    out = [HEADER, "| --- " * 11 + "|"]
    for line in latest.values():
        tasks = " | ".join(f"{line['tasks'][t]:.2f}" for t in TASKS)
        out.append(
            f"| {describe(line['name'])} | {line['split']} | {line['images']} | {tasks} | "
            f"**{line['overall']:.3f}** | {line['seconds_per_image']:.2f} |"
        )
    return out


def main(argv: list[str]) -> None:
    path = argv[1] if len(argv) > 1 else "docs/results/shapes.jsonl"
    with open(path, encoding="utf-8") as f:
        lines = [json.loads(text) for text in f if text.strip()]
    if not lines:
        raise SystemExit(f"{path}: no results lines")
    print("\n".join(rows(lines)))


if __name__ == "__main__":
    main(sys.argv)
