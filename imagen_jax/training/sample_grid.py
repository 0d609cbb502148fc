"""The periodic sample grid: a few images from the EMA weights, saved as a PNG.

Base stages sample `train.sample_prompts`; super-resolution stages upsample the first
`train.num_samples` low-resolution images of the run's first batch (with their captions),
augmented at `train.noise_aug.sample_level`, and show the inputs in the grid's top row.
The noise is fixed for the whole run (from `train.seed`), so grids of successive steps
differ only by the weights. Sampling uses the `diffusion` and `sample` config groups
through the diffusion core's compiled sampler, with classifier-free guidance. Latent stages
(`latent`, a `training.latent_space.LatentSpace`) sample latents and decode them with the frozen
VAE inside the same compiled call.
"""

from __future__ import annotations

import itertools
import os

import jax
import jax.numpy as jnp
import numpy as np
from PIL import Image

from imagen_jax import parallel
from imagen_jax.diffusion import config as diffusion_config
from imagen_jax.diffusion import samplers
from imagen_jax.diffusion.adapter import low_res_condition, model_fn
from imagen_jax.images import image_rows, to_float_image, to_uint8
from imagen_jax.text.config import encode_captions


class SampleGrid:
    """`grid(step, ema_params, rest)` samples and (process 0) writes
    `workdir/samples/step_<step>.png`; returns the images, uint8 [N, R, R, 3]."""

    def __init__(self, config, net, mesh, encoder, workdir: str, first_batch=None, latent=None):
        self.workdir = workdir
        self.net = net
        n, res = config.train.num_samples, config.model.resolution
        schedule = diffusion_config.make_schedule(config.diffusion)
        sampling = diffusion_config.make_sampling(config.diffusion, config.sample)
        rep = parallel.replicated(mesh)
        key = jax.random.fold_in(jax.random.key(config.train.seed), 1)  # 0: the init
        key_z, key_aug, key_sampler = jax.random.split(key, 3)
        self._key = parallel.replicate(np.asarray(jax.random.key_data(key_sampler)), mesh)

        if net.low_res:
            if first_batch is None:
                raise ValueError("a super-resolution stage samples from its first batch")
            level = float(config.train.noise_aug.sample_level)

            def prepare(batch):
                low = to_float_image(batch["low_res"][:n])  # [N, r, r, 3]
                aug_t = jnp.full((n,), level, jnp.float32)
                size = (res, res) if net.upscales_low_res else None
                cond = dict(text=batch["text"][:n], text_mask=batch["text_mask"][:n])
                cond.update(low_res_condition(low, aug_t, key_aug, schedule=schedule, size=size))
                return cond, low

            cond, low = jax.jit(prepare, out_shardings=rep)(first_batch)
            self.prompts = None
            up = res // low.shape[1]
            self._inputs = to_uint8(np.repeat(np.repeat(np.asarray(low), up, 1), up, 2))
        else:
            self.prompts = list(itertools.islice(itertools.cycle(config.train.sample_prompts), n))
            cond = parallel.replicate(encode_captions(encoder, self.prompts), mesh)
            self._inputs = None
        flags = parallel.replicate({"cond": np.zeros(n, bool), "uncond": np.ones(n, bool)}, mesh)
        self._cond = dict(cond, drop_text=flags["cond"])
        self._uncond = dict(cond, drop_text=flags["uncond"])
        shape = (res, res, 3) if latent is None else latent.latent_shape(res)
        z = np.asarray(jax.random.normal(key_z, (n, *shape)))
        self._z = parallel.replicate(sampling.grid.init_sigma * z, mesh)
        scale = sampling.guidance_scale
        guided = scale != 1.0

        def apply_fn(params_rest, z_t, t, cond):
            params, rest = params_rest
            return model_fn(net.merge(params, rest), schedule=schedule)(z_t, t, cond)

        run = samplers.compile_sampler(
            apply_fn,
            sampler=sampling.sampler,
            sampler_options=sampling.sampler_options,
            **sampling.denoiser_options,
        )

        self._vae = None if latent is None else latent.state

        def sample(params, rest, vae, z, cond, uncond, key):
            keys = jax.random.split(jax.random.wrap_key_data(key), z.shape[0])
            x = run(
                (params, rest),
                z,
                sampling.grid,
                cond,
                uncond if guided else None,
                scale if guided else None,
                keys,
            )
            return x if latent is None else latent.decode(vae, x)

        self._sample = jax.jit(sample, out_shardings=rep)

    def __call__(self, step: int, ema_params, rest) -> np.ndarray:
        x = self._sample(ema_params, rest, self._vae, self._z, self._cond, self._uncond, self._key)
        images = to_uint8(x)
        if jax.process_index() == 0:
            folder = os.path.join(self.workdir, "samples")
            os.makedirs(folder, exist_ok=True)
            rows = [images] if self._inputs is None else [self._inputs, images]
            Image.fromarray(image_rows(rows)).save(os.path.join(folder, f"step_{step:08d}.png"))
            if self.prompts is not None:
                with open(os.path.join(folder, "prompts.txt"), "w") as f:
                    f.write("\n".join(self.prompts) + "\n")
        return images
