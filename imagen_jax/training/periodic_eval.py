"""Periodic evaluation inside a training run: sample the evaluation prompts from the EMA
weights, score them with the configured evaluators, and log the metrics.

    evaluation = PeriodicEvaluation(config, net, mesh, encoder, workdir, latent=latent)
    metrics = evaluation(step, state.ema_params, rest)  # {"eval/compositional/...": ...}

Sampling goes through the same pipeline as sample.py (`pipelines.cascade.Cascade`, the
stage's `diffusion` and `sample` settings), compiled once for the run: each evaluation only
swaps in the current EMA weights. A latent stage (`model.family` "mmdit" or "sd_unet";
`latent`, the run's `latent_space.LatentSpace`) is sampled as sample.py samples its exported
stage directory (`stages.LatentStage`): latents, then decoded by the run's frozen VAE (two
compiled programs, each compiled once). Image (p, i) of the prompt set always gets the noise of
(evals.seed, p, i), so successive evaluations differ only by the weights, and a run on any
number of devices or hosts samples the same images. Every process gets all images (gathered
across hosts) and computes the same metrics; process 0 writes
`workdir/evals/step_<step>.json` (metrics and what each evaluator was) and a contact sheet
`step_<step>.png` of the images.

Only base stages (pixel or latent) are evaluated this way: a super-resolution stage's score
depends on the low-resolution images it is given, so evaluate a whole cascade with
`eval/shapes_cascade.py`.
"""

from __future__ import annotations

import json
import os
from typing import Any

import jax
import ml_collections
from absl import logging

from imagen_jax import parallel
from imagen_jax.evaluation import evaluators as evaluators_lib
from imagen_jax.pipelines import cascade as cascade_lib
from imagen_jax.pipelines import jobs
from imagen_jax.shapes import prompt_sets
from imagen_jax.shapes.spec import TASKS
from imagen_jax.stages import LATENT_FAMILIES, LatentStage, Stage

SHAPES_PREFIX = "shapes:"


def eval_prompts(evals: ml_collections.ConfigDict) -> tuple[list[jobs.PromptEntry], list[dict]]:
    """(prompt entries, their records) of `evals.prompts`: a shapes evaluation split
    ("shapes:heldout", "shapes:train"; the first `evals.prompts_per_task` of each task) or
    a prompt file."""
    source = evals.prompts
    if not source:
        raise ValueError(
            "evals.every > 0 but evals.prompts is empty: give a prompt file (.txt or .jsonl) "
            "or a shapes split ('shapes:heldout', 'shapes:train')"
        )
    if source.startswith(SHAPES_PREFIX):
        split = source[len(SHAPES_PREFIX) :]
        if split not in ("train", "heldout"):
            raise ValueError(
                f"evals.prompts={source!r}: the shapes splits are 'shapes:train' and "
                "'shapes:heldout'"
            )
        n = int(evals.prompts_per_task)
        if n < 1:
            raise ValueError(f"evals.prompts_per_task must be >= 1, got {n}")
        records = []
        for task in TASKS:
            records += [json.loads(r.to_json()) for r in prompt_sets.load_prompts(split, task)[:n]]
        entries = [jobs.PromptEntry(r["prompt"], extra=r) for r in records]
        return entries, records
    entries = jobs.read_prompts(source)
    return entries, [{"prompt": e.prompt, **e.extra} for e in entries]


def _stage(config, net, workdir, latent=None) -> Stage | LatentStage:
    """The stage as the sampling pipeline sees it, with abstract weights (set per call)."""
    if net.family in LATENT_FAMILIES:
        return LatentStage(
            path=f"{workdir} (EMA weights)",
            family=net.family,
            network_config=net.cfg,
            model=net.merge(net.abstract_params, net.abstract_rest),
            vae=latent.model,
            diffusion=config.diffusion,
            sample=config.sample,
            resolution=config.model.resolution,
            text=config.text.to_dict(),
            identity=dict(workdir=workdir),
        )
    return Stage(
        path=f"{workdir} (EMA weights)",
        unet=net.cfg,
        model=net.merge(net.abstract_params, net.abstract_rest),
        diffusion=config.diffusion,
        sample=config.sample,
        resolution=config.model.resolution,
        low_resolution=0,
        aug_level=0.0,
        text=config.text.to_dict(),
        identity=dict(workdir=workdir),
    )


class PeriodicEvaluation:
    """`evaluation(step, ema_params, rest) -> metrics` (names prefixed by "eval/")."""

    def __init__(self, config, net, mesh, encoder, workdir: str, latent=None):
        """latent: the frozen VAE of a latent stage (`latent_space.LatentSpace`)."""
        evals = config.evals
        if net.family not in ("imagen", *LATENT_FAMILIES):
            raise ValueError(
                f"evals.every is set on a model.family={net.family!r} stage: periodic "
                "evaluation samples diffusion base stages only (imagen, "
                f"{', '.join(LATENT_FAMILIES)}); set evals.every=0"
            )
        if net.family in LATENT_FAMILIES and latent is None:
            raise ValueError(f"a {net.family} stage is evaluated through its VAE: give `latent`")
        if net.low_res:
            raise ValueError(
                "evals.every is set on a super-resolution stage: periodic evaluation samples "
                "base stages only (evaluate a cascade with eval/shapes_cascade.py)"
            )
        self.workdir = workdir
        self.seed = int(evals.seed)
        self.evaluators = evaluators_lib.make_evaluators(evals)
        entries, records = eval_prompts(evals)
        self.items = jobs.plan(entries, int(evals.images_per_prompt))
        self.records = [records[it.prompt_index] for it in self.items]
        rows = parallel.data_parallel_size(mesh)
        batch = int(evals.batch_size or config.data.batch_size)
        self.batch_size = -(-batch // rows) * rows  # a multiple of the batch's device count
        stage = _stage(config, net, workdir, latent)
        self.cascade = cascade_lib.Cascade([stage], encoder, mesh=mesh)
        logging.info(
            "Evaluation every %d steps: %d images of %s, metrics %s",
            evals.every,
            len(self.items),
            evals.prompts,
            list(evals.metrics),
        )

    def sample(self, ema_params, rest) -> list:
        """The evaluation images (uint8 [H, W, 3] each, in prompt order) of these weights."""
        self.cascade.set_state(0, (ema_params, rest))
        images = []
        for chunk, real in jobs.batches(self.items, self.batch_size):
            images.extend(self.cascade(chunk, self.seed)[-1][:real])
        return images

    def __call__(self, step: int, ema_params, rest) -> dict[str, float]:
        images = self.sample(ema_params, rest)
        samples = evaluators_lib.Samples(images, self.records)
        metrics = evaluators_lib.run_evaluators(self.evaluators, samples)
        if jax.process_index() == 0:
            self._write(step, images, metrics)
        return {f"eval/{k}": v for k, v in metrics.items()}

    def _write(self, step: int, images, metrics: dict[str, Any]) -> None:
        folder = os.path.join(self.workdir, "evals")
        os.makedirs(folder, exist_ok=True)
        report = {
            "step": step,
            "num_images": len(images),
            "seed": self.seed,
            "evaluators": [e.describe() for e in self.evaluators],
            "metrics": metrics,
        }
        with open(os.path.join(folder, f"step_{step:08d}.json"), "w") as f:
            json.dump(report, f, indent=2)
        jobs.save_grid(images, os.path.join(folder, f"step_{step:08d}.png"))
