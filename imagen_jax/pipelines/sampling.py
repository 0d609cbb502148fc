"""What sample.py does: load the stages and the text encoder, run the job, print a summary.

With no stage given it samples the shipped default model, the shapes cascade in
`checkpoints/shapes/` (base 32 px -> super-resolution 64 px), and with no prompt given,
that model's default prompts (`checkpoints/shapes/prompts.txt`).
"""

from __future__ import annotations

import pathlib

import jax
import ml_collections
import numpy as np
from jax.sharding import Mesh

from imagen_jax.pipelines import cascade as cascade_lib
from imagen_jax.pipelines import jobs, stages

SHIPPED_MODEL = pathlib.Path(__file__).resolve().parents[2] / "checkpoints" / "shapes"
SHIPPED_STAGES = ("base", "sr")


def shipped_stages() -> list[str]:
    """The stage directories of the shipped default model (base first)."""
    dirs = [SHIPPED_MODEL / name for name in SHIPPED_STAGES]
    missing = [str(d) for d in dirs if not (d / "stage.json").is_file()]
    if missing:
        raise FileNotFoundError(
            f"the shipped default model is missing ({', '.join(missing)}); sample.py finds it "
            "in the repository's checkpoints/ folder: run it from a clone, or give --stage"
        )
    return [str(d) for d in dirs]


def out_of_domain(loaded, entries) -> list[str]:
    """The prompts that a shapes-domain model cannot read (its prompt grammar rejects
    them); [] when no stage declares the shapes domain."""
    if not any(stage.domain == "shapes" for stage in loaded):
        return []
    from imagen_jax.shapes.grammar import parse_prompt

    unknown = []
    for entry in entries:
        try:
            parse_prompt(entry.prompt)
        except ValueError:
            unknown.append(entry.prompt)
    return unknown


STAGE_KEYS = {"aug_level": 0.0}  # what --set may change of a stage beyond its sample group


def parse_overrides(overrides, num_stages: int, extra_keys: dict | None = None) -> list[dict]:
    """["0.steps=25", "1.sampler=ddim"] -> one dict of sample overrides per stage, values
    typed by the sample group's defaults, or by `extra_keys` (key: default) for keys beyond
    it (unknown keys raise)."""
    from imagen_jax.diffusion.config import sample_config

    defaults = {**sample_config().to_dict(), **(extra_keys or {})}
    out = [{} for _ in range(num_stages)]
    for item in overrides:
        target, _, value = item.partition("=")
        index, _, key = target.partition(".")
        if not index.isdigit() or int(index) >= num_stages or not _:
            raise ValueError(f"--set={item!r}: expected STAGE.KEY=VALUE with STAGE < {num_stages}")
        if key not in defaults:
            raise ValueError(
                f"--set={item!r}: unknown sample key {key!r}; allowed: {sorted(defaults.keys())}"
            )
        kind = type(defaults[key])
        out[int(index)][key] = (
            (value.lower() in ("1", "true", "yes")) if kind is bool else kind(value)
        )
    return out


def local_mesh(batch_size: int):
    """A mesh over this process's devices that splits the batch, when it divides evenly
    (each process samples its own prompts; None: one device)."""
    devices = jax.local_devices()
    if len(devices) == 1 or batch_size % len(devices):
        return None
    return Mesh(np.array(devices), ("data",))


def load_cascade(stage_dirs, overrides=(), *, mesh=None):
    """(Cascade, its loaded stages) of stage directories, base first; none: the shipped
    default model."""
    stage_dirs = list(stage_dirs) or shipped_stages()
    per_stage = parse_overrides(overrides, len(stage_dirs), STAGE_KEYS)
    loaded = [
        stages.load_stage(d, sample_overrides=o, aug_level=o.pop("aug_level", None))
        for d, o in zip(stage_dirs, per_stage, strict=True)
    ]
    from imagen_jax.training.text import make_text_encoder

    encoder = make_text_encoder(ml_collections.ConfigDict(loaded[0].text))
    return cascade_lib.Cascade(loaded, encoder, mesh=mesh), loaded


