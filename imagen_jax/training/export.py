"""Export a training run: a pixel stage's EMA weights as a stage directory that sample.py
reads (`imagen_jax.stages`), a latent stage's (`model.family` "mmdit" or "sd_unet") as a
stage directory that also holds a copy of its frozen VAE (`latent.vae`), an autoencoder
run (`model.family = "vae"`) as a diffusers `vae/` directory that latent stages
(`latent.vae`) and diffusers read, or a captioner run (`model.family = "git"`) as a Hugging
Face GIT directory that `pipelines.captioning.load_captioner` and transformers'
`GitForCausalLM` read, or an embedding model run (`model.family = "two_towers"`) as the
directory that `pipelines.embedding.load_embedder` reads, or a public pipeline trained
further (`model.family = "pipeline"`) as a copy of the pipeline with its new UNet, or its
adapters as a diffusers LoRA file (`pipeline_export.py`; float32 unless --dtype is given).

    python -m imagen_jax.training.export --config=configs/shapes_base.py \
        --workdir=runs/shapes_base --outdir=models/shapes_base [--step=N] [--dtype=float16]
    python -m imagen_jax.training.export --config=configs/shapes_mmdit.py:vae=VAE_DIR \
        --workdir=runs/shapes_mmdit --outdir=checkpoints/shapes/latent [--step=N]
    python -m imagen_jax.training.export --config=configs/shapes_vae.py \
        --workdir=runs/shapes_vae --outdir=models/shapes_vae/vae [--step=N] [--noema]
    python -m imagen_jax.training.export --config=configs/shapes_captioner.py \
        --workdir=runs/shapes_captioner --outdir=checkpoints/shapes/captioner [--step=N]
"""

from __future__ import annotations

import dataclasses
import os

import jax
import ml_collections
import numpy as np
from absl import app, flags
from jax.sharding import SingleDeviceSharding

from imagen_jax import stages
from imagen_jax.config_utils import define_config_file
from imagen_jax.models import lora
from imagen_jax.training import (
    caption_trainer,
    contrastive_trainer,
    latent_space,
    pipeline_export,
    vae_trainer,
)
from imagen_jax.training import checkpoint as ckpt_lib
from imagen_jax.training import state as state_lib


def restore_ema(config: ml_collections.ConfigDict, workdir: str, step: int | None = None):
    """(EMA params as a nested dict of numpy arrays, the Network, the step) of a run's
    checkpoint (`checkpoint.restore_params`)."""
    return ckpt_lib.restore_params(config, workdir, step)


def export_stage(
    config: ml_collections.ConfigDict,
    workdir: str,
    outdir: str,
    *,
    step: int | None = None,
    storage_dtype: str = "float16",
) -> str:
    """Writes the stage directory of a run's (latest) checkpoint, pixel or latent; returns
    outdir."""
    params, net, step = restore_ema(config, workdir, step)
    if net.lora is not None:  # adapters: the stage of init_from with them merged in
        params, net = merged_adapters(config, net, params)
    domain = "shapes" if config.data.source == "shapes" else ""
    if net.family in stages.LATENT_FAMILIES:
        # The VAE the run trained on: its own weights, checked to fit as training checks.
        vae, where = latent_space.load_frozen_vae(config.latent.vae, seed=config.train.seed)
        latent_space.check_latent_stage(config, vae.config, net, where)
        stages.save_latent_stage(
            outdir,
            family=net.family,
            network=net.cfg,
            params=params,
            vae=vae,
            diffusion=config.diffusion,
            sample=config.sample,
            resolution=config.model.resolution,
            text=config.text.to_dict(),
            identity=dict(workdir=workdir, step=step, vae=where),
            domain=domain,
            storage_dtype=storage_dtype,
        )
        return outdir
    stages.save_stage(
        outdir,
        unet=net.cfg,
        params=params,
        diffusion=config.diffusion,
        sample=config.sample,
        resolution=config.model.resolution,
        low_resolution=config.model.low_resolution,
        aug_level=float(config.train.noise_aug.sample_level) if net.cfg.low_res else 0.0,
        text=config.text.to_dict(),
        identity=dict(workdir=workdir, step=step),
        domain=domain,
        storage_dtype=storage_dtype,
    )
    return outdir


