"""Convolutions for the UNets: `lax.conv_general_dilated` with a faster weight gradient on
the CPU.

`conv_general_dilated` has `lax.conv_general_dilated`'s signature (flax's `nnx.Conv` takes it
as its `conv_general_dilated` argument) and the same forward pass everywhere. On XLA's CPU
backend the weight gradient of a stride-1, "same"-padded float32 convolution in NHWC / HWIO
is the slowest operation of a UNet's training step (bench/README.md, train_vs_imagen_pytorch:
3-4x slower per FLOP than the forward convolution). There it is computed instead as matrix
products over shifted views of the flattened input (a custom VJP):

- pad x [B, H, W, C] to [B, H + 2p + 1, W + 2p, C] and flatten each image's pixels: the
  input under kernel tap (i, j) of output pixel q is then input pixel q + i * (W + 2p) + j,
  one offset per tap;
- pad the output gradient g to the same width (zeros outside the image) and flatten it;
- tap (i, j)'s weight gradient is gᵀ @ (x from that tap's offset), matrix products that
  reduce over the pixels of groups of images, summed.

The input gradient and every other case (strides, dilation, groups, other layouts or
dtypes, other backends) are `lax.conv_general_dilated`'s own. Being a custom VJP, the CPU
path supports reverse-mode differentiation only (`jax.grad`, not `jax.jvp`).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from flax import nnx
from jax import lax

_NHWC = ("NHWC", "HWIO", "NHWC")
# Below these (3x3 kernels), XLA's own weight gradient is used: see _matmul_weight_grad_pays.
MIN_IMAGE_PIXELS = 1024
MIN_BATCH = 4
MIN_PIXELS = 8192
MIN_IN_CHANNELS = 64
# The weight gradient's products are split over at most this many groups of images.
MAX_GROUPS = 8


def conv_general_dilated(
    lhs,
    rhs,
    window_strides,
    padding,
    lhs_dilation=None,
    rhs_dilation=None,
    dimension_numbers=None,
    feature_group_count=1,
    batch_group_count=1,
    precision=None,
    preferred_element_type=None,
    **kwargs,
):
    """`lax.conv_general_dilated`, with the CPU weight gradient above where it applies."""
    pads = _same_padding(rhs, padding)
    if (
        jax.default_backend() == "cpu"
        and pads is not None
        and lhs.ndim == 4
        and lhs.dtype == rhs.dtype == jnp.float32
        and preferred_element_type in (None, jnp.float32)
        and tuple(window_strides) == (1, 1)
        and all(d is None or tuple(d) == (1, 1) for d in (lhs_dilation, rhs_dilation))
        and _is_nhwc(dimension_numbers)
        and feature_group_count == batch_group_count == 1
        and kwargs.get("out_sharding") is None
        and _matmul_weight_grad_pays(lhs.shape, rhs.shape)
    ):
        return _conv_same(lhs, rhs, pads, precision)
    return lax.conv_general_dilated(
        lhs,
        rhs,
        window_strides,
        padding,
        lhs_dilation=lhs_dilation,
        rhs_dilation=rhs_dilation,
        dimension_numbers=dimension_numbers,
        feature_group_count=feature_group_count,
        batch_group_count=batch_group_count,
        precision=precision,
        preferred_element_type=preferred_element_type,
        **kwargs,
    )


def Conv(in_features: int, out_features: int, kernel_size, **kwargs) -> nnx.Conv:
    """`nnx.Conv` computing through `conv_general_dilated` (same parameters and outputs)."""
    return nnx.Conv(
        in_features, out_features, kernel_size, conv_general_dilated=conv_general_dilated, **kwargs
    )


def _matmul_weight_grad_pays(x_shape, kernel_shape) -> bool:
    """Where the matrix-product weight gradient was the faster on a 2-core x86 CPU
    (bench/conv_grad.py): every 1x1 convolution (2-3x), and larger kernels over images of
    at least 32x32 pixels, at least 4 of them and 8192 pixels in all, with at least 64 input
    channels (1.3-1.7x); on smaller images, batches or widths XLA's own is as fast or faster."""
    kh, kw, cin, _ = kernel_shape
    b, h, w = x_shape[:3]
    if kh * kw == 1:
        return True
    return (
        h * w >= MIN_IMAGE_PIXELS
        and b >= MIN_BATCH
        and b * h * w >= MIN_PIXELS
        and cin >= MIN_IN_CHANNELS
    )