def main(
    *,
    stages,
    prompts,
    prompts_file,
    negative_prompt,
    images_per_prompt,
    seed,
    batch_size,
    outdir,
    overrides,
    grid,
    height: int | None = None,
    width: int | None = None,
    pipeline: str | None = None,
    refiner: str | None = None,
    refiner_start: float = 0.8,
    pipeline_sr: str | None = None,
    noise_level: int | None = None,
):
    """The job of sample.py's flags; returns `jobs.run_job`'s summary. height, width: the
    final images' size (None: the last stage's trained resolution; see
    `cascade.stage_sizes`). pipeline: a diffusers-format SD / SDXL directory instead of
    stages (refiner: an SDXL refiner taking over at `refiner_start` of the steps), or a
    DeepFloyd IF stage I directory (pipeline_sr: an IF stage II directory after it, whose
    input is noised at `noise_level`, None: diffusers' 250)."""
    if pipeline and stages:
        raise ValueError("give --stage directories or a --pipeline directory, not both")
    if refiner and not pipeline:
        raise ValueError("--refiner needs --pipeline (the SDXL base)")
    if pipeline_sr and not pipeline:
        raise ValueError("--pipeline_sr needs --pipeline (DeepFloyd IF stage I)")
    if noise_level is not None and not pipeline_sr:
        raise ValueError("--noise_level needs --pipeline_sr (DeepFloyd IF stage II)")
    if prompts and prompts_file:
        raise ValueError("give prompts with --prompt (repeatable) or --prompts=FILE, not both")
    if not (prompts or prompts_file):
        if stages:
            raise ValueError("no prompts: give --prompt (repeatable) or --prompts=FILE")
        prompts_file = str(SHIPPED_MODEL / "prompts.txt")  # the shipped model's defaults
    entries = (
        jobs.read_prompts(prompts_file)
        if prompts_file
        else [jobs.PromptEntry(p, negative_prompt) for p in prompts]
    )
    print(f"{len(entries)} prompts read from {prompts_file or '--prompt'}")
    jobs.check_outdir(outdir)  # before any model is loaded or compiled
    if pipeline:
        job, settings = public_job(
            pipeline,
            overrides,
            refiner=refiner,
            refiner_start=refiner_start,
            pipeline_sr=pipeline_sr,
            noise_level=noise_level,
            height=height,
            width=width,
            batch_size=batch_size,
        )
        return _run(job, entries, outdir, images_per_prompt, seed, batch_size, settings, grid)
    cascade, loaded = load_cascade(stages, overrides, mesh=local_mesh(batch_size))
    if height is not None or width is not None:
        cascade.set_size(height, width)
    settings = _stage_settings(loaded, cascade)
    unknown = out_of_domain(loaded, entries)
    if unknown:
        print(
            f"note: {len(unknown)} of {len(entries)} prompts are outside the shapes domain "
            f"(e.g. {unknown[0]!r}): the model was trained only on coloured shapes (circle, "
            "square, triangle, star, heart, cross), their colours, sizes, counts, positions "
            "and background; it makes an image anyway"
        )
    return _run(cascade, entries, outdir, images_per_prompt, seed, batch_size, settings, grid)


def public_job(
    pipeline,
    overrides,
    *,
    refiner=None,
    refiner_start=0.8,
    pipeline_sr=None,
    noise_level=None,
    height=None,
    width=None,
    batch_size=1,
):
    """(job, what its images' metadata records) of a diffusers directory: a DeepFloyd IF
    cascade (stage I; stage II from `pipeline_sr`), or SD / SDXL (and an SDXL refiner) / SD 3."""
    from imagen_jax.pipelines import deepfloyd  # lazy: only public pipelines need them

    if deepfloyd.is_if_pipeline(pipeline):
        if refiner:
            raise ValueError("--refiner is for SDXL; an IF stage II is --pipeline_sr")
        cascade, loaded = deepfloyd.load_if_cascade(
            pipeline,
            pipeline_sr,
            overrides=parse_overrides(overrides, 2 if pipeline_sr else 1),
            noise_level=deepfloyd.DEFAULT_NOISE_LEVEL if noise_level is None else noise_level,
            mesh=local_mesh(batch_size),
            size=(height, width),
        )
        return cascade, _stage_settings(loaded, cascade)
    if pipeline_sr:
        raise ValueError(f"--pipeline_sr is for DeepFloyd IF; {pipeline} is not IF stage I")
    from imagen_jax.pipelines import latent

    per_stage = parse_overrides(overrides, 2 if refiner else 1) + [{}]
    job = latent.LatentJob(
        latent.load_latent_pipeline(pipeline),
        latent.load_latent_pipeline(refiner) if refiner else None,
        refiner_start=refiner_start,
        height=height,
        width=width,
        overrides=per_stage[:2],
    )
    return job, job.settings()


def _stage_settings(loaded, cascade) -> dict:
    """What every image's metadata records about the stages of a cascade."""
    return {
        "stages": [
            dict(s.settings(), height=h, width=w)
            for s, (h, w) in zip(loaded, cascade.sizes, strict=True)
        ]
    }


def _run(job, entries, outdir, images_per_prompt, seed, batch_size, settings, grid):
    summary = jobs.run_job(
        job,
        entries,
        outdir,
        images_per_prompt=images_per_prompt,
        seed=seed,
        batch_size=batch_size,
        settings=settings,
        grid=grid,
    )
    print(
        f"{summary['made']} images written to {outdir} ({summary['skipped']} already there; "
        f"this process's share: {summary['images']} images; the job: {summary['prompts']} "
        f"prompts x {images_per_prompt}) "
        f"in {summary['seconds']:.1f} s, {summary['images_per_s']:.2f} images/s"
    )
    return summary
