"""`train_vae(config, workdir)`: trains an AutoencoderKL (`model.family = "vae"`) and writes
it as a diffusers `vae/` directory that latent stages (`latent.vae`) and diffusers read.

    state, metrics = train_vae(config, workdir)   # or train_and_evaluate: it dispatches here
    python -m imagen_jax.training.export --config=configs/shapes_vae.py \
        --workdir=runs/shapes_vae --outdir=models/shapes_vae/vae [--step=N] [--noema]

The run is the shared loop (`loop.train_loop`: mesh, data pipeline, sharded
state with EMA, Orbax checkpoints with resume, metrics.jsonl and TensorBoard, the NaN stop)
with the autoencoder's step (`vae_step.py`) and, every `train.sample_every` steps, a
reconstruction grid `workdir/samples/step_<step>.png` (top row: the first batch's first
`train.num_samples` images; bottom row: their reconstructions from the posterior's mode, EMA
weights).

When the run reaches `train.steps`, process 0 writes `workdir/vae/` from the EMA weights
(`export.export_vae` writes one from any checkpoint). The exported `scaling_factor` is measured, as
Rombach et al. chose Stable Diffusion's 0.18215: 1 / the standard deviation of the posterior
means of one batch of the training data, so that latent stages see latents of about unit
variance.
"""

from __future__ import annotations

import dataclasses
import os

import jax
import ml_collections
import numpy as np
from absl import logging
from flax import nnx
from PIL import Image

from imagen_jax import parallel
from imagen_jax.images import image_rows, to_float_image, to_uint8
from imagen_jax.models import vae as vae_lib
from imagen_jax.training import input as input_lib
from imagen_jax.training import loop, vae_step
from imagen_jax.training.config import check_config

EXPORT_DIR = "vae"


class ReconstructionGrid:
    """`grid(step, ema_params, rest)` reconstructs the first batch's first
    `train.num_samples` images and (process 0) writes them under the originals to
    `workdir/samples/step_<step>.png`; returns the reconstructions, uint8 [N, H, W, 3]."""

    def __init__(self, config, net, mesh, workdir: str, first_batch):
        n = config.train.num_samples
        rep = parallel.replicated(mesh)
        self.workdir = workdir
        self._images = jax.jit(lambda b: b["image"][:n], out_shardings=rep)(first_batch)

        def reconstruct(params, rest, images):
            return net.merge(params, rest)(to_float_image(images))

        self._reconstruct = jax.jit(reconstruct, out_shardings=rep)

    def __call__(self, step: int, ema_params, rest) -> np.ndarray:
        images = to_uint8(self._reconstruct(ema_params, rest, self._images))
        if jax.process_index() == 0:
            folder = os.path.join(self.workdir, "samples")
            os.makedirs(folder, exist_ok=True)
            grid = image_rows([np.asarray(self._images), images])
            Image.fromarray(grid).save(os.path.join(folder, f"step_{step:08d}.png"))
        return images


def train_vae(config: ml_collections.ConfigDict, workdir: str):
    """Trains the autoencoder of `config` in `workdir` (resuming from its checkpoints), then
    exports `workdir/vae/`. Returns (final TrainState, metrics of the last logged step).
    A run that SIGTERM stops early raises `loop.Preempted` and exports nothing."""
    check_config(config)
    return loop.train_and_export(
        config,
        workdir,
        make_data=input_lib.make_input,
        make_step=vae_step.make_vae_train_step,
        make_grid=lambda net, mesh, batch: ReconstructionGrid(config, net, mesh, workdir, batch),
        export=lambda net, params: write_vae(
            os.path.join(workdir, EXPORT_DIR), config, net, params
        ),
    )


def measure_scaling_factor(config, net, params) -> float:
    """1 / std of the posterior means of one batch of the config's data (params: host)."""
    data = input_lib.make_input(config)
    try:
        images = np.asarray(next(data)["image"])
    finally:
        data.close()
    model = net.merge(params, net.abstract_rest)  # the VAE has no non-parameter state
    means = nnx.jit(lambda m, x: m.encode(to_float_image(x)).mean)(model, images)
    std = float(np.std(np.asarray(means, np.float64)))
    return 1.0 / std if std > 0 else 1.0


def write_vae(outdir: str, config, net, params) -> str:
    """Writes `params` (host arrays) of the autoencoder `net` as a diffusers directory, with
    the scaling factor measured on the config's data."""
    scale = measure_scaling_factor(config, net, params)
    cfg = dataclasses.replace(net.cfg, scaling_factor=scale, sample_size=config.model.resolution)
    vae_lib.save_vae(outdir, params, cfg)
    logging.info("Wrote the VAE to %s (scaling_factor %.5g)", outdir, scale)
    return outdir
