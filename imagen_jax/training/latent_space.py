"""The frozen VAE of a latent diffusion stage (Rombach et al. 2022): images -> latents for
the train step, latents -> images for the sample grid.

    latent = LatentSpace.from_config(config, net, mesh)   # config.latent.vae: a directory
    batch = latent.encode_batch(batch, step)   # "image" uint8 -> "latents" [B, h, w, C]
    images = latent.decode(latent.state, latents)         # pure: usable inside a jit

The latents are `AutoencoderKL.latents_from_images` (scaled by the VAE's scaling_factor /
shift, as diffusers' pipelines scale them), a sample of the posterior (`latent.
sample_posterior`, as diffusers' training scripts; False: its mode) drawn from
fold_in(fold_in(key(train.seed), 2), step), so a resumed run draws what the uninterrupted one
drew. They are computed in their own jitted call on the batch's devices, between the input
pipeline and the train step; the VAE gets no gradient. Its parameters are replicated on every
device (`state`).

`config.latent.vae = "random"` takes an untrained VAE of `RANDOM_VAE` (runlocal configs,
tests): its latents keep little of the image, so only the mechanics are exercised.
"""

from __future__ import annotations

import os

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from absl import logging
from flax import nnx

from imagen_jax import parallel
from imagen_jax.images import to_float_image
from imagen_jax.models import vae as vae_lib
from imagen_jax.training import input as input_lib

RANDOM = "random"
RANDOM_VAE = dict(block_out_channels=(16, 32), layers_per_block=1, norm_num_groups=8)


def load_frozen_vae(path: str, seed: int = 0) -> tuple[vae_lib.AutoencoderKL, str]:
    """(the VAE of `latent.vae`, a description of where it came from); a missing or empty
    path raises FileNotFoundError naming it."""
    if path == RANDOM:
        cfg = vae_lib.make_config("runlocal", **RANDOM_VAE)
        model = nnx.jit(lambda: vae_lib.AutoencoderKL(cfg, rngs=nnx.Rngs(params=seed)))()
        return model, "an untrained random VAE"
    if not path:
        raise FileNotFoundError(
            "latent.vae is empty: a latent stage needs a diffusers AutoencoderKL directory (the "
            "VAE trainer, configs/shapes_vae.py, writes WORKDIR/vae), or 'random' for a test"
        )
    if not os.path.isdir(path):
        raise FileNotFoundError(
            f"latent.vae={path!r}: no such directory (a diffusers AutoencoderKL folder with "
            "config.json and diffusion_pytorch_model.safetensors was expected)"
        )
    model, _ = vae_lib.load_vae(path)
    return model, path


def check_latent_stage(config: ml_collections.ConfigDict, vae_cfg: vae_lib.VAEConfig, net, where):
    """Raises ValueError when the VAE's latents do not fit the network (UNet or MMDiT):
    channels in and out, and a latent side that the UNet's levels can halve (the MMDiT's
    patches can tile)."""
    unet = net.cfg  # LatentUNetConfig | LatentMMDiTConfig: in_channels, out_channels
    c = vae_cfg.latent_channels
    if c != unet.in_channels:
        raise ValueError(
            f"the VAE ({where}) makes latents of {c} channels but the UNet takes "
            f"model.in_channels={unet.in_channels}; set model.in_channels={c} (and "
            f"model.out_channels) or use a VAE with {unet.in_channels} latent channels"
        )
    expected_out = 2 * c if config.diffusion.variance == "learned_range" else c
    if unet.out_channels != expected_out:
        raise ValueError(
            f"model.out_channels={unet.out_channels}; the stage predicts {expected_out} "
            f"channels for the VAE's {c}-channel latents"
        )
    f, res = vae_cfg.downsample_factor, config.model.resolution
    factor = 2 ** (net.num_levels - 1)
    if res % f or (res // f) % factor:
        raise ValueError(
            f"model.resolution={res}: the VAE ({where}) makes latents of side resolution / {f} "
            f"and the UNet's {net.num_levels} levels need that side divisible by {factor}"
        )
    for h, w in input_lib.training_shapes(config.data):
        if any(side % f or (side // f) % factor for side in (h, w)):
            raise ValueError(
                f"data.buckets: {h}x{w} images make latents of {h / f:g}x{w / f:g} (the VAE "
                f"({where}) downsamples {f}x); the UNet's {net.num_levels} levels need sides "
                f"divisible by {factor}"
            )


class LatentSpace:
    """The frozen VAE of a latent stage, replicated over the mesh (see the module docstring)."""

    def __init__(self, model: vae_lib.AutoencoderKL, mesh, *, seed: int, sample_posterior: bool):
        self.config = model.config
        self._graphdef, state = nnx.split(model)
        self.state = parallel.replicate(jax.tree.map(np.asarray, state), mesh)
        self._key = jax.random.fold_in(jax.random.key(seed), 2)  # 0: the init, 1: the grid
        sharding = parallel.batch_sharding(mesh)

        def encode(state, images, step):
            vae = nnx.merge(self._graphdef, state)
            key = jax.random.fold_in(self._key, step) if sample_posterior else None
            latents = vae.latents_from_images(to_float_image(images), key)
            return jax.lax.stop_gradient(latents.astype(jnp.float32))

        self._encode = jax.jit(encode, out_shardings=sharding)

    @classmethod
    def from_config(cls, config: ml_collections.ConfigDict, net, mesh) -> LatentSpace:
        """The VAE of `config.latent`, checked against the stage's network."""
        model, where = load_frozen_vae(config.latent.vae, seed=config.train.seed)
        check_latent_stage(config, model.config, net, where)
        f, c = model.config.downsample_factor, model.config.latent_channels
        r = config.model.resolution
        logging.info("Latents of %d px images: %dx%dx%d from %s", r, r // f, r // f, c, where)
        return cls(
            model,
            mesh,
            seed=config.train.seed,
            sample_posterior=config.latent.sample_posterior,
        )

    @property
    def model(self) -> vae_lib.AutoencoderKL:
        """The frozen VAE (its replicated parameters), e.g. for the periodic evaluation."""
        return nnx.merge(self._graphdef, self.state)

    def latent_shape(self, resolution: int) -> tuple[int, int, int]:
        """[h, w, C] of the latents of resolution x resolution images."""
        f = self.config.downsample_factor
        return (resolution // f, resolution // f, self.config.latent_channels)

    def encode_batch(self, batch: dict, step: int) -> dict:
        """The global batch with "image" replaced by its "latents" (float32 [B, h, w, C])."""
        batch = dict(batch)
        batch["latents"] = self._encode(self.state, batch.pop("image"), np.int32(step))
        return batch

    def decode(self, state, latents):
        """Scaled latents [N, h, w, C] -> images [N, H, W, 3] in [-1, 1] (pure; jit it)."""
        images = nnx.merge(self._graphdef, state).images_from_latents(latents)
        return jnp.clip(images.astype(jnp.float32), -1.0, 1.0)
