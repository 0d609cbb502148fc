"""Inpainting accuracy of a shapes cascade: one object of a rendered scene repainted to a new
colour or shape by prompt, with and without RePaint's resampling, as one JSON line.

    python eval/shapes_inpainting.py [--stage=DIR ...] [--per_task=40] \\
        [--kinds=color,shape] [--splits=train,heldout] [--repaint=0:1,5:4] \\
        [--results=docs/results/shapes_inpainting.jsonl] [--picture=docs/shapes_inpainting.png]

With no --stage it runs the shipped default model (`checkpoints/shapes/`). The tasks are
`imagen_jax.shapes.edits`' (a color_attr training scene, the mask over one object, the
prompt naming it changed; split heldout: the new colour-shape pair is held out), --per_task
of each (kind, split), drawn from --seed, at the cascade's final size. Every --repaint entry
JUMP:RESAMPLE is one setting (0:1 = plain masked sampling, RePaint off). An image is right
when the shapes scorer finds the edited prompt true of it (the color_attr checks: both
objects, each in its colour). Also reported: the mean and max absolute error (uint8 levels)
outside the mask, which masked sampling keeps exactly at the last stage; the scorer on the
untouched scenes against the edited prompts (it must fail them: the floor) and on the
rendered targets (it must pass them: the ceiling); and seconds per image.
"""

import json
import os
import platform
import time

import jax
import numpy as np
from absl import app, flags
from PIL import Image

from imagen_jax import logs
from imagen_jax.diffusion.config import sample_config
from imagen_jax.images import image_rows
from imagen_jax.pipelines import jobs, sampling
from imagen_jax.pipelines.cascade import Edit
from imagen_jax.shapes import edits
from imagen_jax.shapes.render import render
from imagen_jax.shapes.scorer import score

flags.DEFINE_multi_string(
    "stage", [], "Stage directories, base first (none: the shipped model, checkpoints/shapes/)."
)
flags.DEFINE_integer("per_task", 40, "Tasks per (kind, split).")
flags.DEFINE_list("kinds", list(edits.KINDS), "What the prompt changes: color, shape.")
flags.DEFINE_list("splits", list(edits.EDIT_SPLITS), "The new pair's split: train, heldout.")
flags.DEFINE_list("repaint", ["0:1", "5:4"], "JUMP:RESAMPLE settings (0:1 = RePaint off).")
flags.DEFINE_integer("seed", 0, "The tasks' and the samples' seed.")
flags.DEFINE_integer("batch_size", 16, "Images per compiled call.")
flags.DEFINE_multi_string(
    "set",
    [],
    "STAGE.KEY=VALUE: a stage's sample setting (STAGE 0 is the base), KEY one of "
    f"{', '.join([*sample_config().keys(), *sampling.STAGE_KEYS])}.",
)
flags.DEFINE_string("results", None, "Also append the JSON line to this file.")
flags.DEFINE_string("picture", None, "Also draw the first tasks (scene, mask, each setting).")
flags.DEFINE_integer("picture_rows", 6, "Tasks in the picture.")


def parse_repaint(values) -> list[tuple[int, int]]:
    out = []
    for value in values:
        try:
            jump, resample = (int(v) for v in value.split(":"))
        except ValueError:
            raise ValueError(f"--repaint={value!r}: expected JUMP:RESAMPLE, e.g. 5:4") from None
        out.append((jump, resample))
    return out


def make_tasks(kinds, split_names, per_task, seed, resolution):
    tasks = []
    for k, kind in enumerate(kinds):
        for s, split in enumerate(split_names):
            rng = np.random.default_rng([seed, k, s])
            tasks += [
                edits.inpainting_task(rng, kind=kind, split=split, resolution=resolution)
                for _ in range(per_task)
            ]
    return tasks


