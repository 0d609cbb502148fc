"""What sample.py does: load the stages and the text encoder, run the job, print a summary
(`run_sampling_job`); public diffusers checkpoints go through `pipelines.public`.

With no stage given it samples a shipped model (`pipelines.shipped`, `model`; default: the
shapes cascade in `checkpoints/shapes/`, base 32 px -> super-resolution 64 px), and with no
prompt given, the shipped models' default prompts (`checkpoints/shapes/prompts.txt`).
A stage directory may be a latent stage (`stages.LatentStage`: a denoiser of VAE latents and
its VAE), which the cascade samples in latent space and decodes.
"""

from __future__ import annotations

import dataclasses

from imagen_jax import stages
from imagen_jax.pipelines import cascade as cascade_lib
from imagen_jax.pipelines import deepfloyd, editing, jobs, public, shipped
from imagen_jax.shapes.grammar import out_of_domain_note
from imagen_jax.text.config import make_text_encoder, text_config

SHIPPED_MODEL = shipped.ROOT


def shipped_stages() -> list[str]:
    """The stage directories of the shipped default model (base first)."""
    return shipped.stage_dirs(shipped.DEFAULT)


def stage_summaries(loaded) -> list[dict]:
    """What a results line records of each loaded stage: its path, resolution, identity and
    main sample settings (the eval mains' `stages` field)."""
    return [
        dict(
            path=s.path,
            resolution=s.resolution,
            identity=s.identity,
            sample={k: s.sample[k] for k in ("sampler", "steps", "guidance_scale")},
        )
        for s in loaded
    ]


STAGE_KEYS = {"aug_level": 0.0}  # what --set may change of a stage beyond its sample group


def domain_note(loaded, prompts) -> str | None:
    """What a stage's training domain says about prompts it cannot read (a stage directory's
    "domain"; only "shapes" has a reader, `shapes.grammar.out_of_domain_note`)."""
    if any(getattr(stage, "domain", None) == "shapes" for stage in loaded):
        return out_of_domain_note(prompts)
    return None


def load_cascade(stage_dirs, overrides=(), *, mesh=None):
    """(Cascade, its loaded stages) of stage directories (pixel or latent), base first;
    none: the shipped default model."""
    stage_dirs = list(stage_dirs) or shipped_stages()
    per_stage = jobs.parse_overrides(overrides, len(stage_dirs), STAGE_KEYS)
    loaded = [
        stages.load_stage(d, sample_overrides=o, aug_level=o.pop("aug_level", None))
        for d, o in zip(stage_dirs, per_stage, strict=True)
    ]
    encoder = make_text_encoder(text_config(**loaded[0].text))
    return cascade_lib.Cascade(loaded, encoder, mesh=mesh), loaded


