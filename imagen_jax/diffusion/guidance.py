"""Classifier-free guidance and the clipping of x0 predictions for pixel models.

CFG: Ho & Salimans 2022, out = uncond + w (cond - uncond), w = 1 is the conditional model.
The conditional and unconditional branches run as one batched network call. With a learned
variance the guidance acts on the prediction channels only and the variance comes from the
conditional branch, as DeepFloyd IF's pipeline does. Guidance rescale: Lin et al. 2024,
"Common Diffusion Noise Schedules and Sample Steps are Flawed", eq. 15-16.
Dynamic thresholding: Saharia et al. 2022 (Imagen), sec. 2.3.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp


def _concat(a, b):
    return jax.tree.map(lambda x, y: jnp.concatenate([x, y], axis=0), a, b)


def cfg_model(model_fn, *, uncond, guidance_scale, guidance_rescale=0.0, pred_channels=None):
    """Wraps `model_fn(z, t, cond)` into a guided one with the same signature.

    uncond: the negative or null conditioning, a pytree shaped like `cond`.
    guidance_scale: a scalar, or an array broadcastable to the batch (traced, so changing it
      never recompiles).
    pred_channels: with a learned variance, the number of prediction channels to guide.
    """

    def guided(z, t, cond):
        batch = z.shape[0]
        out = model_fn(jnp.concatenate([z, z]), jnp.concatenate([t, t]), _concat(cond, uncond))
        out_cond, out_uncond = out[:batch], out[batch:]
        extra = None
        if pred_channels is not None:
            out_cond, extra = out_cond[..., :pred_channels], out_cond[..., pred_channels:]
            out_uncond = out_uncond[..., :pred_channels]
        w = jnp.asarray(guidance_scale, out.dtype)
        guided_out = out_uncond + w * (out_cond - out_uncond)
        if guidance_rescale:
            guided_out = rescale_guidance(guided_out, out_cond, guidance_rescale=guidance_rescale)
        if extra is not None:
            guided_out = jnp.concatenate([guided_out, extra], axis=-1)
        return guided_out

    return guided


def rescale_guidance(guided, cond, *, guidance_rescale: float):
    """Match the std of the guided prediction to the conditional one, mixed by `phi`."""
    axes = tuple(range(1, guided.ndim))
    std_cond = jnp.std(cond, axis=axes, keepdims=True, ddof=1)
    std_guided = jnp.std(guided, axis=axes, keepdims=True, ddof=1)
    rescaled = guided * (std_cond / std_guided)
    return guidance_rescale * rescaled + (1.0 - guidance_rescale) * guided


def dynamic_threshold(x0, *, percentile: float = 0.995, max_value: float = 1.0):
    """Imagen's dynamic thresholding: s = the `percentile` quantile of |x0| per sample, clamped
    to [1, max_value]; x0 is clipped to [-s, s] and divided by s."""
    flat = jnp.abs(x0.reshape(x0.shape[0], -1)).astype(jnp.float32)
    s = jnp.clip(jnp.quantile(flat, percentile, axis=1), 1.0, max_value)
    s = s.reshape((-1,) + (1,) * (x0.ndim - 1)).astype(x0.dtype)
    return jnp.clip(x0, -s, s) / s


def static_clip(x0, *, clip_range: float = 1.0):
    return jnp.clip(x0, -clip_range, clip_range)


def check_guidance_schedule(guidance_scale, num_steps: int):
    """A guidance scale is a scalar or one value per step; anything else is an error."""
    shape = jnp.shape(guidance_scale)
    if shape not in ((), (num_steps,)):
        raise ValueError(
            f"guidance_scale must be a scalar or have one value per step ({num_steps}), "
            f"got shape {shape}"
        )
    return jnp.broadcast_to(jnp.asarray(guidance_scale, jnp.float32), (num_steps,))
