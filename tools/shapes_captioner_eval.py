"""Parse accuracy of a shapes captioner, per kind of scene, on both splits of the shapes domain.

    python tools/shapes_captioner_eval.py                                # the shipped one
    python tools/shapes_captioner_eval.py --captioner=runs/shapes_captioner/captioner \
        --per_task=200 --out=/tmp/captioner_eval.json

For each split (`train`; `heldout`: every scene shows a colour-shape pair or a layout that
training never showed, `imagen_jax/shapes/splits.py`) and each of the six kinds of scene
(`shapes.TASKS`), `--per_task` scenes are drawn as the shapes data source draws them (scene
i from the generator seeded by (seed, i); `--seed` differs from the training data's 0),
rendered at the captioner's input size and captioned greedily. A caption is judged by
`imagen_jax.evaluation.captioning.judge` against the renderer's exact scene: parsed by
`shapes.grammar.parse_prompt`, every object, colour, size, count, relation and background it
states must hold, and its counts of each named shape must be exact; unparseable = wrong.

CIDEr-D (`evaluation.captioning.cider_d`, over each split's scenes together) against
`--references` wordings of each scene's spec in the grammar the captioner was trained on
(`shapes.wordings.caption`, each from its own generator): the consensus measure of the
captioning literature, in the domain's own words.

Prints one table (accuracy per kind of scene and overall, and CIDEr-D, per split), a few
wrong captions with why, and writes the numbers as JSON with `--out`.
"""

from __future__ import annotations

import json

import numpy as np
from absl import app, flags

from imagen_jax.evaluation import captioning as caption_eval
from imagen_jax.pipelines import captioning
from imagen_jax.shapes import TASKS, wordings
from imagen_jax.shapes.render import render
from imagen_jax.shapes.tasks import sample_example

flags.DEFINE_string("captioner", "checkpoints/shapes/captioner", "A GIT directory.")
flags.DEFINE_integer("per_task", 100, "Scenes per kind of scene and split.")
flags.DEFINE_list("splits", ["heldout", "train"], "Splits to measure.")
flags.DEFINE_integer("seed", 1, "Scene i is drawn from (seed, i); training drew from seed 0.")
flags.DEFINE_integer(
    "max_length", None, "Greedy decoding: tokens, [CLS] included (default: the model's)."
)
flags.DEFINE_integer("batch_size", 64, "Images per compiled batch.")
flags.DEFINE_integer("show", 3, "Wrong captions shown per split.")
flags.DEFINE_string("out", "", "Write the results as JSON here.")
flags.DEFINE_integer("references", 5, "Reference wordings per scene for CIDEr-D.")


def scenes(split: str, task: str, n: int, seed: int, resolution: int, references: int = 5):
    """(image, record) of scenes 0..n-1 of a task: as `data.ShapesSource(task=...)` draws
    them, with the scene that `evaluation.captioning.judge` checks captions against and
    `references` grammar wordings of its spec."""
    for i in range(n):
        example = sample_example(np.random.default_rng([seed, i]), task=task, split=split)
        refs = [
            wordings.caption(example.spec, np.random.default_rng([seed, i, k]), "grammar")
            for k in range(references)
        ]
        record = {
            "scene": example.scene.to_dict(), "task": task, "true": example.caption,
            "references": refs,
        }  # fmt: skip
        yield render(example.scene, resolution), record


def measure(
    captioner, split: str, per_task: int, seed: int, references: int = 5
) -> tuple[dict, list]:
    """(summary of `evaluation.captioning.summarize` with "cider_d", [(caption, record,
    verdict)])."""
    resolution = captioner.processor.output_size(1, 1)[0]
    images, records = [], []
    for task in TASKS:
        for image, record in scenes(split, task, per_task, seed, resolution, references):
            images.append(image)
            records.append(record)
    captions = captioner(images)
    verdicts = [caption_eval.judge(c, r) for c, r in zip(captions, records, strict=True)]
    summary = caption_eval.summarize(verdicts)
    summary["cider_d"], _ = caption_eval.cider_d(captions, [r["references"] for r in records])
    return summary, list(zip(captions, records, verdicts, strict=True))


def format_table(results: dict) -> str:
    header = "| split | " + " | ".join(TASKS) + " | overall | CIDEr-D | captions |"
    lines = [header, "|" + " --- |" * (len(TASKS) + 4)]
    for split, summary in results.items():
        cells = [f"{summary['tasks'][t]['accuracy']:.3f}" for t in TASKS]
        lines.append(
            f"| {split} | " + " | ".join(cells) + f" | **{summary['overall']:.3f}** | "
            f"{summary['cider_d']:.3f} | {summary['judged']} |"
        )
    return "\n".join(lines)


def main(argv):
    del argv
    f = flags.FLAGS
    captioner = captioning.load_captioner(
        f.captioner, max_length=f.max_length, batch_size=f.batch_size
    )
    results = {}
    for split in f.splits:
        summary, rows = measure(captioner, split, f.per_task, f.seed, f.references)
        results[split] = summary
        wrong = [row for row in rows if row[2].status == "wrong"][: f.show]
        for caption, record, verdict in wrong:
            print(f"[{split}/{record['task']}] {caption!r} (drawn as {record['true']!r}): "
                  f"{'; '.join(verdict.reasons)}")  # fmt: skip
    print(format_table(results))
    if f.out:
        with open(f.out, "w") as out:
            json.dump({"captioner": f.captioner, "per_task": f.per_task, "seed": f.seed,
                       "references": f.references, "results": results}, out, indent=2)  # fmt: skip


if __name__ == "__main__":
    app.run(main)
