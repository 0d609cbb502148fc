"""Public checkpoints in diffusers layout, whatever their family: the one place that reads
a directory's model_index.json and hands it to its pipeline.

    pipe = load_latent_pipeline("models/sd-3-medium")   # SD 1.x / 2.x, SDXL or SD 3
    job, settings = public_job("models/IF-I-XL", [], pipeline_sr="models/IF-II-L")

`public_job` is what `sample.py --pipeline=DIR` runs: a DeepFloyd IF cascade
(`pipelines.deepfloyd`), or a latent pipeline (`pipelines.latent`, `pipelines.sd3`) with an
optional SDXL refiner, as a job of `jobs.run_job`.
"""

from __future__ import annotations

import os

import jax.numpy as jnp

from imagen_jax.models import lora as lora_lib
from imagen_jax.pipelines import deepfloyd, diffusers_format, editing, jobs, latent, sd3


def resolve_lora_export(path: str | os.PathLike) -> tuple[str, str | None]:
    """(pipeline directory, LoRA directory or None) of a `--pipeline` path: a LoRA export
    (`training.pipeline_export`: the LoRA file and finetune.json, which names its base
    pipeline) stands for its base pipeline with the adapters merged; any other path is
    itself."""
    path = os.fspath(path)
    record = os.path.join(path, lora_lib.EXPORT_RECORD)
    if not (
        os.path.isfile(os.path.join(path, lora_lib.LORA_WEIGHTS_NAME)) and os.path.isfile(record)
    ):
        return path, None
    base = diffusers_format.read_json(record, path).get("pipeline", "")
    if not os.path.isdir(base):
        raise FileNotFoundError(
            f"{record} names the base pipeline {base!r}, which is not a directory here; give "
            f"--pipeline=BASE --lora={path}"
        )
    return base, path


def load_latent_pipeline(
    path: str | os.PathLike, *, dtype=jnp.float32, lora: str | None = None
) -> latent.LatentPipeline:
    """An SD 1.x / 2.x, SDXL (base or refiner) or SD 3 pipeline from a diffusers directory,
    by its model_index.json's family; every component is checked before weights load.
    lora: a diffusers LoRA file (or its directory) merged into the UNet (SD 3: the
    transformer)."""
    path = os.fspath(path)
    family = diffusers_format.family_of(diffusers_format.read_model_index(path), path)
    if family.name == "stable_diffusion_3":
        return sd3.load_sd3_pipeline(path, dtype=dtype, lora=lora)
    return latent.load_sd_pipeline(path, dtype=dtype, lora=lora)


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
    edit=None,
    per_prompt=None,
    lora=None,
    lora_sr=None,
):
    """(job, what its images' metadata records) of a diffusers directory: a DeepFloyd IF
    cascade (stage I; stage II from `pipeline_sr`), or SD / SDXL (and an SDXL refiner) / SD 3;
    lora: a diffusers LoRA file (or its directory) merged into the base's UNet (SD 3: transformer);
    lora_sr: one merged into IF stage II's UNet. A LoRA export given as `pipeline` or
    `pipeline_sr` stands for its base pipeline with its adapters.
    edit: an `editing.EditRequest` applied to every image (IF: as a stage set's, the
    samplers' masked sampling with the known region kept clean, as diffusers' IF inpainting
    pipelines keep it; SD / SDXL: `LatentPipeline`'s image-to-image or inpainting)."""
    if lora is None:  # a LoRA export: its base pipeline with its adapters
        pipeline, lora = resolve_lora_export(pipeline)
    if pipeline_sr and lora_sr is None:
        pipeline_sr, lora_sr = resolve_lora_export(pipeline_sr)
    if lora_sr and not deepfloyd.is_if_pipeline(pipeline):
        raise ValueError(f"--lora_sr is for DeepFloyd IF stage II; {pipeline} is not IF stage I")
    if deepfloyd.is_if_pipeline(pipeline):
        if refiner:
            raise ValueError("--refiner is for SDXL; an IF stage II is --pipeline_sr")
        cascade, loaded = deepfloyd.load_if_cascade(
            pipeline,
            pipeline_sr,
            overrides=jobs.parse_overrides(overrides, 2 if pipeline_sr else 1),
            noise_level=deepfloyd.DEFAULT_NOISE_LEVEL if noise_level is None else noise_level,
            mesh=jobs.local_mesh(batch_size),
            size=(height, width),
            lora=lora,
            lora_sr=lora_sr,
        )
        settings = jobs.stage_settings(loaded, cascade)
        if edit is None and not per_prompt:
            return cascade, settings
        # As diffusers' IF editing pipelines: the known region kept clean, stage II from the
        # image at strength 0.8.
        how = dict(known_region="clean", sr_strength=deepfloyd.SR_EDIT_STRENGTH)
        job = editing.EditingCascade(cascade, edit, per_prompt=per_prompt, **how)
        if edit is not None:
            settings = dict(settings, edit=dict(edit.settings(), **how))
        return job, settings
    if pipeline_sr:
        raise ValueError(f"--pipeline_sr is for DeepFloyd IF; {pipeline} is not IF stage I")
    per_stage = jobs.parse_overrides(overrides, 2 if refiner else 1) + [{}]
    base = load_latent_pipeline(pipeline, lora=lora)
    base.set_mesh(jobs.local_mesh(batch_size))  # a batch split over this host's devices
    if edit is not None and not isinstance(base, latent.LatentPipeline):
        raise ValueError(
            f"--init_image / --mask: {pipeline} is an SD 3 pipeline, which does not edit "
            "here yet (SD / SDXL and DeepFloyd IF do)"
        )
    refiner_pipe = load_latent_pipeline(refiner) if refiner else None
    if refiner_pipe is not None:
        refiner_pipe.set_mesh(base.mesh)
    job = latent.LatentJob(
        base,
        refiner_pipe,
        refiner_start=refiner_start,
        height=height,
        width=width,
        overrides=per_stage[:2],
        edit=edit,
    )
    return job, job.settings()