def _is_nhwc(dimension_numbers) -> bool:
    if dimension_numbers is None:
        return False
    if isinstance(dimension_numbers, lax.ConvDimensionNumbers):
        return tuple(dimension_numbers) == ((0, 3, 1, 2), (3, 2, 0, 1), (0, 3, 1, 2))
    return tuple(dimension_numbers) == _NHWC


def _same_padding(rhs, padding):
    """((ph, ph), (pw, pw)) where the padding keeps the size at stride 1 (an odd kernel,
    (k - 1) / 2 on each side), else None."""
    if rhs.ndim != 4:
        return None
    kh, kw = rhs.shape[:2]
    if kh % 2 == 0 or kw % 2 == 0:
        return None
    same = ((kh // 2, kh // 2), (kw // 2, kw // 2))
    if isinstance(padding, str):
        return same if padding.upper() == "SAME" else None
    return same if tuple(tuple(p) for p in padding) == same else None


def _lax_conv(x, w, pads, precision):
    return lax.conv_general_dilated(
        x, w, (1, 1), pads, dimension_numbers=_NHWC, precision=precision
    )


@functools.partial(jax.custom_vjp, nondiff_argnums=(2, 3))
def _conv_same(x, w, pads, precision):
    return _lax_conv(x, w, pads, precision)


def _conv_same_fwd(x, w, pads, precision):
    return _lax_conv(x, w, pads, precision), (x, w)


def _conv_same_bwd(pads, precision, residuals, g):
    x, w = residuals
    _, input_vjp = jax.vjp(lambda x: _lax_conv(x, w, pads, precision), x)
    (dx,) = input_vjp(g)
    return dx, _weight_grad(x, g, w.shape, precision)


_conv_same.defvjp(_conv_same_fwd, _conv_same_bwd)


def _weight_grad(x, g, kernel_shape, precision):
    """d loss / d w [kh, kw, C, O] of a stride-1 "same" convolution, from the input x
    [B, H, W, C] and the output gradient g [B, H, W, O] (see the module docstring)."""
    kh, kw, c, o = kernel_shape
    b, h, w, _ = x.shape
    ph, pw = kh // 2, kw // 2
    row = w + 2 * pw  # padded width
    rows = h + 2 * ph + 1  # padded height, one spare row so the last tap stays in the image
    xp = jnp.pad(x, ((0, 0), (ph, ph + 1), (pw, pw), (0, 0))).reshape(b, rows * row, c)
    # The output pixels with the padded width's extra columns, there with zero gradient.
    n = h * row
    gp = jnp.pad(g, ((0, 0), (0, 0), (0, row - w), (0, 0))).reshape(b, n, o)
    # One product per tap and group of images, summed: XLA's CPU backend runs separate
    # products side by side on its cores and keeps a group's pixels in cache, where one
    # product over the whole batch runs on one core. With several devices the batch is
    # sharded over them and a group would be gathered from its shards: there, one product
    # per tap over whole images (not the batch flattened into one pixel axis), which keeps
    # each device's pixels where they are.
    most = 1 if jax.device_count() > 1 else min(b, MAX_GROUPS)
    groups = max(d for d in range(1, most + 1) if b % d == 0)
    size = b // groups

    def tap(i, j):
        views = (
            jnp.einsum(
                "bpo,bpc->oc",
                gp[k * size : (k + 1) * size],
                xp[k * size : (k + 1) * size, i * row + j : i * row + j + n],
                precision=precision,
            )
            for k in range(groups)
        )
        return functools.reduce(jnp.add, views)

    taps = [tap(i, j) for i in range(kh) for j in range(kw)]
    return jnp.stack(taps).reshape(kh, kw, o, c).transpose(0, 1, 3, 2)
