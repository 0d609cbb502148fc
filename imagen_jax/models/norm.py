"""Group normalization for the UNets and the VAE: `nnx.GroupNorm` (same parameters, same
arguments) with statistics that XLA's CPU backend computes 2-5x faster.

`nnx.GroupNorm` reduces x [B, ..., C] viewed as [B, ..., G, C / G] over every axis but the
batch and the group: on the CPU the innermost reduction then runs over the few channels of
a group, which does not vectorise. Here, on the CPU, each channel is first summed over the
pixels (the channels stay the vectorised axis) and the channel sums are then added up per
group, for the mean and again for the variance of the deviations from it (two passes, the
numerics of `use_fast_variance=False`, whatever that flag says). bench/group_norm.py
has the timings; other backends, masks, custom reduction axes and dtypes other than float32
take flax's own computation.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx


class GroupNorm(nnx.GroupNorm):
    def __call__(self, x, *, mask=None):
        if (
            jax.default_backend() != "cpu"
            or mask is not None
            or self.reduction_axes is not None
            or getattr(self, "axis_name", None) is not None
            or x.ndim < 3
            or x.dtype != jnp.float32
            or self.dtype not in (None, jnp.float32)
            or self.param_dtype != jnp.float32
        ):
            return super().__call__(x, mask=mask)
        scale = self.scale[...] if self.scale is not None else None
        bias = self.bias[...] if self.bias is not None else None
        return group_norm(x, self.num_groups, self.epsilon, scale=scale, bias=bias)


def group_norm(x, groups: int, epsilon: float, *, scale=None, bias=None):
    """Group normalization of x [B, ..., C] over its pixels and each group's channels."""
    b, c = x.shape[0], x.shape[-1]
    flat = x.reshape(b, -1, c)  # [B, pixels, C]
    count = flat.shape[1] * (c // groups)

    def per_group(channel_sums):  # [B, C] -> [B, C]: each channel's group total / count
        totals = channel_sums.reshape(b, groups, c // groups).sum(axis=-1) / count
        return jnp.repeat(totals, c // groups, axis=1)

    deviation = flat - per_group(flat.sum(axis=1))[:, None]
    inverse = jax.lax.rsqrt(per_group(jnp.sum(deviation * deviation, axis=1)) + epsilon)
    if scale is not None:
        inverse = inverse * scale
    y = deviation * inverse[:, None]
    if bias is not None:
        y = y + bias
    return y.reshape(x.shape)
