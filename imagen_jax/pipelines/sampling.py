"""What sample.py does: load the stages and the text encoder, run the job, print a summary."""

from __future__ import annotations

import jax
import ml_collections
import numpy as np
from jax.sharding import Mesh

from imagen_jax.pipelines import cascade as cascade_lib
from imagen_jax.pipelines import jobs, stages


def parse_overrides(overrides, num_stages: int) -> list[dict]:
    """["0.steps=25", "1.sampler=ddim"] -> one dict of sample overrides per stage, values
    typed by the sample group's defaults (unknown keys raise)."""
    from imagen_jax.diffusion.config import sample_config

    defaults = sample_config()
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
    if not stage_dirs:
        raise ValueError("no --stage given (the shipped default model is not available yet)")
    per_stage = parse_overrides(overrides, len(stage_dirs))
    loaded = [
        stages.load_stage(d, sample_overrides=o) for d, o in zip(stage_dirs, per_stage, strict=True)
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
):
    if bool(prompts) == bool(prompts_file):
        raise ValueError("give prompts with --prompt (repeatable) or --prompts=FILE, not both")
    entries = (
        jobs.read_prompts(prompts_file)
        if prompts_file
        else [jobs.PromptEntry(p, negative_prompt) for p in prompts]
    )
    cascade, loaded = load_cascade(stages, overrides, mesh=local_mesh(batch_size))
    settings = {"stages": [s.settings() for s in loaded]}
    summary = jobs.run_job(
        cascade,
        entries,
        outdir,
        images_per_prompt=images_per_prompt,
        seed=seed,
        batch_size=batch_size,
        settings=settings,
        grid=grid,
    )
    print(
        f"{summary['made']} images written to {outdir} ({summary['skipped']} already there) "
        f"in {summary['seconds']:.1f} s, {summary['images_per_s']:.2f} images/s"
    )
    return summary
