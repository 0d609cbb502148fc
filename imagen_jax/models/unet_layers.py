"""Building blocks of the UNets (Flax NNX). Activations are channels-last: [B, H, W, C]."""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
from flax import nnx

from imagen_jax.models.attention import dot_product_attention
from imagen_jax.models.conv import Conv
from imagen_jax.models.norm import GroupNorm

zeros_init = nnx.initializers.zeros_init()


def timestep_embedding(t, dim: int, *, max_period: float = 10000.0):
    """Sinusoidal embedding [B, dim] of a scalar per example (Vaswani et al. 2017; DDPM)."""
    half = dim // 2
    freqs = jnp.exp(-math.log(max_period) * jnp.arange(half, dtype=jnp.float32) / half)
    args = jnp.asarray(t, jnp.float32)[:, None] * freqs[None]
    return jnp.concatenate([jnp.cos(args), jnp.sin(args)], axis=-1)


# 2-D positional features: sin and cos of 2 pi f u for each axis u in [0, 1] (pixel centres,
# as a fraction of the canvas, so the same place reads the same at every level) and POS_FREQS
# frequencies f in cycles per canvas.
POS_FREQS = 16
POS_FEATURES = 4 * POS_FREQS


def position_features(height: int, width: int):
    """[height * width, POS_FEATURES] sinusoidal features of each pixel's place, row-major."""
    freqs = jnp.geomspace(0.5, 16.0, POS_FREQS)

    def axis(n):
        u = (jnp.arange(n, dtype=jnp.float32) + 0.5) / n
        args = 2.0 * math.pi * u[:, None] * freqs[None]
        return jnp.concatenate([jnp.sin(args), jnp.cos(args)], axis=-1)  # [n, 2F]

    rows = jnp.broadcast_to(axis(height)[:, None], (height, width, 2 * POS_FREQS))
    cols = jnp.broadcast_to(axis(width)[None, :], (height, width, 2 * POS_FREQS))
    return jnp.concatenate([rows, cols], axis=-1).reshape(height * width, POS_FEATURES)


def group_count(channels: int, groups: int) -> int:
    """The largest group count <= `groups` that divides `channels`."""
    return math.gcd(channels, groups)


class ResBlock(nnx.Module):
    """BigGAN-style residual block with scale-shift conditioning on an embedding
    (Dhariwal & Nichol 2021, sec. 3; Imagen's ResNetBlock)."""

    def __init__(
        self,
        in_ch,
        out_ch,
        emb_dim,
        *,
        groups=32,
        dropout=0.0,
        rngs,
        dtype=None,
        param_dtype=jnp.float32,
    ):
        kw = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        self.norm1 = GroupNorm(in_ch, num_groups=group_count(in_ch, groups), **kw)
        self.conv1 = Conv(in_ch, out_ch, (3, 3), **kw)
        self.emb = nnx.Linear(emb_dim, 2 * out_ch, **kw)
        self.norm2 = GroupNorm(out_ch, num_groups=group_count(out_ch, groups), **kw)
        self.dropout = nnx.Dropout(dropout, rngs=rngs)
        self.conv2 = Conv(out_ch, out_ch, (3, 3), kernel_init=zeros_init, **kw)
        self.skip = Conv(in_ch, out_ch, (1, 1), **kw) if in_ch != out_ch else None

    def __call__(self, x, emb):  # x [B, H, W, Cin], emb [B, E]
        h = self.conv1(jax.nn.silu(self.norm1(x)))
        scale, shift = jnp.split(self.emb(jax.nn.silu(emb))[:, None, None], 2, axis=-1)
        h = self.norm2(h) * (1 + scale) + shift
        h = self.conv2(self.dropout(jax.nn.silu(h)))
        return h + (x if self.skip is None else self.skip(x))


