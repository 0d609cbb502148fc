"""Samples a cascade on the shapes evaluation prompts and scores it: per-task compositional
accuracy and seconds per image, as one JSON line.

    python eval/shapes_cascade.py --split=heldout --outdir=runs/eval/heldout \\
        [--stage=DIR ...] [--base_only] [--set=0.sampler=dpmpp_2m --set=0.steps=20] \\
        [--images_per_prompt=4] [--prompts_per_task=60] [--tasks=position,color_attr] \\
        [--height=48 --width=88] [--results=docs/results/x.jsonl]

With no --stage it evaluates the shipped default model (`checkpoints/shapes/`);
--base_only keeps the first stage (32 px images). The prompts are a prompt set of the
package (`imagen_jax/shapes/prompts/<set>.jsonl`: train and heldout in the grammar's
wordings, 60 per task; heldout_wording, the held-out prompts in held-out wordings; and
validation, 20 per task, for choosing checkpoints and settings), the first
--prompts_per_task of each task (of each of --tasks: overall is then their mean).
Images are written like sample.py writes them (resumable: a rerun with the same --outdir
scores what is there and makes only the rest); seconds per image are timed after a warm-up
batch that compiles the stages.
"""

import json
import os
import platform
import tempfile

import jax
from absl import app, flags

from imagen_jax import logs
from imagen_jax.diffusion.config import sample_config
from imagen_jax.pipelines import jobs, sampling
from imagen_jax.shapes import accuracy, prompt_sets

flags.DEFINE_multi_string(
    "stage", [], "Stage directories, base first (none: the shipped model, checkpoints/shapes/)."
)
flags.DEFINE_bool("base_only", False, "Sample the first stage only.")
flags.DEFINE_enum(
    "split", "heldout", list(prompt_sets.PROMPT_SETS), "The prompt set (see the docstring)."
)
flags.DEFINE_integer("prompts_per_task", 60, "The first N prompts of each task.")
flags.DEFINE_list("tasks", [], "Only these tasks' prompts (default: all six).")
flags.DEFINE_integer("images_per_prompt", 4, "Images per prompt.")
flags.DEFINE_integer("seed", 0, "Job seed.")
flags.DEFINE_integer("batch_size", 16, "Images per compiled call.")
flags.DEFINE_multi_string(
    "set",
    [],
    "STAGE.KEY=VALUE: a stage's sample setting (STAGE 0 is the base), KEY one of "
    f"{', '.join([*sample_config().keys(), *sampling.STAGE_KEYS])}.",
)
flags.DEFINE_string("outdir", None, "Where the images and manifest go.")
flags.DEFINE_string("results", None, "Also append the JSON line to this file.")
flags.DEFINE_string("name", "", "A label for the JSON line (e.g. the sweep point).")
flags.DEFINE_integer("height", None, "Image height (default: the last stage's square).")
flags.DEFINE_integer("width", None, "Image width (as --height); wide images score alike.")
flags.mark_flag_as_required("outdir")


def prompt_entries(split: str, per_task: int, tasks=()) -> list[jobs.PromptEntry]:
    """The first `per_task` evaluation prompts of each task (of each of `tasks`, if given),
    carrying what the scorer needs."""
    return [
        jobs.PromptEntry(r.prompt, extra=dict(task=r.task, split=r.split, spec=r.spec.to_dict()))
        for r in prompt_sets.first_per_task(split, per_task, tasks)
    ]


def main(argv):
    del argv
    logs.quiet_logs()
    f = flags.FLAGS
    stage_dirs = list(f.stage) or sampling.shipped_stages()
    if f.base_only:
        stage_dirs = stage_dirs[:1]
    cascade, loaded = sampling.load_cascade(stage_dirs, f.set, mesh=jobs.local_mesh(f.batch_size))
    if f.height is not None or f.width is not None:
        cascade.set_size(f.height, f.width)
    entries = prompt_entries(f.split, f.prompts_per_task, f.tasks)
    job = dict(images_per_prompt=f.images_per_prompt, seed=f.seed, batch_size=f.batch_size)
    settings = jobs.stage_settings(loaded, cascade)  # sizes included
    with tempfile.TemporaryDirectory() as warm:  # compiles every stage once
        jobs.run_job(cascade, entries[:1], warm, **job, settings=settings, progress=False)
    summary = jobs.run_job(cascade, entries, f.outdir, **job, settings=settings)
    table = accuracy.evaluate_folder(f.outdir)
    print(accuracy.format_table(table))
    scored = table["splits"][prompt_sets.PROMPT_SETS[f.split][0]]  # the combinations' split
    line = dict(
        name=f.name,
        split=f.split,
        prompts=len(entries),
        images=len(entries) * f.images_per_prompt,
        size=[f.height, f.width] if f.height or f.width else None,
        overall=scored["overall"],
        tasks={k: v["accuracy"] for k, v in scored["tasks"].items()},
        failures={k: v["failures"] for k, v in scored["tasks"].items()},
        seconds_per_image=summary["seconds"] / summary["made"] if summary["made"] else None,
        stages=sampling.stage_summaries(loaded),
        overrides=list(f.set),
        device=jax.devices()[0].device_kind,
        cpu_count=os.cpu_count(),
        machine=platform.machine(),
    )
    print(json.dumps(line))
    if f.results:
        with open(f.results, "a", encoding="utf-8") as out:
            out.write(json.dumps(line) + "\n")


if __name__ == "__main__":
    app.run(main)
