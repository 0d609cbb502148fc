"""`train_and_evaluate(config, workdir)`: trains one stage.

    state, metrics = train_and_evaluate(config, workdir)

reads as: make mesh, make network, make text encoder (and open its cache of the data's
captions when `text.cache` is set), make data, make state (restored from
`workdir/checkpoints` when it holds one), then the shared loop (`loop.train_loop`) with the
diffusion step (`step.py`), the sample grid (`sample_grid.py`) and, every `evals.every`
steps, the periodic evaluation (`periodic_eval.py`: sample the evaluation prompts and score
them; a latent stage's through its VAE).

`model.family` picks the stage: "imagen" (pixel stages), "sd_unet" or "mmdit" (a latent
stage, UNet or SD3 MMDiT: the batches' images become latents of the frozen VAE of
`latent.vae` before the step, `latent_space.py`, and the sample grid decodes its latents
with it) or "pipeline" (a public pipeline's UNet trained further, fully or with low-rank
adapters: a latent stage whose first weights are the pipeline's, `pipeline_start.py`) or
"vae" (the autoencoder itself: `vae_trainer.train_vae`, the same loop with its own step)
or "git" (a GIT captioner: `caption_trainer.train_captioner`, the same loop with the
captioning step) or "two_towers" (an image-text embedding model:
`contrastive_trainer.train_contrastive`, the same loop with the contrastive step).
"""

from __future__ import annotations

import jax
import ml_collections
from absl import logging

from imagen_jax.text.cache import EmbeddingCache
from imagen_jax.text.config import make_text_encoder, text_width
from imagen_jax.training import (
    caption_trainer,
    contrastive_trainer,
    latent_space,
    loop,
    periodic_eval,
    pipeline_start,
    sample_grid,
    vae_trainer,
)
from imagen_jax.training import checkpoint as ckpt_lib
from imagen_jax.training import input as input_lib
from imagen_jax.training import state as state_lib
from imagen_jax.training import step as step_lib
from imagen_jax.training.config import check_config, is_latent_stage


def stage_text_encoder(config, net):
    """The encoder of `config.text`, checked to give the width the network reads."""
    encoder = make_text_encoder(
        config.text, batch_size=config.data.batch_size // jax.process_count()
    )
    width = text_width(encoder)
    if width != net.text_dim:
        raise ValueError(
            f"the text encoder gives {width}-dim embeddings but the model expects "
            f"{net.text_dim_key}={net.text_dim}"
        )
    return encoder


def open_text_cache(config, encoder, net):
    """The text cache of `text.cache` (None if unset), checked to be the encoder's and to fit
    the model."""
    if not config.text.cache:
        return None
    cache = EmbeddingCache.open(config.text.cache, expect_fingerprint=encoder.fingerprint())
    if (cache.max_length, cache.dim) != (encoder.max_length, net.text_dim):
        raise ValueError(
            f"the text cache {cache.directory} holds [L={cache.max_length}, D={cache.dim}] "
            f"embeddings; the stage needs L={encoder.max_length} (text.max_length) and "
            f"D={net.text_dim} ({net.text_dim_key})"
        )
    logging.info("Text from the cache %s (%d captions)", cache.directory, len(cache))
    return cache


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str):
    """Trains the stage of `config` in `workdir` (resuming from its checkpoints).

    Returns (final TrainState, metrics of the last logged step, as floats; the same on
    every process) once the run reaches `train.steps`. Raises `loop.Preempted` when SIGTERM
    stopped it earlier (after checkpointing the step it stopped at), and
    `config_utils.ConfigError` on a value of the config that cannot work (`check_config`).
    """
    if config.model.get("family", "imagen") == "vae":
        return vae_trainer.train_vae(config, workdir)
    if config.model.get("family", "imagen") == "git":
        return caption_trainer.train_captioner(config, workdir)
    if config.model.get("family", "imagen") == "two_towers":
        return contrastive_trainer.train_contrastive(config, workdir)
    check_config(config)
    mesh = loop.make_mesh(config)
    with jax.set_mesh(mesh):
        net = loop.make_stage_network(config, mesh)
        latent = None
        if is_latent_stage(config.model):
            latent = latent_space.LatentSpace.from_config(config, net, mesh)
        tx, lr_schedule = state_lib.make_optimizer(config.optim, config.train.steps)
        checkpointer = ckpt_lib.run_checkpointer(config, workdir, net)
        data = None
        try:
            encoder = stage_text_encoder(config, net)  # also for the sample grid's prompts
            data = input_lib.make_input(config, open_text_cache(config, encoder, net))
            state, shardings, rest = loop.make_state(config, net, tx, mesh, checkpointer, data)
            if net.family == "pipeline":
                state, rest = pipeline_start.start_from_pipeline(
                    config, net, encoder, state, rest, shardings
                )
            train_step = step_lib.make_train_step(
                config, net, tx, lr_schedule, mesh, shardings, rest
            )
            evaluation = None
            if config.evals.every:
                evaluation = periodic_eval.PeriodicEvaluation(
                    config, net, mesh, encoder, workdir, latent=latent
                )
            prepare = None if latent is None else latent.encode_batch
            make_grid = lambda batch: sample_grid.SampleGrid(  # noqa: E731
                config, net, mesh, encoder, workdir, batch, latent=latent
            )
            return loop.train_loop(
                config,
                workdir,
                mesh,
                net,
                encoder,
                data,
                state,
                rest,
                train_step,
                checkpointer,
                evaluation=evaluation,
                prepare=prepare,
                make_grid=make_grid,
            )
        finally:
            checkpointer.close()
            if data is not None:
                data.close()