def run_sampling_job(
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
    lora: str | None = None,
    pipeline_sr: str | None = None,
    noise_level: int | None = None,
    lora_sr: str | None = None,
    overwrite: bool = False,
    model: str | None = None,
    init_image: str | None = None,
    mask: str | None = None,
    strength: float = 1.0,
    repaint_jump: int = 0,
    repaint_resample: int = 1,
):
    """The job of sample.py's flags (one keyword argument per flag); returns
    `jobs.run_job`'s summary. height, width: the final images' size (None: the last
    stage's trained resolution; see `cascade.stage_sizes`). pipeline: a diffusers-format
    SD / SDXL directory instead of stages (refiner: an SDXL refiner taking over at
    `refiner_start` of the steps; lora: a diffusers LoRA file merged into its UNet), or a
    DeepFloyd IF stage I directory (pipeline_sr: an IF
    stage II directory after it, whose input is noised at `noise_level`, None: diffusers'
    250; lora_sr: a LoRA file merged into stage II's UNet). overwrite: replace the images
    of another job in outdir (else a rerun into a
    folder of another job refuses; see `jobs.prepare_outdir`). model: a shipped model's
    name (`pipelines.shipped`) instead of stages (None, without stages: the default).
    init_image, mask, strength, repaint_jump, repaint_resample: image-to-image and
    inpainting of every image of a job (`pipelines.editing`; a --pipeline job: SD / SDXL
    with their own or inpainting UNets, DeepFloyd IF as a stage set; not SD 3)."""
    if batch_size < 1:
        raise ValueError(f"--batch_size must be >= 1, got {batch_size}")
    if images_per_prompt < 1:
        raise ValueError(f"--images_per_prompt must be >= 1, got {images_per_prompt}")
    if pipeline and stages:
        raise ValueError("give --stage directories or a --pipeline directory, not both")
    if model and (stages or pipeline):
        raise ValueError(
            f"--model={model} samples a shipped model: give --model, --stage directories or a "
            "--pipeline directory, one of them"
        )
    given_stages = bool(stages)
    if not (stages or pipeline):
        stages = shipped.stage_dirs(model or shipped.DEFAULT)  # fails here if not shipped
    if refiner and not pipeline:
        raise ValueError("--refiner needs --pipeline (the SDXL base)")
    if lora and not pipeline:
        raise ValueError("--lora needs --pipeline (the SD / SDXL pipeline it adapts)")
    if pipeline_sr and not pipeline:
        raise ValueError("--pipeline_sr needs --pipeline (DeepFloyd IF stage I)")
    if lora_sr and not pipeline_sr:
        raise ValueError("--lora_sr needs --pipeline_sr (the IF stage II it adapts)")
    if noise_level is not None and not pipeline_sr:
        raise ValueError("--noise_level needs --pipeline_sr (DeepFloyd IF stage II)")
    if prompts and prompts_file:
        raise ValueError("give prompts with --prompt (repeatable) or --prompts=FILE, not both")
    if not (prompts or prompts_file):
        if given_stages:
            raise ValueError("no prompts: give --prompt (repeatable) or --prompts=FILE")
        prompts_file = str(shipped.PROMPTS)  # the shipped models' defaults
    if prompts_file:  # --negative_prompt is the default of entries without their own
        entries = [
            e if e.negative_prompt else dataclasses.replace(e, negative_prompt=negative_prompt)
            for e in jobs.read_prompts(prompts_file)
        ]
    else:
        entries = [jobs.PromptEntry(p, negative_prompt) for p in prompts]
    print(f"{len(entries)} prompts read from {prompts_file or '--prompt'}")
    jobs.check_outdir(outdir)  # before any model is loaded or compiled
    request = editing.load_edit_request(
        init_image=init_image,
        mask=mask,
        strength=strength,
        repaint_jump=repaint_jump,
        repaint_resample=repaint_resample,
    )
    entries, per_prompt = editing.prompt_edits(
        entries, prompts_file, repaint_jump=repaint_jump, repaint_resample=repaint_resample
    )
    if per_prompt and pipeline and not deepfloyd.is_if_pipeline(pipeline):
        raise ValueError(
            f"{prompts_file}: per-prompt 'init_image' edits stage sets and DeepFloyd IF; "
            "give an SD / SDXL --pipeline its image with --init_image"
        )
    if pipeline:
        job, settings = public.public_job(
            pipeline,
            overrides,
            refiner=refiner,
            refiner_start=refiner_start,
            pipeline_sr=pipeline_sr,
            noise_level=noise_level,
            height=height,
            width=width,
            batch_size=batch_size,
            edit=request,
            per_prompt=per_prompt,
            lora=lora,
            lora_sr=lora_sr,
        )
        if request is not None:
            for line in request.notes:
                print(line)
        return _run(
            job, entries, outdir, images_per_prompt, seed, batch_size, settings, grid, overwrite
        )
    cascade, loaded = load_cascade(stages, overrides, mesh=jobs.local_mesh(batch_size))
    if height is not None or width is not None:
        cascade.set_size(height, width)
    settings = jobs.stage_settings(loaded, cascade)
    note = domain_note(loaded, [e.prompt for e in entries])
    if note:
        print(note)
    for r in ([request] if request is not None else []) + list(per_prompt.values()):
        for line in (*r.notes, r.aspect_note(cascade.sizes[-1])):
            if line:
                print(line)
    if request is not None:
        settings = dict(settings, edit=request.settings())
    if request is not None or per_prompt:
        cascade = editing.EditingCascade(cascade, request, per_prompt=per_prompt)
    return _run(
        cascade, entries, outdir, images_per_prompt, seed, batch_size, settings, grid, overwrite
    )


def _run(job, entries, outdir, images_per_prompt, seed, batch_size, settings, grid, overwrite):
    summary = jobs.run_job(
        job,
        entries,
        outdir,
        images_per_prompt=images_per_prompt,
        seed=seed,
        batch_size=batch_size,
        settings=settings,
        grid=grid,
        overwrite=overwrite,
    )
    print(
        f"{summary['made']} images written to {outdir} ({summary['skipped']} already there; "
        f"this process's share: {summary['images']} images; the job {summary['job']}: "
        f"{summary['prompts']} prompts x {images_per_prompt}) "
        f"in {summary['seconds']:.1f} s, {summary['images_per_s']:.2f} images/s"
    )
    return summary
