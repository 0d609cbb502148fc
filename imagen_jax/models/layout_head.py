"""The layout head: a model option of the Imagen UNet (`UNetConfig.layout_grid` > 0).

A small attention module that predicts a coarse picture of the image from the frozen text
tokens alone; the UNet sees the prediction (gradient stopped, times `layout_scale`) next to
its input. It is trained by an auxiliary regression loss on `layout_target` (the shapes
research's `imagen_jax/proj/shapes/losses.py:layout`).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from imagen_jax.models.unet_layers import Attention, TextRefiner


class LayoutHead(nnx.Module):
    """A coarse picture of the image, read from the text alone: `grid` x `grid` learned
    queries attend over the frozen text tokens, and an MLP maps each to `channels` values.
    With `depth` > 0 the projected tokens first pass through that many self-attention layers
    (`TextRefiner`, each the identity at first, so a head grown with them keeps its
    function), and the queries read tokens that have seen the whole caption.

    It is fitted by regression on the image average-pooled to `grid` x `grid`, minus the
    image's mean (`layout_target`): the expected layout given the caption, where things of
    which colour go. A UNet with `layout_grid` > 0 receives this prediction, gradient
    stopped and upsampled, next to its input (`imagen_unet.UNet`).

    What it is for: a regression on the caption learns which object goes where within a few
    thousand steps (all-MiniLM-L6-v2 captions "A left of B": the side of each object
    right in 94% of held-out prompts), where the denoising loss, whose layout signal lies
    at high noise, had not taught a UNet the relation words in over a million images."""

    def __init__(
        self,
        text_dim,
        grid,
        channels,
        *,
        width=128,
        head_dim=32,
        depth=0,
        rngs,
        dtype=None,
        param_dtype=jnp.float32,
    ):
        kw = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        self.grid, self.channels = grid, channels
        self.proj = nnx.Linear(text_dim, width, **kw)
        self.queries = nnx.Param(jax.random.normal(rngs.params(), (1, grid * grid, width)) * 0.5)
        self.refiner = TextRefiner(width, depth, head_dim=head_dim, **kw) if depth else None
        self.attn = Attention(width, head_dim=head_dim, **kw)
        self.mlp_in = nnx.Linear(width, width, **kw)
        self.mlp_out = nnx.Linear(width, channels, **kw)

    def __call__(self, text, mask):  # text [B, L, Dt] frozen tokens, mask [B, L] -> [B, g, g, C]
        tokens = self.proj(text)
        if self.refiner is not None:
            tokens = self.refiner(tokens, mask.astype(bool))
        b = text.shape[0]
        queries = self.queries[...].astype(tokens.dtype)
        queries = jnp.broadcast_to(queries, (b, *queries.shape[1:]))
        out = self.mlp_out(jax.nn.gelu(self.mlp_in(self.attn(queries, tokens, mask))))
        return out.reshape(b, self.grid, self.grid, self.channels)


def layout_target(x0, grid: int):
    """What `LayoutHead` predicts: x0 [B, H, W, C] average-pooled to grid x grid, minus its
    mean over the grid (where the image departs from its mean colour)."""
    b, h, w, c = x0.shape
    if h % grid or w % grid:
        raise ValueError(f"layout grid {grid} does not divide the image size {h} x {w}")
    pooled = x0.reshape(b, grid, h // grid, grid, w // grid, c).mean(axis=(2, 4))
    return pooled - pooled.mean(axis=(1, 2), keepdims=True)
