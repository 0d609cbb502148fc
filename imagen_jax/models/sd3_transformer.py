"""The MMDiT of Stable Diffusion 3 / 3.5: diffusers' `SD3Transformer2DModel` in Flax NNX.

MMDiT (Esser et al. 2024, "Scaling Rectified Flow Transformers for High-Resolution Image
Synthesis", sec. 4) is a diffusion transformer with two streams of tokens, the image's
patches and the text encoder's tokens, each with its own weights (projections, norms, MLPs)
but one joint attention over both: in every block the image and text queries, keys and
values are concatenated (image tokens first) and attend together. The timestep's sinusoidal
embedding plus a projection of the pooled text vector conditions every block through
adaLN-Zero modulation (shift, scale and gate per sublayer). The last block is "context pre
only": its text tokens serve as keys and values but are not updated (no text output
projection, no text MLP).

Options of the public checkpoints:
  - SD 3.0 (Medium): the plain MMDiT above.
  - SD 3.5 Large / Large Turbo: `qk_norm="rms_norm"`, an RMSNorm with a learned scale on
    every head's queries and keys, for the image and the text projections alike.
  - SD 3.5 Medium (MMDiT-X): `qk_norm` and `dual_attention_layers`: those blocks have a second
    self-attention over the image tokens only (`attn2`), modulated by three more adaLN-Zero
    vectors (diffusers' SD35AdaLayerNormZeroX: 9 instead of 6 chunks).
  - `pos_embed_max_size`: a fixed 2D sincos position table of pos_embed_max_size^2 entries
    (stored in the checkpoint as `pos_embed.pos_embed`), centre-cropped to the latent's grid
    of patches, so that one model takes several resolutions. Without it (None) the table is
    computed for the latent's grid, as diffusers' PatchEmbed does.
`SD3TransformerConfig.from_hf` reads a diffusers `transformer/config.json` and refuses every
value that this module does not implement.

Conventions:
  - Activations are channels-last: the latents are [B, H, W, C] in and [B, H, W, out_channels]
    out (diffusers: NCHW). H and W must be multiples of patch_size.
  - `timestep` is the value diffusers' model receives, the flow-matching sigma times 1000
    (a float, not an integer step). What the output means (the flow velocity for SD3) is the
    sampler's business.
  - Not implemented: ControlNet residuals, IP-Adapter image tokens, `skip_layers` (skip-layer
    guidance), LoRA scales and fused QKV projections.

Parameters are named as diffusers names its tensors (`transformer_blocks.3.attn.add_q_proj`), so
that `hf_key_map` is a mechanical renaming; `load_sd3_transformer` fills an abstract model from
a diffusers `transformer/` directory strictly (see `imagen_jax.weights.load_into`).
"""

from __future__ import annotations

import dataclasses
import functools
import os
from collections.abc import Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from imagen_jax.models import diffusers_loading
from imagen_jax.models.attention import dot_product_attention
from imagen_jax.models.cpu_fusion import materialize
from imagen_jax.models.sd_unet import (
    TimestepEmbedding,
    sinusoidal_embedding,
)
from imagen_jax.weights import Source

CLASS_NAME = "SD3Transformer2DModel"
WEIGHTS_NAME = diffusers_loading.WEIGHTS_NAME
QK_NORMS = (None, "rms_norm")
TIME_PROJ_DIM = 256  # diffusers' CombinedTimestepTextProjEmbeddings: Timesteps(256, ...)
NORM_EPS = 1e-6  # every LayerNorm / RMSNorm of the model


def _gelu_tanh(x):
    return jax.nn.gelu(x, approximate=True)


# --------------------------------------------------------------------------------------------
# Config