def merged_adapters(config: ml_collections.ConfigDict, net, adapters):
    """(the parameters of `train.init_from` with the run's adapters merged in, as host
    arrays; the Network of the stage without adapters)."""
    plain = dataclasses.replace(
        net,
        lora=None,
        abstract_params=net.abstract_rest["base"],
        abstract_rest=net.abstract_rest["nnx"],
    )
    device = jax.devices()[0]
    shardings = jax.tree.map(lambda _: SingleDeviceSharding(device), plain.abstract_params)
    base = state_lib.params_from_stage(config.train.init_from, plain, shardings)
    return jax.tree.map(np.asarray, lora.merge(base, adapters, net.lora)), plain


def export_pipeline(
    config: ml_collections.ConfigDict,
    workdir: str,
    outdir: str,
    *,
    step: int | None = None,
    ema: bool = True,
    dtype: str = "float32",
) -> str:
    """Writes a public pipeline trained further (`model.family = "pipeline"`) for diffusers:
    a copy of the pipeline with the run's UNet, or its adapters as a diffusers LoRA file
    (`pipeline_export.write_finetuned`); EMA weights unless `ema` is False."""
    params, net, step = ckpt_lib.restore_params(config, workdir, step, ema=ema)
    identity = dict(workdir=os.path.abspath(workdir), step=step, ema=ema)
    return pipeline_export.write_finetuned(
        outdir, config, net, params, identity=identity, dtype=dtype
    )


def export_vae(
    config: ml_collections.ConfigDict,
    workdir: str,
    outdir: str,
    *,
    step: int | None = None,
    ema: bool = True,
) -> str:
    """Writes the autoencoder of a run's checkpoint (default: the latest; EMA weights unless
    `ema` is False) as a diffusers directory; returns outdir."""
    params, net, _ = ckpt_lib.restore_params(config, workdir, step, ema=ema)
    return vae_trainer.write_vae(outdir, config, net, params)


def export_captioner(
    config: ml_collections.ConfigDict,
    workdir: str,
    outdir: str,
    *,
    step: int | None = None,
    ema: bool = True,
) -> str:
    """Writes the captioner of a run's checkpoint (default: the latest; EMA weights unless
    `ema` is False) as a Hugging Face GIT directory (`caption_trainer.write_captioner`:
    float16 weights, the MiniLM tokenizer, preprocessing and generation settings)."""
    params, net, _ = ckpt_lib.restore_params(config, workdir, step, ema=ema)
    return caption_trainer.write_captioner(outdir, config, net, params)


def export_embedding(
    config: ml_collections.ConfigDict,
    workdir: str,
    outdir: str,
    *,
    step: int | None = None,
    ema: bool = True,
) -> str:
    """Writes the embedding model (`model.family = "two_towers"`) of a run's checkpoint
    (default: the latest; EMA weights unless `ema` is False) as the directory that
    `pipelines.embedding.load_embedder` reads (`contrastive_trainer.write_embedding_model`)."""
    params, net, step = ckpt_lib.restore_params(config, workdir, step, ema=ema)
    identity = dict(workdir=workdir, step=step)
    return contrastive_trainer.write_embedding_model(outdir, config, net, params, identity=identity)


_CONFIG = define_config_file("config", None, "The run's config file.")
flags.DEFINE_string("workdir", None, "The training workdir.")
flags.DEFINE_string("outdir", None, "The stage (or diffusers vae/) directory to write.")
flags.DEFINE_integer("step", None, "Checkpoint step (default: the latest).")
flags.DEFINE_enum("dtype", "float16", list(stages.STORAGE_DTYPES), "Stage storage dtype.")
flags.DEFINE_bool(
    "ema",
    True,
    "VAE, captioner, embedding and pipeline runs: the EMA weights (--noema: the raw weights).",
)


def main(argv):
    del argv
    f = flags.FLAGS
    config = _CONFIG.value
    family = config.model.get("family", "imagen")
    if family == "vae":
        print(export_vae(config, f.workdir, f.outdir, step=f.step, ema=f.ema))
    elif family == "git":
        print(export_captioner(config, f.workdir, f.outdir, step=f.step, ema=f.ema))
    elif family == "two_towers":
        print(export_embedding(config, f.workdir, f.outdir, step=f.step, ema=f.ema))
    elif family == "pipeline":
        dtype = f.dtype if f["dtype"].present else "float32"
        print(export_pipeline(config, f.workdir, f.outdir, step=f.step, ema=f.ema, dtype=dtype))
    else:
        print(export_stage(config, f.workdir, f.outdir, step=f.step, storage_dtype=f.dtype))


if __name__ == "__main__":
    flags.mark_flags_as_required(["config", "workdir", "outdir"])
    app.run(main)
