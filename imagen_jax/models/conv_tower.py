"""Small convolutional image towers for the shapes domain's image-reading models.

A stem (3x3) and per width a stride-2 3x3 convolution and a 3x3 one, each followed by
GroupNorm and GELU (`ConvStages`), with two heads:

- `ConvTower`: the last map [S / 2^k, S / 2^k, C] flattened (where things are is kept) and
  projected to one vector (`.pooled` [B, width], as `vit.CLIPVisionEncoder` returns it): the
  image tower of `frozen_text_towers` (the shapes embedding model);
- `ConvTokens`: each location of the last map projected to `width`, plus a learned position
  embedding (`.last_hidden_state` [B, N, width], N = (S / 2^k)^2, and `post_layernorm`, as
  the ViT's): the image tower of a GIT captioner with `image_tower="conv"`.

With `foreground=True` the stem also sees a colour-blind foreground channel
(`foreground_channel`): on a plain background the objects' silhouettes whatever their
colours, so that a shape detector need not be learnt once per colour. A ViT reading the
same renders learns colour at once and shape barely (docs/embeddings.md, docs/captioning.md).
"""

from __future__ import annotations

import math
from typing import NamedTuple

import jax
import jax.numpy as jnp
from flax import nnx


def check_widths(widths, image_size: int) -> None:
    """ValueError unless `widths` are positive and image_size divides by 2 ** len(widths)."""
    stride = 2 ** len(widths)
    if not widths or min(widths) < 1:
        raise ValueError(f"conv_widths={tuple(widths)}: positive widths, one or more")
    if image_size % stride:
        raise ValueError(
            f"image_size {image_size} is not divisible by {stride} "
            f"(2 ** len(conv_widths={tuple(widths)}))"
        )


def foreground_channel(pixels: jax.Array) -> jax.Array:
    """[B, H, W, C] -> [B, H, W, 1]: each pixel's Euclidean distance from its image's
    per-channel median (the background, where it covers most of the image), over sqrt(C)."""
    background = jnp.median(pixels, axis=(1, 2), keepdims=True)
    distance = jnp.sqrt(jnp.sum(jnp.square(pixels - background), -1, keepdims=True) + 1e-12)
    return distance / math.sqrt(pixels.shape[-1])


class ConvStages(nnx.Module):
    """The convolutions: pixel_values [B, S, S, 3] (preprocessed, NHWC) -> the last map
    [B, S / 2^k, S / 2^k, widths[-1]] (`feature_map`)."""

    def __init__(self, widths, *, image_size: int, foreground: bool, rngs, dtype, param_dtype):
        check_widths(widths, image_size)
        kw = dict(rngs=rngs, dtype=dtype, param_dtype=param_dtype)
        self.foreground = foreground
        self.stem = nnx.Conv(4 if foreground else 3, widths[0], (3, 3), **kw)
        layers, c = [], widths[0]
        for w in widths:
            layers.append(nnx.Conv(c, w, (3, 3), strides=2, **kw))
            layers.append(nnx.GroupNorm(w, num_groups=min(8, w), **kw))
            layers.append(nnx.Conv(w, w, (3, 3), **kw))
            layers.append(nnx.GroupNorm(w, num_groups=min(8, w), **kw))
            c = w
        self.layers = nnx.List(layers)

    def feature_map(self, pixel_values: jax.Array) -> jax.Array:
        if self.foreground:
            pixel_values = jnp.concatenate(
                [pixel_values, foreground_channel(pixel_values)], axis=-1
            )
        x = jax.nn.gelu(self.stem(pixel_values))
        for i in range(0, len(self.layers), 2):
            x = jax.nn.gelu(self.layers[i + 1](self.layers[i](x)))
        return x


class Pooled(NamedTuple):
    pooled: jax.Array


class ConvTower(ConvStages):
    """`ConvStages` whose flattened last map is projected to `width`: `.pooled` [B, width]."""

    def __init__(self, widths, *, image_size: int, width: int, foreground: bool, **kw):
        super().__init__(widths, image_size=image_size, foreground=foreground, **kw)
        side = image_size // 2 ** len(widths)
        self.head = nnx.Linear(side * side * widths[-1], width, **_kw(kw))

    def __call__(self, pixel_values: jax.Array) -> Pooled:
        x = self.feature_map(pixel_values)
        return Pooled(self.head(x.reshape(x.shape[0], -1)))


class Tokens(NamedTuple):
    last_hidden_state: jax.Array


class ConvTokens(ConvStages):
    """`ConvStages` whose last map's locations are tokens: a Linear to `width` plus a
    learned position embedding each (row-major), `.last_hidden_state` [B, N, width];
    `post_layernorm` is the caller's to apply, as with the ViT.

    cell_classes > 0 adds `cell_head`, a Linear from each token to that many classes: the
    per-cell classifier of an auxiliary training loss (what each cell shows), which makes
    the tokens carry what a language-modelling loss alone teaches them slowly."""

    def __init__(
        self,
        widths,
        *,
        image_size: int,
        width: int,
        foreground: bool,
        layer_norm_eps,
        cell_classes: int = 0,
        **kw,
    ):
        super().__init__(widths, image_size=image_size, foreground=foreground, **kw)
        n = (image_size // 2 ** len(widths)) ** 2
        self.head = nnx.Linear(widths[-1], width, **_kw(kw))
        init = nnx.initializers.normal(0.02)
        self.position_embedding = nnx.Param(
            init(kw["rngs"].params(), (n, width), kw["param_dtype"])
        )
        self.post_layernorm = nnx.LayerNorm(
            width, epsilon=layer_norm_eps, use_fast_variance=False, **_kw(kw)
        )
        self.cell_head = nnx.Linear(width, cell_classes, **_kw(kw)) if cell_classes else None

    def __call__(self, pixel_values: jax.Array) -> Tokens:
        x = self.feature_map(pixel_values)
        x = self.head(x.reshape(x.shape[0], -1, x.shape[-1]))
        return Tokens(x + self.position_embedding[...].astype(x.dtype))


def _kw(kw: dict) -> dict:
    return dict(rngs=kw["rngs"], dtype=kw["dtype"], param_dtype=kw["param_dtype"])