@dataclasses.dataclass(frozen=True)
class SD3TransformerConfig:
    """diffusers' SD3Transformer2DModel arguments, with its defaults and names.

    Allowed values are those implemented here; anything else raises ValueError naming the key.
    `sample_size` is not only informational: the position table's grid is scaled by
    sample_size // patch_size (diffusers' `base_size`).
    """

    sample_size: int = 128
    patch_size: int = 2
    in_channels: int = 16
    num_layers: int = 18
    attention_head_dim: int = 64
    num_attention_heads: int = 18
    joint_attention_dim: int = 4096  # width of the text encoders' tokens
    caption_projection_dim: int = 1152  # must equal num_attention_heads * attention_head_dim
    pooled_projection_dim: int = 2048  # width of the pooled text vector
    out_channels: int | None = 16  # None: in_channels
    pos_embed_max_size: int | None = 96
    dual_attention_layers: tuple[int, ...] = ()  # SD 3.5 Medium: blocks with attn2
    qk_norm: str | None = None  # None | rms_norm

    def __post_init__(self):
        layers = self.dual_attention_layers
        if isinstance(layers, list | tuple):
            object.__setattr__(self, "dual_attention_layers", tuple(layers))
        _validate(self)

    @classmethod
    def from_hf(cls, hf: Mapping[str, Any]) -> SD3TransformerConfig:
        """From diffusers' `transformer/config.json` (a dict). Keys starting with `_` are
        metadata."""
        name = hf.get("_class_name", CLASS_NAME)
        if name != CLASS_NAME:
            raise ValueError(f"_class_name {name!r} is not {CLASS_NAME}")
        fields = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(k for k in hf if k not in fields and not k.startswith("_"))
        if unknown:
            raise ValueError(
                "config keys not implemented by SD3Transformer: "
                + ", ".join(f"{k}={hf[k]!r}" for k in unknown)
            )
        return cls(**{k: v for k, v in hf.items() if k in fields})

    @property
    def inner_dim(self) -> int:
        return self.num_attention_heads * self.attention_head_dim

    @property
    def output_channels(self) -> int:
        return self.in_channels if self.out_channels is None else self.out_channels

    @property
    def base_size(self) -> int:
        """The grid size at which the position table's coordinates step by 1."""
        return self.sample_size // self.patch_size


def _fail(key: str, value, expected: str):
    raise ValueError(f"unsupported {key}={value!r}: SD3Transformer implements {expected}")


def _positive_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value > 0


def _validate(c: SD3TransformerConfig) -> None:
    for key in (
        "sample_size",
        "patch_size",
        "in_channels",
        "num_layers",
        "attention_head_dim",
        "num_attention_heads",
        "joint_attention_dim",
        "caption_projection_dim",
        "pooled_projection_dim",
    ):
        if not _positive_int(getattr(c, key)):
            _fail(key, getattr(c, key), "a positive int")
    for key in ("out_channels", "pos_embed_max_size"):
        value = getattr(c, key)
        if value is not None and not _positive_int(value):
            _fail(key, value, "None or a positive int")
    if c.sample_size < c.patch_size:
        _fail("sample_size", c.sample_size, f"at least patch_size ({c.patch_size})")
    if c.qk_norm not in QK_NORMS:
        _fail("qk_norm", c.qk_norm, " | ".join(map(str, QK_NORMS)))
    layers = c.dual_attention_layers
    if not isinstance(layers, tuple) or not all(
        isinstance(i, int) and not isinstance(i, bool) and 0 <= i < c.num_layers for i in layers
    ):
        _fail("dual_attention_layers", layers, f"block indices in [0, {c.num_layers})")
    if len(set(layers)) != len(layers):
        _fail("dual_attention_layers", layers, "distinct block indices")
    if c.caption_projection_dim != c.inner_dim:
        # diffusers builds such a model, but its blocks cannot take the projected text.
        _fail(
            "caption_projection_dim",
            c.caption_projection_dim,
            f"num_attention_heads * attention_head_dim ({c.inner_dim})",
        )
    if c.inner_dim % 4:
        _fail(
            "num_attention_heads * attention_head_dim",
            c.inner_dim,
            "a multiple of 4 (the 2D sincos position table)",
        )


# --------------------------------------------------------------------------------------------
# Position table