def run_setting(cascade, tasks, seed, batch_size, jump, resample):
    """The final images (uint8) of every task under one RePaint setting, and seconds."""
    images, start = [], time.perf_counter()
    for lo in range(0, len(tasks), batch_size):
        batch = tasks[lo : lo + batch_size]
        pad = batch_size - len(batch)  # one compiled batch size; the padding is dropped
        batch_full = batch + [batch[-1]] * pad
        items = [
            jobs.WorkItem(lo + i, 0, jobs.PromptEntry(t.prompt)) for i, t in enumerate(batch_full)
        ]
        edit = Edit(
            image=np.stack([t.image for t in batch_full]).astype(np.float32) / 127.5 - 1.0,
            mask=np.stack([t.mask for t in batch_full]),
            repaint_jump=jump,
            repaint_resample=resample,
        )
        out = cascade(items, seed, edit=edit)[-1]
        images.extend(out[: len(batch)])
    return images, time.perf_counter() - start


def summarize(tasks, images) -> dict:
    right = np.asarray([score(im, t.spec).passed for t, im in zip(tasks, images, strict=True)])
    errors = [
        np.abs(im.astype(np.int64) - t.image)[t.keep] for t, im in zip(tasks, images, strict=True)
    ]
    groups = {}
    for i, t in enumerate(tasks):
        groups.setdefault(f"{t.kind}/{t.split}", []).append(i)
    return dict(
        accuracy=float(right.mean()),
        by_task={name: float(right[index].mean()) for name, index in groups.items()},
        kept_error_mean=float(np.mean([e.mean() for e in errors])),
        kept_error_max=int(max(e.max() for e in errors)),
    )


def draw_picture(path, tasks, results, rows):
    """One row per task: the scene, the scene with the mask in grey, each setting's image."""
    lines = []
    for i, t in enumerate(tasks[:rows]):
        shown = np.where(t.keep[..., None], t.image, 128).astype(np.uint8)  # mask in grey
        lines.append(np.stack([t.image, shown, *(r["images"][i] for r in results)]))
    grid = image_rows(lines)
    Image.fromarray(grid).resize((grid.shape[1] * 2, grid.shape[0] * 2), Image.NEAREST).save(path)


def main(argv):
    del argv
    logs.quiet_logs()
    f = flags.FLAGS
    settings = parse_repaint(f.repaint)
    stage_dirs = list(f.stage) or sampling.shipped_stages()
    cascade, loaded = sampling.load_cascade(stage_dirs, f.set, mesh=jobs.local_mesh(f.batch_size))
    resolution = cascade.sizes[-1][0]
    tasks = make_tasks(f.kinds, f.splits, f.per_task, f.seed, resolution)
    floor = np.mean([score(t.image, t.spec).passed for t in tasks])
    ceiling = np.mean([score(render(t.target, resolution), t.spec).passed for t in tasks])
    run_setting(cascade, tasks[:1], f.seed, f.batch_size, *settings[0])  # compiles
    results = []
    for jump, resample in settings:
        if (jump, resample) != settings[0]:
            run_setting(cascade, tasks[:1], f.seed, f.batch_size, jump, resample)
        images, seconds = run_setting(cascade, tasks, f.seed, f.batch_size, jump, resample)
        line = dict(repaint_jump=jump, repaint_resample=resample, **summarize(tasks, images))
        line["seconds_per_image"] = seconds / len(tasks)
        print(json.dumps(line))
        results.append(dict(line, images=images))
    out = dict(
        tasks=len(tasks),
        per_task=f.per_task,
        kinds=list(f.kinds),
        splits=list(f.splits),
        seed=f.seed,
        scorer_on_untouched_scenes=float(floor),
        scorer_on_targets=float(ceiling),
        settings=[{k: v for k, v in r.items() if k != "images"} for r in results],
        stages=sampling.stage_summaries(loaded),
        overrides=list(f.set),
        device=jax.devices()[0].device_kind,
        cpu_count=os.cpu_count(),
        machine=platform.machine(),
    )
    print(json.dumps(out))
    if f.results:
        with open(f.results, "a", encoding="utf-8") as fh:
            fh.write(json.dumps(out) + "\n")
    if f.picture:
        draw_picture(f.picture, tasks, results, f.picture_rows)


if __name__ == "__main__":
    app.run(main)