class Attention(nnx.Module):
    """Multi-head attention of x [B, T, C] over itself or over a context [B, S, Cc]."""

    def __init__(
        self, dim, *, context_dim=None, head_dim=64, rngs, dtype=None, param_dtype=jnp.float32
    ):
        kw = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs, use_bias=False)
        self.heads = max(1, dim // head_dim)
        inner = self.heads * head_dim
        self.head_dim = head_dim
        self.q = nnx.Linear(dim, inner, **kw)
        self.kv = nnx.Linear(context_dim or dim, 2 * inner, **kw)
        self.out = nnx.Linear(
            inner, dim, dtype=dtype, param_dtype=param_dtype, rngs=rngs, kernel_init=zeros_init
        )

    def __call__(self, x, context=None, mask=None):  # mask [B, S] over the context
        context = x if context is None else context
        b, t, _ = x.shape
        q = self.q(x).reshape(b, t, self.heads, self.head_dim)
        k, v = jnp.split(
            self.kv(context).reshape(b, context.shape[1], 2 * self.heads, self.head_dim), 2, axis=2
        )
        out = dot_product_attention(q, k, v, mask=mask)  # [B, T, N, D]
        return self.out(out.reshape(b, t, self.heads * self.head_dim))


class TransformerBlock(nnx.Module):
    """Self-attention (optional), cross-attention to the text tokens (optional) and an MLP,
    pre-norm, on the pixels of a feature map as tokens (Imagen's attention layers).

    With `pos_emb`, a learned projection of `position_features` is added to the tokens the
    block attends with (not to the residual stream it returns to). Its weights start at zero,
    so a block grown from weights without it computes what they did; without it the block
    is blind to where a pixel is: attention is permutation-equivariant."""

    def __init__(
        self,
        dim,
        *,
        text_dim,
        self_attn=True,
        cross_attn=True,
        head_dim=64,
        ff_mult=2,
        groups=32,
        pos_emb=False,
        rngs,
        dtype=None,
        param_dtype=jnp.float32,
    ):
        kw = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        self.norm_in = GroupNorm(dim, num_groups=group_count(dim, groups), **kw)
        self.pos = nnx.Linear(POS_FEATURES, dim, kernel_init=zeros_init, **kw) if pos_emb else None
        self.self_attn = Attention(dim, head_dim=head_dim, **kw) if self_attn else None
        self.norm_self = nnx.LayerNorm(dim, **kw) if self_attn else None
        self.cross_attn = (
            Attention(dim, context_dim=text_dim, head_dim=head_dim, **kw) if cross_attn else None
        )
        self.norm_cross = nnx.LayerNorm(dim, **kw) if cross_attn else None
        self.norm_ff = nnx.LayerNorm(dim, **kw)
        self.ff_in = nnx.Linear(dim, ff_mult * dim, **kw)
        self.ff_out = nnx.Linear(ff_mult * dim, dim, kernel_init=zeros_init, **kw)

    def __call__(self, x, text, text_mask):  # x [B, H, W, C], text [B, L, Dt]
        b, hh, ww, c = x.shape
        h = self.norm_in(x).reshape(b, hh * ww, c)
        if self.pos is not None:
            h = h + self.pos(position_features(hh, ww).astype(h.dtype))[None]
        if self.self_attn is not None:
            h = h + self.self_attn(self.norm_self(h))
        if self.cross_attn is not None:
            h = h + self.cross_attn(self.norm_cross(h), text, text_mask)
        h = h + self.ff_out(jax.nn.gelu(self.ff_in(self.norm_ff(h))))
        return x + h.reshape(b, hh, ww, c)


class TextRefiner(nnx.Module):
    """Transformer layers over the frozen encoder's tokens, trained with the UNet (a token
    refiner): pre-norm self-attention among the tokens of the mask, then an MLP, each a
    residual branch whose output projection starts at zero, so a refiner added to a trained
    stage leaves its function unchanged at first.

    What it is for: the frozen tokens may carry a fact only in directions of tiny variance.
    In all-MiniLM-L6-v2, whether an object's word belongs to the object on the left in
    "A left of B" / "A right of B" (the exclusive-or of its role and the relation word) is
    only partly decodable from the object's token, and the mean difference between the two
    sides is a few percent of the tokens' spread (`imagen_jax.proj.shapes.text_probe`).
    Cross-attention keys are linear in the tokens; a refiner can compute the conjunction
    and give it room."""

    def __init__(
        self, dim, depth, *, head_dim=64, ff_mult=2, rngs, dtype=None, param_dtype=jnp.float32
    ):
        kw = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        self.norm_attn = nnx.List([nnx.LayerNorm(dim, **kw) for _ in range(depth)])
        self.attn = nnx.List([Attention(dim, head_dim=head_dim, **kw) for _ in range(depth)])
        self.norm_ff = nnx.List([nnx.LayerNorm(dim, **kw) for _ in range(depth)])
        self.ff_in = nnx.List([nnx.Linear(dim, ff_mult * dim, **kw) for _ in range(depth)])
        self.ff_out = nnx.List(
            [nnx.Linear(ff_mult * dim, dim, kernel_init=zeros_init, **kw) for _ in range(depth)]
        )

    def __call__(self, text, mask):  # text [B, L, D], mask [B, L] bool
        for i in range(len(self.attn)):
            text = text + self.attn[i](self.norm_attn[i](text), mask=mask)
            text = text + self.ff_out[i](jax.nn.gelu(self.ff_in[i](self.norm_ff[i](text))))
        return text


class AttentionPool(nnx.Module):
    """Pools text tokens [B, L, D] into one vector with a learned query (Imagen, sec. 2.1:
    a pooled text embedding added to the time embedding)."""

    def __init__(
        self, text_dim, out_dim, *, head_dim=64, rngs, dtype=None, param_dtype=jnp.float32
    ):
        self.query = nnx.Param(jax.random.normal(rngs.params(), (1, 1, text_dim)) * 0.02)
        self.attn = Attention(
            text_dim, head_dim=head_dim, rngs=rngs, dtype=dtype, param_dtype=param_dtype
        )
        self.proj = nnx.Linear(text_dim, out_dim, rngs=rngs, dtype=dtype, param_dtype=param_dtype)

    def __call__(self, text, mask):
        query = jnp.broadcast_to(self.query[...], (text.shape[0], 1, text.shape[-1]))
        return self.proj(self.attn(query.astype(text.dtype), text, mask)[:, 0])


class Downsample(nnx.Module):
    def __init__(self, in_ch, out_ch, *, rngs, dtype=None, param_dtype=jnp.float32):
        self.conv = nnx.Conv(
            in_ch, out_ch, (3, 3), strides=(2, 2), rngs=rngs, dtype=dtype, param_dtype=param_dtype
        )

    def __call__(self, x):
        return self.conv(x)


class Upsample(nnx.Module):
    def __init__(self, in_ch, out_ch, *, rngs, dtype=None, param_dtype=jnp.float32):
        self.conv = Conv(in_ch, out_ch, (3, 3), rngs=rngs, dtype=dtype, param_dtype=param_dtype)

    def __call__(self, x):
        b, h, w, c = x.shape
        return self.conv(jax.image.resize(x, (b, 2 * h, 2 * w, c), method="nearest"))