class PositionTable(nnx.Variable):
    """A fixed table that the checkpoint stores (a persistent torch buffer); not trained."""


def _sincos_1d(dim: int, pos: np.ndarray) -> np.ndarray:
    """[M] positions -> [M, dim] float64: [sin, cos] of pos * 10000^(-2i / dim)."""
    omega = np.arange(dim // 2, dtype=np.float64) / (dim / 2.0)
    out = np.outer(pos.astype(np.float64), 1.0 / 10000.0**omega)
    return np.concatenate([np.sin(out), np.cos(out)], axis=1)


def sincos_pos_table(dim: int, height: int, width: int, base_size: int, xp: Any = np):
    """diffusers' `get_2d_sincos_pos_embed`: [height * width, dim] float32, row-major tokens.

    Coordinates are float32 arange(n) / (n / base_size) (n the grid's height or width); the
    sinusoids are float64, rounded to float32. The first half of the channels encodes the
    column, the second the row (diffusers' grid has w first). `xp` (numpy or jax.numpy)
    assembles the 2D table from the 1D ones: with jax.numpy under `nnx.eval_shape`, a large
    table costs nothing.
    """
    rows = np.arange(height, dtype=np.float32) / np.float32(height / base_size)
    cols = np.arange(width, dtype=np.float32) / np.float32(width / base_size)
    emb_col = xp.asarray(_sincos_1d(dim // 2, cols).astype(np.float32))  # [W, dim / 2]
    emb_row = xp.asarray(_sincos_1d(dim // 2, rows).astype(np.float32))  # [H, dim / 2]
    table = xp.concatenate(
        [
            xp.broadcast_to(emb_col[None], (height, width, dim // 2)),
            xp.broadcast_to(emb_row[:, None], (height, width, dim // 2)),
        ],
        axis=-1,
    )
    return table.reshape(height * width, dim)


def crop_pos_table(table: jax.Array, max_size: int, height: int, width: int) -> jax.Array:
    """The centre [height, width] of a [1, max_size^2, D] table, as [1, height * width, D]
    (PatchEmbed.cropped_pos_embed: offsets (max_size - n) // 2)."""
    if height > max_size or width > max_size:
        raise ValueError(
            f"a grid of {height}x{width} patches exceeds pos_embed_max_size={max_size}"
        )
    top, left = (max_size - height) // 2, (max_size - width) // 2
    grid = table.reshape(max_size, max_size, -1)[top : top + height, left : left + width]
    return grid.reshape(1, height * width, -1)


# --------------------------------------------------------------------------------------------
# Layers


def _layer_norm(dim, kw):
    """LayerNorm without affine parameters, eps 1e-6 (every LayerNorm of the model)."""
    return nnx.LayerNorm(
        dim, epsilon=NORM_EPS, use_bias=False, use_scale=False, use_fast_variance=False, **kw
    )


class PatchEmbed(nnx.Module):
    """A patch_size-strided convolution to tokens [B, h * w, D] plus the position table."""

    def __init__(self, c: SD3TransformerConfig, kw):
        p, dim = c.patch_size, c.inner_dim
        self.proj = nnx.Conv(c.in_channels, dim, (p, p), strides=p, padding="VALID", **kw)
        self.patch_size, self.max_size, self.base_size = p, c.pos_embed_max_size, c.base_size
        if c.pos_embed_max_size is None:
            self.pos_embed = None
        else:
            m = c.pos_embed_max_size
            table = sincos_pos_table(dim, m, m, c.base_size, xp=jnp)[None]  # [1, m * m, D]
            self.pos_embed = PositionTable(table.astype(kw["param_dtype"]))

    def __call__(self, x):  # [B, H, W, C] -> [B, h * w, D]
        b, hh, ww, _ = x.shape
        p = self.patch_size
        if hh % p or ww % p:
            raise ValueError(f"latent size {hh}x{ww} is not a multiple of patch_size={p}")
        h, w = hh // p, ww // p
        tokens = self.proj(x).reshape(b, h * w, -1)
        if self.pos_embed is None:
            table = jnp.asarray(sincos_pos_table(tokens.shape[-1], h, w, self.base_size)[None])
        else:
            table = crop_pos_table(self.pos_embed[...], self.max_size, h, w)
        return (tokens + table).astype(tokens.dtype)


class TextProjection(nnx.Module):
    """diffusers' PixArtAlphaTextProjection with SiLU: linear_1 -> SiLU -> linear_2."""

    def __init__(self, in_dim, dim, kw):
        self.linear_1 = nnx.Linear(in_dim, dim, **kw)
        self.linear_2 = nnx.Linear(dim, dim, **kw)

    def __call__(self, x):
        return self.linear_2(jax.nn.silu(self.linear_1(x)))


class TimeTextEmbed(nnx.Module):
    """diffusers' CombinedTimestepTextProjEmbeddings: the timestep's 256 sinusoids ([cos, sin])
    through an MLP, plus the pooled text vector through another."""

    def __init__(self, dim, pooled_dim, kw):
        self.timestep_embedder = TimestepEmbedding(TIME_PROJ_DIM, dim, kw)
        self.text_embedder = TextProjection(pooled_dim, dim, kw)

    def __call__(self, timestep, pooled):  # [B], [B, P] -> [B, D]
        t = sinusoidal_embedding(timestep, TIME_PROJ_DIM, flip_sin_to_cos=True, freq_shift=0)
        return self.timestep_embedder(t.astype(pooled.dtype)) + self.text_embedder(pooled)


class AdaNormZero(nnx.Module):
    """adaLN-Zero: SiLU(temb) -> linear to `chunks` vectors of width D, and the affine-free
    LayerNorm they modulate. chunks 6: diffusers' AdaLayerNormZero (shift, scale, gate of the
    attention, then of the MLP); 9: SD35AdaLayerNormZeroX (plus those of the second
    attention)."""

    def __init__(self, dim, chunks, kw):
        self.linear = nnx.Linear(dim, chunks * dim, **kw)
        self.norm = _layer_norm(dim, kw)
        self.chunks = chunks

    def __call__(self, x, temb):
        mods = jnp.split(self.linear(jax.nn.silu(temb))[:, None], self.chunks, axis=-1)
        normed = self.norm(x)
        shift, scale = mods[0], mods[1]
        return normed, normed * (1 + scale) + shift, mods


class AdaNormContinuous(nnx.Module):
    """diffusers' AdaLayerNormContinuous (layer norm, no affine): the projection of SiLU(temb)
    gives (scale, shift), in that order (unlike adaLN-Zero's shift first)."""

    def __init__(self, dim, kw):
        self.linear = nnx.Linear(dim, 2 * dim, **kw)
        self.norm = _layer_norm(dim, kw)

    def __call__(self, x, temb):
        scale, shift = jnp.split(self.linear(jax.nn.silu(temb))[:, None], 2, axis=-1)
        return self.norm(x) * (1 + scale) + shift


def _rms_norm(dim, kw):
    return nnx.RMSNorm(dim, epsilon=NORM_EPS, use_fast_variance=False, **kw)


class Attention(nnx.Module):
    """diffusers' Attention with JointAttnProcessor2_0, biased projections throughout.

    joint: the text tokens have their own projections (add_q/k/v_proj, with their own qk
    norms norm_added_q/k) and join the image tokens (image first) in one attention; the text
    part of the output goes through to_add_out, or is dropped if context_pre_only. Otherwise
    a self-attention over the image tokens (SD 3.5's attn2). qk_norm 'rms_norm' normalizes
    each head's queries and keys.
    """

    def __init__(self, dim, heads, head_dim, kw, *, qk_norm, joint, context_pre_only=False):
        inner = heads * head_dim
        self.heads, self.head_dim = heads, head_dim
        self.to_q, self.to_k, self.to_v = (nnx.Linear(dim, inner, **kw) for _ in range(3))
        self.to_out = nnx.List([nnx.Linear(inner, dim, **kw)])
        rms = qk_norm == "rms_norm"
        self.norm_q = _rms_norm(head_dim, kw) if rms else None
        self.norm_k = _rms_norm(head_dim, kw) if rms else None
        self.joint = joint
        if joint:
            self.add_q_proj, self.add_k_proj, self.add_v_proj = (
                nnx.Linear(dim, inner, **kw) for _ in range(3)
            )
            self.to_add_out = None if context_pre_only else nnx.Linear(inner, dim, **kw)
            self.norm_added_q = _rms_norm(head_dim, kw) if rms else None
            self.norm_added_k = _rms_norm(head_dim, kw) if rms else None

    def _heads(self, x):  # [B, L, H * D] -> [B, L, H, D]
        return x.reshape(*x.shape[:2], self.heads, self.head_dim)

    def _qkv(self, x, q_proj, k_proj, v_proj, norm_q, norm_k):
        q, k, v = (self._heads(proj(x)) for proj in (q_proj, k_proj, v_proj))
        if norm_q is not None:
            q, k = norm_q(q), norm_k(k)
        return q, k, v

    def __call__(self, x, context=None):
        """x [B, N, D] (image), context [B, L, D] (text, joint only) -> (x out, context out,
        None when context_pre_only or not joint)."""
        q, k, v = self._qkv(x, self.to_q, self.to_k, self.to_v, self.norm_q, self.norm_k)
        n = x.shape[1]
        if self.joint:
            cq, ck, cv = self._qkv(
                context,
                self.add_q_proj,
                self.add_k_proj,
                self.add_v_proj,
                self.norm_added_q,
                self.norm_added_k,
            )
            q, k, v = (jnp.concatenate(pair, axis=1) for pair in ((q, cq), (k, ck), (v, cv)))
        out = dot_product_attention(q, k, v)  # [B, N (+ L), H, D]
        out = out.reshape(*out.shape[:2], -1)
        x_out = self.to_out[0](out[:, :n])
        if not self.joint or self.to_add_out is None:
            return x_out, None
        return x_out, self.to_add_out(out[:, n:])


class GELUProj(nnx.Module):
    """A linear layer, then tanh-approximated GELU (diffusers' GELU(approximate='tanh'))."""

    def __init__(self, dim, inner, kw):
        self.proj = nnx.Linear(dim, inner, **kw)

    def __call__(self, x):
        return _gelu_tanh(self.proj(x))


class FeedForward(nnx.Module):
    """GELU-tanh MLP of width 4 D: net.0 (proj), net.1 (dropout, inactive), net.2."""

    def __init__(self, dim, kw, mult=4):
        self.net = nnx.List(
            [GELUProj(dim, mult * dim, kw), nnx.Dropout(0.0), nnx.Linear(mult * dim, dim, **kw)]
        )

    def __call__(self, x):
        return self.net[2](self.net[0](x))


class JointTransformerBlock(nnx.Module):
    """One MMDiT block (diffusers' JointTransformerBlock).

    Image stream: adaLN-Zero modulated joint attention and MLP, each gated into the residual
    (with dual attention, a gated self-attention of the image tokens in between, modulated
    from the same normalized input). Text stream: the same with its own weights, or, when
    context_pre_only (the last block), only a continuous adaptive norm into the attention.
    """

    def __init__(self, c: SD3TransformerConfig, kw, *, context_pre_only, dual):
        dim, heads, head_dim = c.inner_dim, c.num_attention_heads, c.attention_head_dim
        self.context_pre_only, self.dual = context_pre_only, dual
        self.norm1 = AdaNormZero(dim, 9 if dual else 6, kw)
        self.norm1_context = (
            AdaNormContinuous(dim, kw) if context_pre_only else AdaNormZero(dim, 6, kw)
        )
        self.attn = Attention(
            dim,
            heads,
            head_dim,
            kw,
            qk_norm=c.qk_norm,
            joint=True,
            context_pre_only=context_pre_only,
        )
        self.attn2 = (
            Attention(dim, heads, head_dim, kw, qk_norm=c.qk_norm, joint=False) if dual else None
        )
        self.norm2 = _layer_norm(dim, kw)
        self.ff = FeedForward(dim, kw)
        if context_pre_only:
            self.norm2_context = self.ff_context = None
        else:
            self.norm2_context = _layer_norm(dim, kw)
            self.ff_context = FeedForward(dim, kw)

    def __call__(self, x, context, temb):
        """x [B, N, D], context [B, L, D], temb [B, D] -> (x, context; None after the last)."""
        normed, h, mods = self.norm1(x, temb)
        _, _, gate_msa, shift_mlp, scale_mlp, gate_mlp = mods[:6]
        if self.context_pre_only:
            ch = self.norm1_context(context, temb)
        else:
            _, ch, cmods = self.norm1_context(context, temb)
            _, _, c_gate_msa, c_shift_mlp, c_scale_mlp, c_gate_mlp = cmods
        attn, context_attn = self.attn(h, ch)
        x = x + gate_msa * attn
        if self.attn2 is not None:
            shift2, scale2, gate2 = mods[6:]
            x = x + gate2 * self.attn2(normed * (1 + scale2) + shift2)[0]
        h = self.norm2(x) * (1 + scale_mlp) + shift_mlp
        x = x + gate_mlp * self.ff(h)
        if self.context_pre_only:
            return x, None
        context = context + c_gate_msa * context_attn
        ch = self.norm2_context(context) * (1 + c_scale_mlp) + c_shift_mlp
        return x, context + c_gate_mlp * self.ff_context(ch)


# --------------------------------------------------------------------------------------------
# The model


class SD3Transformer(nnx.Module):
    """diffusers' SD3Transformer2DModel (SD 3.0 and 3.5 configs), channels-last."""

    def __init__(
        self,
        config: SD3TransformerConfig,
        *,
        rngs: nnx.Rngs,
        dtype=jnp.float32,
        param_dtype=jnp.float32,
    ):
        c = self.config = config
        self.dtype = dtype
        kw = dict(rngs=rngs, dtype=dtype, param_dtype=param_dtype)
        dim = c.inner_dim
        self.pos_embed = PatchEmbed(c, kw)
        self.time_text_embed = TimeTextEmbed(dim, c.pooled_projection_dim, kw)
        self.context_embedder = nnx.Linear(c.joint_attention_dim, c.caption_projection_dim, **kw)
        self.transformer_blocks = nnx.List(
            [
                JointTransformerBlock(
                    c,
                    kw,
                    context_pre_only=i == c.num_layers - 1,
                    dual=i in c.dual_attention_layers,
                )
                for i in range(c.num_layers)
            ]
        )
        self.norm_out = AdaNormContinuous(dim, kw)
        self.proj_out = nnx.Linear(dim, c.patch_size**2 * c.output_channels, **kw)

    def __call__(
        self,
        x: jax.Array,
        timestep: jax.Array | float,
        context: jax.Array,
        pooled: jax.Array,
    ) -> jax.Array:
        """The model's prediction [B, H, W, out_channels] (channels-last).

        Args:
          x: latents [B, H, W, in_channels] (NHWC; diffusers takes NCHW), H and W multiples
            of patch_size (and at most pos_embed_max_size patches).
          timestep: [B] or a scalar: diffusers' `timestep`, sigma * 1000 (fractional).
          context: [B, L, joint_attention_dim] text-encoder tokens (SD3: CLIP-L/G and T5).
          pooled: [B, pooled_projection_dim] pooled text vectors.
        """
        c = self.config
        b, hh, ww, _ = x.shape
        p = c.patch_size
        t = jnp.broadcast_to(jnp.asarray(timestep, jnp.float32).reshape(-1), (b,))
        tokens = self.pos_embed(jnp.asarray(x).astype(self.dtype))  # [B, N, D]
        temb = self.time_text_embed(t, jnp.asarray(pooled).astype(self.dtype))  # [B, D]
        text = self.context_embedder(jnp.asarray(context).astype(self.dtype))  # [B, L, D]
        for block in self.transformer_blocks:
            # Each block reads its residual stream once written (see models/cpu_fusion.py).
            tokens, text = materialize(tokens), materialize(text)
            tokens, text = block(tokens, text, temb)
        out = self.proj_out(self.norm_out(tokens, temb))  # [B, N, p * p * C]
        h, w, co = hh // p, ww // p, c.output_channels
        out = out.reshape(b, h, w, p, p, co).transpose(0, 1, 3, 2, 4, 5)
        return out.reshape(b, hh, ww, co)


def adaln_zero_init(model: SD3Transformer) -> SD3Transformer:
    """Zeroes, in place, every adaptive norm's projection (each block's shifts, scales and
    gates, the last block's text norm, the output norm) and `proj_out`: DiT's adaLN-Zero
    initialization (Peebles & Xie 2023) for training from scratch. Every block then starts
    as the identity and the model predicts zero; diffusers' SD3 initializes these layers as
    any linear layer."""
    layers = [model.proj_out]
    for _, module in nnx.iter_graph(model):
        if isinstance(module, AdaNormZero | AdaNormContinuous):
            layers.append(module.linear)
    for layer in layers:
        layer.kernel[...] = jnp.zeros_like(layer.kernel[...])
        if layer.bias is not None:
            layer.bias[...] = jnp.zeros_like(layer.bias[...])
    return model


# --------------------------------------------------------------------------------------------
# diffusers weights


def hf_key_map(config: SD3TransformerConfig) -> dict[tuple, Source]:
    """Our state paths -> diffusers tensor names.

    Our modules carry diffusers' names, so a path maps by joining it with dots and renaming
    the leaf (kernel / scale -> weight). Linear kernels [in, out] are PyTorch's [out, in]
    transposed, the patch convolution's kernel [p, p, in, D] PyTorch's [D, in, p, p]
    permuted; the position table `pos_embed.pos_embed` [1, M * M, D] is taken as it is.
    """
    return diffusers_loading.key_map(_abstract_state(config))


def abstract_sd3_transformer(config: SD3TransformerConfig, dtype=jnp.float32) -> SD3Transformer:
    """The model with `jax.ShapeDtypeStruct`s for parameters: nothing allocated or drawn."""
    return diffusers_loading.abstract_model(functools.partial(SD3Transformer, config), dtype)


@functools.lru_cache(maxsize=8)
def _abstract_state(config: SD3TransformerConfig) -> dict[tuple, Any]:
    return diffusers_loading.flat_state(abstract_sd3_transformer(config))


def load_sd3_transformer(
    path: str | os.PathLike,
    dtype=jnp.float32,
    *,
    allow_missing: Sequence[str] = (),
    allow_unexpected: Sequence[str] = (),
) -> tuple[SD3Transformer, SD3TransformerConfig]:
    """Loads a diffusers `transformer/` directory (config.json and
    diffusion_pytorch_model.safetensors, or a sharded index with its shards).

    The model is built abstractly (`nnx.eval_shape`, no random initialization) and filled
    strictly: missing, unexpected and mis-shaped tensors are all named at once (regexes in
    allow_missing / allow_unexpected accept some on purpose). The position table is read from
    the checkpoint (`pos_embed.pos_embed`), as diffusers does. Parameters and computation are
    in `dtype` (float32 or bfloat16).

    Raises:
      CheckpointError: not an SD3Transformer2DModel directory, a config value this module
        does not implement, missing / truncated weights, or mismatched tensors.
    """
    return diffusers_loading.load_model_dir(
        path,
        class_name=CLASS_NAME,
        folder="transformer",
        parse_config=SD3TransformerConfig.from_hf,
        build=SD3Transformer,
        dtype=dtype,
        allow_missing=allow_missing,
        allow_unexpected=allow_unexpected,
        what="SD3Transformer",
    )
