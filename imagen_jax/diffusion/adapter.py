"""The network adapter: how a network meets the diffusion core, written once for the
trainer and the samplers.

- `model_fn(model, schedule=...)` is the network as `denoise_fn(z_t, t, cond)`, told the
  time in its own convention (`unit_time`, or diffusers' `diffusers_timesteps`).
- `augment_low_res` is the noise-conditioning augmentation of super-resolution stages
  (Imagen, sec. 2.4; Ho et al. 2022, "Cascaded Diffusion Models", sec. 4.1): the
  low-resolution input is noised with the stage's own schedule at unit time aug_t, and the
  network is told aug_t. The trainer draws aug_t at random, the cascade sampler uses the
  stage's fixed level. DeepFloyd IF stage II noises its input after upscaling it to the
  output size (`resize_bilinear_aligned`, `low_res_condition(size=...)`) and is told the
  integer timestep of the level.

Plain functions over jnp arrays; a network is anything callable as `model(z, t, cond)`.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from imagen_jax.diffusion import losses, schedules

TIMESTEP_SCALE = 1000.0  # logSNR schedules' unit time -> diffusers-style timesteps


def unit_time(t, *, schedule):
    """The time a sampler or loss tells the network, as a unit time in [0, 1]: logSNR
    schedules already use it; discrete timesteps and flow's sigma * T are divided by T.
    The UNet scales it by its `time_scale` (1000) before the sinusoidal embedding."""
    if isinstance(schedule, schedules.LogSNRSchedule):
        return t
    return jnp.asarray(t, jnp.float32) / schedule.num_train_timesteps


def diffusers_timesteps(t, *, schedule):
    """The time as diffusers' UNets are told it: a discrete schedule's timesteps 0..T-1 and
    flow's sigma * T as they are; a logSNR schedule's unit time times 1000."""
    if isinstance(schedule, schedules.LogSNRSchedule):
        return jnp.asarray(t, jnp.float32) * TIMESTEP_SCALE
    return jnp.asarray(t, jnp.float32)


def model_fn(model, *, schedule):
    """The network as `denoise_fn(z_t, t, cond)`, the contract of the diffusion core. It is
    told `unit_time`, or `diffusers_timesteps` when its `time_input` is "timesteps"."""
    if getattr(model, "time_input", "unit") == "timesteps":
        return lambda z_t, t, cond: model(z_t, diffusers_timesteps(t, schedule=schedule), cond)
    return lambda z_t, t, cond: model(z_t, unit_time(t, schedule=schedule), cond)


def augment_low_res(low_res, aug_t, key, *, schedule):
    """Noise-conditioning augmentation: low_res [B, h, w, C] in [-1, 1] noised to unit time
    aug_t [B] with `schedule` (`losses.time_from_unit`: a discrete schedule's timestep
    floor(aug_t T), a logSNR schedule's t = aug_t, flow's shifted time).

    key: one key for the whole batch (the trainer), or one key per row [B] (the cascade
    sampler: a row's noise then does not depend on the batch it is placed in).
    """
    _, alpha_t, sigma_t = losses.time_from_unit(aug_t, schedule=schedule)
    if jnp.ndim(key) == 0:
        eps = jax.random.normal(key, low_res.shape, jnp.float32)
    else:
        eps = jax.vmap(lambda k: jax.random.normal(k, low_res.shape[1:]))(key)
    return losses.add_noise(x0=low_res, eps=eps, alpha_t=alpha_t, sigma_t=sigma_t)


def low_res_condition(low_res, aug_t, key, *, schedule, size=None) -> dict:
    """The super-resolution stage's conditioning entries: {"low_res": the input noised to
    aug_t (`augment_low_res`), "aug_t": aug_t, "aug_timestep": the schedule's timestep of
    aug_t (a discrete schedule's floor(aug_t T): IF stage II's class label)}. With `size`
    (H, W), low_res is first upscaled to it (`resize_bilinear_aligned`), as IF stage II's
    input is; without it, it is noised at its own size (the Imagen SR stages)."""
    if size is not None:
        low_res = resize_bilinear_aligned(jnp.asarray(low_res, jnp.float32), size)
    noised = augment_low_res(low_res, aug_t, key, schedule=schedule)
    timestep, _, _ = losses.time_from_unit(aug_t, schedule=schedule)
    return {"low_res": noised, "aug_t": aug_t, "aug_timestep": jnp.asarray(timestep, jnp.float32)}


def _interpolation_matrix(n_in: int, n_out: int) -> np.ndarray:
    """[n_out, n_in] weights of 1-D linear interpolation with the corner pixels aligned."""
    scale = (n_in - 1) / (n_out - 1) if n_out > 1 else 0.0
    src = np.arange(n_out, dtype=np.float32) * np.float32(scale)
    low = np.minimum(np.floor(src).astype(int), n_in - 1)
    high = np.minimum(low + 1, n_in - 1)
    frac = src - low
    weights = np.zeros((n_out, n_in), np.float32)
    np.add.at(weights, (np.arange(n_out), low), 1.0 - frac)
    np.add.at(weights, (np.arange(n_out), high), frac)
    return weights


def resize_bilinear_aligned(x: jax.Array, size: tuple[int, int]) -> jax.Array:
    """[B, h, w, C] -> [B, H, W, C] bilinearly with the corners aligned, as PyTorch's
    `F.interpolate(mode="bilinear", align_corners=True)`, which diffusers' IF stage II uses
    (`jax.image.resize` samples at pixel centres instead)."""
    rows = _interpolation_matrix(x.shape[1], size[0])
    cols = _interpolation_matrix(x.shape[2], size[1])
    return jnp.einsum(
        "Hh,bhwc,Ww->bHWc", rows, x, cols, precision=jax.lax.Precision.HIGHEST
    ).astype(x.dtype)
