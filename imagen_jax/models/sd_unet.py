"""A UNet with the configs and weights of diffusers' `UNet2DConditionModel`, in Flax NNX.

One module covers the public latent and pixel UNets that diffusers builds from that class:
Stable Diffusion 1.x / 2.x (Rombach et al. 2022, "High-Resolution Image Synthesis with Latent
Diffusion Models"), the SD x4 upscaler, SDXL base and refiner (Podell et al. 2023, "SDXL",
sec. 2.1-2.2: micro-conditioning on size / crop / aesthetic-score ids) and DeepFloyd IF stages
I and II (resnet-based up/down-sampling, attention with added text keys and values, an
attention-pooled text vector added to the time embedding). `SDUNetConfig.from_hf` reads a
diffusers `config.json` and refuses every value that this module does not implement.

Conventions:
  - Activations are channels-last: `sample` is [B, H, W, C] in and out (diffusers: NCHW).
  - The network only predicts. What the output means (eps or v; for DeepFloyd IF, eps in the
    first half of the channels and the learned-range variance interpolation in the second,
    out_channels 6 for RGB) is the sampler's business: splitting and interpreting it
    happens there, not here.
  - Dropout is not applied (the module is deterministic, as diffusers is in eval mode).

Parameters are named as diffusers names its tensors (`down_blocks.0.resnets.1.conv1`), so that
`hf_key_map` is a mechanical renaming; `load_unet` fills an abstract model from a diffusers
`unet/` directory strictly (see `imagen_jax.weights.load_into`).
"""

from __future__ import annotations

import dataclasses
import functools
import math
import os
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from imagen_jax.models import diffusers_loading
from imagen_jax.models.attention import dot_product_attention
from imagen_jax.models.conv import Conv
from imagen_jax.models.norm import GroupNorm
from imagen_jax.weights import Source

CLASS_NAME = "UNet2DConditionModel"
WEIGHTS_NAME = diffusers_loading.WEIGHTS_NAME

DOWN_BLOCKS = (
    "DownBlock2D",
    "CrossAttnDownBlock2D",
    "ResnetDownsampleBlock2D",
    "SimpleCrossAttnDownBlock2D",
)
UP_BLOCKS = ("UpBlock2D", "CrossAttnUpBlock2D", "ResnetUpsampleBlock2D", "SimpleCrossAttnUpBlock2D")
MID_BLOCKS = ("UNetMidBlock2DCrossAttn", "UNetMidBlock2DSimpleCrossAttn", "UNetMidBlock2D", None)
# Blocks whose attention is a Transformer2DModel (SD) or an added-KV attention (IF).
_TRANSFORMER_BLOCKS = ("CrossAttnDownBlock2D", "CrossAttnUpBlock2D", "UNetMidBlock2DCrossAttn")
_SIMPLE_BLOCKS = ("SimpleCrossAttnDownBlock2D", "SimpleCrossAttnUpBlock2D")
_SIMPLE_MID = "UNetMidBlock2DSimpleCrossAttn"
# Blocks that sample with a ResnetBlock2D(down=/up=True) and take the resnet_* options.
_RESNET_SAMPLED = (
    "ResnetDownsampleBlock2D",
    "SimpleCrossAttnDownBlock2D",
    "ResnetUpsampleBlock2D",
    "SimpleCrossAttnUpBlock2D",
)
CLASS_EMBED_TYPES = (None, "timestep", "identity", "projection", "simple_projection")
ADDITION_EMBED_TYPES = (None, "text", "text_time")
MASK_BIAS = -10000.0  # diffusers turns a keep/discard mask into this additive logit bias


def _mish(x):
    return x * jnp.tanh(jax.nn.softplus(x))


# diffusers' `get_activation` names (case-insensitive); its GELU is the exact (erf) one.
ACTIVATIONS: dict[str, Callable[[jax.Array], jax.Array]] = {
    "silu": jax.nn.silu,
    "swish": jax.nn.silu,
    "mish": _mish,
    "gelu": functools.partial(jax.nn.gelu, approximate=False),
    "relu": jax.nn.relu,
}


def activation(name: str) -> Callable[[jax.Array], jax.Array]:
    return ACTIVATIONS[name.lower()]


# --------------------------------------------------------------------------------------------
# Config


def _tuple(value):
    """JSON lists (possibly nested) as tuples, so that the config is hashable."""
    if isinstance(value, list | tuple):
        return tuple(_tuple(v) for v in value)
    return value


@dataclasses.dataclass(frozen=True)
class SDUNetConfig:
    """diffusers' UNet2DConditionModel arguments, with its defaults and names.

    Allowed values are those implemented here; anything else raises ValueError naming the key.
    Note diffusers' historical naming: for Transformer2DModel blocks (SD, SDXL) the value of
    `attention_head_dim` is the number of heads; for the added-KV blocks of IF it is the
    width of a head.
    """

    sample_size: int | tuple[int, int] | None = None  # informational only
    in_channels: int = 4
    out_channels: int = 4  # twice the image channels with a learned-range variance (IF)
    center_input_sample: bool = False
    flip_sin_to_cos: bool = True
    freq_shift: float = 0
    down_block_types: tuple[str, ...] = (
        "CrossAttnDownBlock2D",
        "CrossAttnDownBlock2D",
        "CrossAttnDownBlock2D",
        "DownBlock2D",
    )
    mid_block_type: str | None = "UNetMidBlock2DCrossAttn"  # | UNetMidBlock2DSimpleCrossAttn
    # | UNetMidBlock2D | None
    up_block_types: tuple[str, ...] = (
        "UpBlock2D",
        "CrossAttnUpBlock2D",
        "CrossAttnUpBlock2D",
        "CrossAttnUpBlock2D",
    )
    only_cross_attention: bool | tuple[bool, ...] = False
    block_out_channels: tuple[int, ...] = (320, 640, 1280, 1280)
    layers_per_block: int | tuple[int, ...] = 2
    downsample_padding: int = 1
    mid_block_scale_factor: float = 1.0
    dropout: float = 0.0  # not applied: the module is deterministic
    act_fn: str = "silu"  # silu | swish | mish | gelu | relu
    norm_num_groups: int = 32
    norm_eps: float = 1e-5
    cross_attention_dim: int | tuple[int, ...] = 1280
    transformer_layers_per_block: int | tuple = 1  # int, per block, or per block and layer
    reverse_transformer_layers_per_block: tuple | None = None
    encoder_hid_dim: int | None = None
    encoder_hid_dim_type: str | None = None  # None | text_proj
    attention_head_dim: int | tuple[int | None, ...] = 8
    num_attention_heads: int | tuple[int, ...] | None = None  # must be None, as in diffusers
    dual_cross_attention: bool = False  # must be False
    use_linear_projection: bool = False
    class_embed_type: str | None = None  # None | timestep | identity | projection
    # | simple_projection (None with num_class_embeds: a learned table, the x4 upscaler)
    addition_embed_type: str | None = None  # None | text (IF) | text_time (SDXL)
    addition_time_embed_dim: int | None = None
    num_class_embeds: int | None = None
    upcast_attention: bool | None = False  # accepted: logits are always float32 here
    resnet_time_scale_shift: str = "default"  # default | scale_shift
    resnet_skip_time_act: bool = False
    resnet_out_scale_factor: float = 1.0
    time_embedding_type: str = "positional"  # must be positional
    time_embedding_dim: int | None = None
    time_embedding_act_fn: str | None = None
    timestep_post_act: str | None = None
    time_cond_proj_dim: int | None = None  # must be None (no timestep_cond input)
    conv_in_kernel: int = 3
    conv_out_kernel: int = 3
    projection_class_embeddings_input_dim: int | None = None
    attention_type: str = "default"  # must be default (no GLIGEN)
    class_embeddings_concat: bool = False
    mid_block_only_cross_attention: bool | None = None
    cross_attention_norm: str | None = None  # None | layer_norm | group_norm
    addition_embed_type_num_heads: int = 64

    def __post_init__(self):
        for field in dataclasses.fields(self):
            object.__setattr__(self, field.name, _tuple(getattr(self, field.name)))
        _validate(self)

    @classmethod
    def from_hf(cls, hf: Mapping[str, Any]) -> SDUNetConfig:
        """From diffusers' `unet/config.json` (a dict). Keys starting with `_` are metadata."""
        name = hf.get("_class_name", CLASS_NAME)
        if name != CLASS_NAME:
            raise ValueError(f"_class_name {name!r} is not {CLASS_NAME}")
        fields = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(k for k in hf if k not in fields and not k.startswith("_"))
        if unknown:
            raise ValueError(
                "config keys not implemented by SDUNet: "
                + ", ".join(f"{k}={hf[k]!r}" for k in unknown)
            )
        return cls(**{k: v for k, v in hf.items() if k in fields})

    # Derived sizes, resolved per block as diffusers resolves them.

    @property
    def num_blocks(self) -> int:
        return len(self.block_out_channels)

    def per_block(self, name: str) -> tuple:
        value = getattr(self, name)
        return value if isinstance(value, tuple) else (value,) * self.num_blocks

    @property
    def time_embed_dim(self) -> int:
        return self.time_embedding_dim or 4 * self.block_out_channels[0]

    @property
    def blocks_time_embed_dim(self) -> int:
        return 2 * self.time_embed_dim if self.class_embeddings_concat else self.time_embed_dim

    @property
    def only_cross_per_block(self) -> tuple[bool, ...]:
        return self.per_block("only_cross_attention")

    @property
    def mid_only_cross(self) -> bool:
        if self.mid_block_only_cross_attention is not None:
            return self.mid_block_only_cross_attention
        oca = self.only_cross_attention
        return oca if isinstance(oca, bool) else False

    def transformer_layers_down(self, block: int) -> tuple[int, ...]:
        n = self.per_block("transformer_layers_per_block")[block]
        layers = self.per_block("layers_per_block")[block]
        return (n,) * layers if isinstance(n, int) else n

    def transformer_layers_up(self, block: int) -> tuple[int, ...]:
        reverse = self.reverse_transformer_layers_per_block
        if reverse is None:
            reverse = self.per_block("transformer_layers_per_block")[::-1]
        n = reverse[block]
        layers = self.per_block("layers_per_block")[::-1][block] + 1
        return (n,) * layers if isinstance(n, int) else n

    @property
    def transformer_layers_mid(self) -> int:
        n = self.per_block("transformer_layers_per_block")[-1]
        return n if isinstance(n, int) else n[0]

    @property
    def hid_proj(self) -> bool:
        """Whether encoder states pass through `encoder_hid_proj` (IF's T5 -> model width)."""
        return self.encoder_hid_dim is not None


def _fail(key: str, value, expected: str):
    raise ValueError(f"unsupported {key}={value!r}: SDUNet implements {expected}")


def _validate(c: SDUNetConfig) -> None:
    n = c.num_blocks
    if len(c.down_block_types) != n or len(c.up_block_types) != n:
        raise ValueError(
            f"down_block_types {c.down_block_types}, up_block_types {c.up_block_types} and "
            f"block_out_channels {c.block_out_channels} must have the same length"
        )
    for key in (
        "only_cross_attention",
        "layers_per_block",
        "cross_attention_dim",
        "attention_head_dim",
        "transformer_layers_per_block",
    ):
        value = getattr(c, key)
        if isinstance(value, tuple) and len(value) != n:
            raise ValueError(f"{key}={value!r} must have one entry per block ({n})")
    for block in c.down_block_types:
        if _strip(block) not in DOWN_BLOCKS:
            _fail("down_block_types", block, " | ".join(DOWN_BLOCKS))
    for block in c.up_block_types:
        if _strip(block) not in UP_BLOCKS:
            _fail("up_block_types", block, " | ".join(UP_BLOCKS))
    if c.mid_block_type not in MID_BLOCKS:
        _fail("mid_block_type", c.mid_block_type, " | ".join(map(str, MID_BLOCKS)))
    fixed = {
        "num_attention_heads": (None, "None (diffusers reads heads from attention_head_dim)"),
        "dual_cross_attention": (False, "False"),
        "time_embedding_type": ("positional", "'positional'"),
        "time_cond_proj_dim": (None, "None (there is no timestep_cond input)"),
        "attention_type": ("default", "'default' (no GLIGEN)"),
    }
    for key, (allowed, text) in fixed.items():
        if getattr(c, key) != allowed:
            _fail(key, getattr(c, key), text)
    choices = {
        "resnet_time_scale_shift": ("default", "scale_shift"),
        "class_embed_type": CLASS_EMBED_TYPES,
        "addition_embed_type": ADDITION_EMBED_TYPES,
        "encoder_hid_dim_type": (None, "text_proj"),
        "cross_attention_norm": (None, "layer_norm", "group_norm"),
    }
    for key, allowed in choices.items():
        if getattr(c, key) not in allowed:
            _fail(key, getattr(c, key), " | ".join(map(str, allowed)))
    for key in ("act_fn", "time_embedding_act_fn", "timestep_post_act"):
        value = getattr(c, key)
        if (value is not None or key == "act_fn") and str(value).lower() not in ACTIVATIONS:
            _fail(key, value, " | ".join(ACTIVATIONS))
    if not isinstance(c.norm_num_groups, int):
        _fail("norm_num_groups", c.norm_num_groups, "an int (group norms throughout)")
    if c.encoder_hid_dim_type is not None and c.encoder_hid_dim is None:
        raise ValueError(f"encoder_hid_dim_type={c.encoder_hid_dim_type!r} needs encoder_hid_dim")
    if c.encoder_hid_dim is not None and not isinstance(c.cross_attention_dim, int):
        raise ValueError("encoder_hid_dim needs a single int cross_attention_dim")
    if c.class_embed_type in ("projection", "simple_projection") and (
        c.projection_class_embeddings_input_dim is None
    ):
        raise ValueError(
            f"class_embed_type={c.class_embed_type!r} needs projection_class_embeddings_input_dim"
        )
    if c.addition_embed_type == "text_time" and (
        c.addition_time_embed_dim is None or c.projection_class_embeddings_input_dim is None
    ):
        raise ValueError(
            "addition_embed_type='text_time' needs addition_time_embed_dim and "
            "projection_class_embeddings_input_dim"
        )
    nested = isinstance(c.transformer_layers_per_block, tuple) and any(
        isinstance(x, tuple) for x in c.transformer_layers_per_block
    )
    if nested and c.reverse_transformer_layers_per_block is None:
        raise ValueError(
            "transformer_layers_per_block per layer needs reverse_transformer_layers_per_block"
        )
    attention = {*_TRANSFORMER_BLOCKS, *_SIMPLE_BLOCKS, _SIMPLE_MID}
    uses_cross = any(_strip(b) in attention for b in (*c.down_block_types, *c.up_block_types))
    if (uses_cross or c.mid_block_type in attention) and any(
        d is None for d in c.per_block("cross_attention_dim")
    ):
        raise ValueError("cross-attention blocks need cross_attention_dim")


def _strip(block_type: str) -> str:
    """diffusers accepts a `UNetRes` prefix on block type names and drops it."""
    return block_type[7:] if block_type.startswith("UNetRes") else block_type


# --------------------------------------------------------------------------------------------
# Layers


def sinusoidal_embedding(t, dim: int, *, flip_sin_to_cos: bool, freq_shift: float):
    """diffusers' `get_timestep_embedding`: [N] -> [N, dim] float32 (DDPM's sinusoids,
    frequencies exp(-ln(1e4) * i / (dim / 2 - freq_shift)), [sin, cos] or flipped)."""
    half = dim // 2
    exponent = -math.log(10000.0) * jnp.arange(half, dtype=jnp.float32) / (half - freq_shift)
    args = jnp.asarray(t).astype(jnp.float32)[:, None] * jnp.exp(exponent)[None]
    emb = jnp.concatenate([jnp.sin(args), jnp.cos(args)], axis=-1)
    if flip_sin_to_cos:
        emb = jnp.concatenate([emb[:, half:], emb[:, :half]], axis=-1)
    if dim % 2:
        emb = jnp.pad(emb, ((0, 0), (0, 1)))
    return emb


def _attention(q, k, v, *, heads: int, bias=None):
    """Multi-head attention of q [B, Lq, H*D] over k, v [B, Lk, H*D].

    bias: [B, Lk] added to the logits of every query and head (diffusers' mask bias). The
    logits and the softmax are float32 whatever the compute dtype, which is what diffusers'
    upcast_attention asks for.
    """
    b, lq, inner = q.shape
    q, k, v = (x.reshape(b, x.shape[1], heads, inner // heads) for x in (q, k, v))
    out = dot_product_attention(q, k, v, bias=bias)  # [B, Lq, H, D]
    return out.reshape(b, lq, inner)


def _upsample_nearest(x, size=None):
    """Nearest-neighbour upsampling [B, H, W, C] by 2, or to `size` [H', W'] by torch's
    `nearest` rule: source index min(floor(i * (in / out)), in - 1), in float32."""
    if size is None:
        return jnp.repeat(jnp.repeat(x, 2, axis=1), 2, axis=2)

    def index(n_in, n_out):
        scale = np.float32(n_in) / np.float32(n_out)
        i = np.floor(np.arange(n_out, dtype=np.float32) * scale).astype(np.int64)
        return np.minimum(i, n_in - 1)

    return x[:, index(x.shape[1], size[0])][:, :, index(x.shape[2], size[1])]


def _avg_pool2(x):
    """2x2 average pooling with stride 2 (odd trailing rows / columns dropped, as torch)."""
    b, h, w, c = x.shape
    x = x[:, : h // 2 * 2, : w // 2 * 2]
    return x.reshape(b, h // 2, 2, w // 2, 2, c).mean(axis=(2, 4))


def _group_norm(channels, groups, eps, kw):
    return GroupNorm(channels, num_groups=groups, epsilon=eps, use_fast_variance=False, **kw)


def _layer_norm(dim, eps, kw):
    return nnx.LayerNorm(dim, epsilon=eps, use_fast_variance=False, **kw)


def _conv(cin, cout, kernel, kw, *, stride=1, padding=None):
    """A torch-style Conv2d: symmetric padding (kernel - 1) // 2 unless given."""
    pad = (kernel - 1) // 2 if padding is None else padding
    return Conv(cin, cout, (kernel, kernel), strides=stride, padding=((pad, pad), (pad, pad)), **kw)


class TimestepEmbedding(nnx.Module):
    """linear_1 -> act -> linear_2 (-> post_act): diffusers' TimestepEmbedding."""

    def __init__(self, in_dim, dim, kw, *, act="silu", post_act=None):
        self.linear_1 = nnx.Linear(in_dim, dim, **kw)
        self.linear_2 = nnx.Linear(dim, dim, **kw)
        self.act, self.post_act = act, post_act

    def __call__(self, x):
        x = self.linear_2(activation(self.act)(self.linear_1(x)))
        return x if self.post_act is None else activation(self.post_act)(x)


class AttentionPooling(nnx.Module):
    """DeepFloyd IF's pooling: the mean token plus a learned embedding queries all tokens."""

    def __init__(self, num_heads, dim, kw):
        key = kw["rngs"].params()
        self.positional_embedding = nnx.Param(
            (jax.random.normal(key, (1, dim)) / dim**0.5).astype(kw["param_dtype"])
        )
        self.k_proj, self.q_proj, self.v_proj = (nnx.Linear(dim, dim, **kw) for _ in range(3))
        self.num_heads = num_heads

    def __call__(self, x):  # [B, L, D] -> [B, D]
        b, _, dim = x.shape
        cls = x.mean(axis=1, keepdims=True) + self.positional_embedding[...].astype(x.dtype)
        x = jnp.concatenate([cls, x], axis=1)  # [B, 1 + L, D]
        heads, d = self.num_heads, dim // self.num_heads
        q = self.q_proj(cls).reshape(b, 1, heads, d)
        k = self.k_proj(x).reshape(b, -1, heads, d)
        v = self.v_proj(x).reshape(b, -1, heads, d)
        scale = 1 / math.sqrt(math.sqrt(d))  # on both q and k, as the reference does
        logits = jnp.einsum("bqhd,bkhd->bhqk", q * scale, k * scale).astype(jnp.float32)
        weights = jax.nn.softmax(logits, axis=-1).astype(v.dtype)
        return jnp.einsum("bhqk,bkhd->bqhd", weights, v).reshape(b, dim)


class TextTimeEmbedding(nnx.Module):
    """IF's text vector for the time embedding: norm1 -> pool -> proj -> norm2."""

    def __init__(self, encoder_dim, time_dim, num_heads, kw):
        self.norm1 = _layer_norm(encoder_dim, 1e-5, kw)
        self.pool = AttentionPooling(num_heads, encoder_dim, kw)
        self.proj = nnx.Linear(encoder_dim, time_dim, **kw)
        self.norm2 = _layer_norm(time_dim, 1e-5, kw)

    def __call__(self, text):  # [B, L, De] -> [B, E]
        return self.norm2(self.proj(self.pool(self.norm1(text))))


class ResnetBlock2D(nnx.Module):
    """diffusers' ResnetBlock2D: GN-act-(resample)-conv, time embedding added ('default') or
    as scale and shift after the second norm ('scale_shift'), GN-act-conv, skip, rescale."""

    def __init__(
        self,
        cin,
        cout,
        temb_dim,
        kw,
        *,
        groups,
        eps,
        act,
        time_norm="default",
        skip_time_act=False,
        output_scale_factor=1.0,
        up=False,
        down=False,
    ):
        self.norm1 = _group_norm(cin, groups, eps, kw)
        self.conv1 = _conv(cin, cout, 3, kw)
        proj = 2 * cout if time_norm == "scale_shift" else cout
        self.time_emb_proj = nnx.Linear(temb_dim, proj, **kw)
        self.norm2 = _group_norm(cout, groups, eps, kw)
        self.conv2 = _conv(cout, cout, 3, kw)
        self.conv_shortcut = _conv(cin, cout, 1, kw) if cin != cout else None
        self.act, self.time_norm, self.skip_time_act = act, time_norm, skip_time_act
        self.output_scale_factor, self.up, self.down = output_scale_factor, up, down

    def __call__(self, x, temb):  # x [B, H, W, Cin], temb [B, E]
        act = activation(self.act)
        h = act(self.norm1(x))
        if self.up:
            x, h = _upsample_nearest(x), _upsample_nearest(h)
        elif self.down:
            x, h = _avg_pool2(x), _avg_pool2(h)
        h = self.conv1(h)
        t = self.time_emb_proj(temb if self.skip_time_act else act(temb))[:, None, None]
        if self.time_norm == "default":
            h = self.norm2(h + t)
        else:
            scale, shift = jnp.split(t, 2, axis=-1)
            h = self.norm2(h) * (1 + scale) + shift
        h = self.conv2(act(h))
        if self.conv_shortcut is not None:
            x = self.conv_shortcut(x)
        return (x + h) / self.output_scale_factor


class Downsample2D(nnx.Module):
    """Stride-2 3x3 convolution; padding 0 pads one row and column at the end first."""

    def __init__(self, channels, padding, kw):
        self.conv = _conv(channels, channels, 3, kw, stride=2, padding=padding)
        self.padding = padding

    def __call__(self, x, temb=None):
        if self.padding == 0:
            x = jnp.pad(x, ((0, 0), (0, 1), (0, 1), (0, 0)))
        return self.conv(x)


class Upsample2D(nnx.Module):
    """Nearest-neighbour upsampling by 2 (or to the skip's size), then a 3x3 convolution."""

    def __init__(self, channels, kw):
        self.conv = _conv(channels, channels, 3, kw)

    def __call__(self, x, temb=None, size=None):
        return self.conv(_upsample_nearest(x, size))


class Attention(nnx.Module):
    """diffusers' Attention as BasicTransformerBlock builds it: bias-free q/k/v, to_out."""

    def __init__(self, dim, context_dim, heads, head_dim, kw):
        inner = heads * head_dim
        self.to_q = nnx.Linear(dim, inner, use_bias=False, **kw)
        self.to_k = nnx.Linear(context_dim or dim, inner, use_bias=False, **kw)
        self.to_v = nnx.Linear(context_dim or dim, inner, use_bias=False, **kw)
        self.to_out = nnx.List([nnx.Linear(inner, dim, **kw)])
        self.heads = heads

    def __call__(self, x, context=None, bias=None):  # x [B, T, D], context [B, S, Dc]
        context = x if context is None else context
        q, k, v = self.to_q(x), self.to_k(context), self.to_v(context)
        out = _attention(q, k, v, heads=self.heads, bias=bias)
        return self.to_out[0](out)


class GEGLU(nnx.Module):
    def __init__(self, dim, inner, kw):
        self.proj = nnx.Linear(dim, 2 * inner, **kw)

    def __call__(self, x):
        x, gate = jnp.split(self.proj(x), 2, axis=-1)
        return x * jax.nn.gelu(gate, approximate=False)


class FeedForward(nnx.Module):
    """GEGLU (net.0), dropout (net.1, inactive), Linear (net.2): diffusers' layout."""

    def __init__(self, dim, kw, mult=4):
        self.net = nnx.List(
            [GEGLU(dim, mult * dim, kw), nnx.Dropout(0.0), nnx.Linear(mult * dim, dim, **kw)]
        )

    def __call__(self, x):
        return self.net[2](self.net[0](x))


class BasicTransformerBlock(nnx.Module):
    """Pre-LayerNorm self-attention (cross-attention if only_cross), cross-attention, GEGLU."""

    def __init__(self, dim, heads, head_dim, context_dim, kw, *, only_cross):
        self.norm1 = _layer_norm(dim, 1e-5, kw)
        self.attn1 = Attention(dim, context_dim if only_cross else None, heads, head_dim, kw)
        self.norm2 = _layer_norm(dim, 1e-5, kw)
        self.attn2 = Attention(dim, context_dim, heads, head_dim, kw)
        self.norm3 = _layer_norm(dim, 1e-5, kw)
        self.ff = FeedForward(dim, kw)
        self.only_cross = only_cross

    def __call__(self, x, context, bias):  # x [B, T, D]
        # diffusers passes the text mask to the cross-attention only (not to attn1, even
        # when attn1 attends to the text).
        x = x + self.attn1(self.norm1(x), context if self.only_cross else None)
        x = x + self.attn2(self.norm2(x), context, bias)
        return x + self.ff(self.norm3(x))


class Transformer2DModel(nnx.Module):
    """GroupNorm, proj_in (1x1 conv, or linear for SD 2.x / SDXL), transformer blocks on the
    pixels as tokens, proj_out, residual."""

    def __init__(self, heads, channels, context_dim, kw, *, layers, groups, linear, only_cross):
        head_dim = channels // heads
        inner = heads * head_dim
        self.norm = _group_norm(channels, groups, 1e-6, kw)
        self.linear = linear
        if linear:
            self.proj_in = nnx.Linear(channels, inner, **kw)
            self.proj_out = nnx.Linear(inner, channels, **kw)
        else:
            self.proj_in = _conv(channels, inner, 1, kw)
            self.proj_out = _conv(inner, channels, 1, kw)
        self.transformer_blocks = nnx.List(
            [
                BasicTransformerBlock(
                    inner, heads, head_dim, context_dim, kw, only_cross=only_cross
                )
                for _ in range(layers)
            ]
        )

    def __call__(self, x, context, bias):  # x [B, H, W, C]
        b, h, w, c = x.shape
        y = self.norm(x)
        y = self.proj_in(y.reshape(b, h * w, c)) if self.linear else self.proj_in(y)
        y = y.reshape(b, h * w, -1)  # [B, HW, inner]
        for block in self.transformer_blocks:
            y = block(y, context, bias)
        if self.linear:
            y = self.proj_out(y).reshape(b, h, w, c)
        else:
            y = self.proj_out(y.reshape(b, h, w, -1))
        return y + x


class AddedKVAttention(nnx.Module):
    """diffusers' Attention with AttnAddedKVProcessor (IF): the group-normed pixels attend to
    the (optionally normed) text tokens through add_k_proj / add_v_proj, concatenated before
    their own keys and values (none if only_cross); residual added, no rescale."""

    def __init__(self, dim, head_dim, context_dim, kw, *, groups, only_cross, cross_norm):
        self.heads = dim // head_dim
        inner = self.heads * head_dim
        self.group_norm = _group_norm(dim, groups, 1e-5, kw)
        self.norm_cross = {
            None: lambda: None,
            "layer_norm": lambda: _layer_norm(context_dim, 1e-5, kw),
            # diffusers' cross_attention_norm_num_groups: 32, whatever the width
            "group_norm": lambda: _group_norm(context_dim, 32, 1e-5, kw),
        }[cross_norm]()
        self.to_q = nnx.Linear(dim, inner, **kw)
        self.to_k = None if only_cross else nnx.Linear(dim, inner, **kw)
        self.to_v = None if only_cross else nnx.Linear(dim, inner, **kw)
        self.add_k_proj = nnx.Linear(context_dim, inner, **kw)
        self.add_v_proj = nnx.Linear(context_dim, inner, **kw)
        self.to_out = nnx.List([nnx.Linear(inner, dim, **kw)])

    def __call__(self, x, context, bias):  # x [B, H, W, C], context [B, S, Dc], bias [B, S]
        b, h, w, c = x.shape
        if self.norm_cross is not None:
            context = self.norm_cross(context)
        y = self.group_norm(x.reshape(b, h * w, c))
        k, v = self.add_k_proj(context), self.add_v_proj(context)
        if self.to_k is not None:
            k = jnp.concatenate([k, self.to_k(y)], axis=1)  # [B, S + HW, inner]
            v = jnp.concatenate([v, self.to_v(y)], axis=1)
            if bias is not None:  # the pixels' own keys are never masked
                bias = jnp.pad(bias, ((0, 0), (0, h * w)))
        out = _attention(self.to_q(y), k, v, heads=self.heads, bias=bias)
        return self.to_out[0](out).reshape(b, h, w, c) + x


def _transformer(c: SDUNetConfig, channels, heads, context_dim, kw, *, layers, only_cross):
    """A Transformer2DModel. diffusers' naming: the config's attention_head_dim is the number
    of heads here, and the head width is channels // heads."""
    return Transformer2DModel(
        heads,
        channels,
        context_dim,
        kw,
        layers=layers,
        groups=c.norm_num_groups,
        linear=c.use_linear_projection,
        only_cross=only_cross,
    )


def _added_kv(c: SDUNetConfig, channels, head_dim, context_dim, kw, *, only_cross):
    """An AddedKVAttention; the config's attention_head_dim is the head width (None: one
    head over all channels)."""
    return AddedKVAttention(
        channels,
        channels if head_dim is None else head_dim,
        context_dim,
        kw,
        groups=c.norm_num_groups,
        only_cross=only_cross,
        cross_norm=c.cross_attention_norm,
    )


def _attentions(c, kind, channels, kw, *, head_param, context_dim, only_cross, depth):
    """The attentions of a block, one per resnet (`depth`: transformer layers of each), or
    None for a block without attention."""
    if kind in _TRANSFORMER_BLOCKS:
        return nnx.List(
            [
                _transformer(
                    c, channels, head_param, context_dim, kw, layers=n, only_cross=only_cross
                )
                for n in depth
            ]
        )
    if kind in (*_SIMPLE_BLOCKS, _SIMPLE_MID):
        return nnx.List(
            [
                _added_kv(c, channels, head_param, context_dim, kw, only_cross=only_cross)
                for _ in depth
            ]
        )
    return None


def _resnet(c: SDUNetConfig, block_type, cin, cout, kw, **overrides):
    """A ResnetBlock2D with the options diffusers passes to `block_type`."""
    opts = dict(
        groups=c.norm_num_groups,
        eps=c.norm_eps,
        act=c.act_fn,
        time_norm=c.resnet_time_scale_shift,
    )
    if block_type in _RESNET_SAMPLED:
        opts.update(
            skip_time_act=c.resnet_skip_time_act, output_scale_factor=c.resnet_out_scale_factor
        )
    opts.update(overrides)
    return ResnetBlock2D(cin, cout, c.blocks_time_embed_dim, kw, **opts)


class DownBlock(nnx.Module):
    """DownBlock2D, CrossAttnDownBlock2D, ResnetDownsampleBlock2D or SimpleCrossAttnDownBlock2D:
    resnets (each followed by its attention, if any), then an optional downsampler."""

    def __init__(self, c: SDUNetConfig, block: int, cin: int, kw):
        kind = _strip(c.down_block_types[block])
        cout = c.block_out_channels[block]
        layers = c.per_block("layers_per_block")[block]
        self.resnets = nnx.List(
            [_resnet(c, kind, cin if i == 0 else cout, cout, kw) for i in range(layers)]
        )
        self.attentions = _attentions(
            c,
            kind,
            cout,
            kw,
            head_param=c.per_block("attention_head_dim")[block],
            context_dim=c.per_block("cross_attention_dim")[block],
            only_cross=c.only_cross_per_block[block],
            depth=c.transformer_layers_down(block)[:layers],
        )
        if block == c.num_blocks - 1:
            sampler = None
        elif kind in _RESNET_SAMPLED:
            sampler = _resnet(c, kind, cout, cout, kw, down=True)
        else:
            sampler = Downsample2D(cout, c.downsample_padding, kw)
        self.downsamplers = None if sampler is None else nnx.List([sampler])

    def __call__(self, x, temb, context, bias):
        outputs = []
        for i, resnet in enumerate(self.resnets):
            x = resnet(x, temb)
            if self.attentions is not None:
                x = self.attentions[i](x, context, bias)
            outputs.append(x)
        if self.downsamplers is not None:
            x = self.downsamplers[0](x, temb)
            outputs.append(x)
        return x, outputs


class UpBlock(nnx.Module):
    """UpBlock2D, CrossAttnUpBlock2D, ResnetUpsampleBlock2D or SimpleCrossAttnUpBlock2D: each
    resnet takes the next skip connection (concatenated on channels), then an upsampler."""

    def __init__(self, c: SDUNetConfig, block: int, kw):
        kind = _strip(c.up_block_types[block])
        channels = c.block_out_channels[::-1]
        last = c.num_blocks - 1
        prev, cout, cin = (
            channels[max(block - 1, 0)],
            channels[block],
            channels[min(block + 1, last)],
        )
        layers = c.per_block("layers_per_block")[::-1][block] + 1
        self.resnets = nnx.List(
            [
                _resnet(
                    c,
                    kind,
                    (prev if i == 0 else cout) + (cin if i == layers - 1 else cout),
                    cout,
                    kw,
                )
                for i in range(layers)
            ]
        )
        # diffusers reverses the head counts of transformer blocks, the text widths and
        # only_cross_attention for the up path, but not the head widths of added-KV blocks.
        heads = c.per_block("attention_head_dim")
        self.attentions = _attentions(
            c,
            kind,
            cout,
            kw,
            head_param=(heads[::-1] if kind in _TRANSFORMER_BLOCKS else heads)[block],
            context_dim=c.per_block("cross_attention_dim")[::-1][block],
            only_cross=c.only_cross_per_block[::-1][block],
            depth=c.transformer_layers_up(block)[:layers],
        )
        if block == last:
            sampler = None
        elif kind in _RESNET_SAMPLED:
            sampler = _resnet(c, kind, cout, cout, kw, up=True)
        else:
            sampler = Upsample2D(cout, kw)
        self.upsamplers = None if sampler is None else nnx.List([sampler])

    def __call__(self, x, skips, temb, context, bias, size=None):
        for i, resnet in enumerate(self.resnets):
            x = resnet(jnp.concatenate([x, skips[-1 - i]], axis=-1), temb)
            if self.attentions is not None:
                x = self.attentions[i](x, context, bias)
        if self.upsamplers is not None:
            # Resnet upsampling always doubles: diffusers does not pass it the size.
            sampler = self.upsamplers[0]
            x = sampler(x, size=size) if isinstance(sampler, Upsample2D) else sampler(x, temb)
        return x


class MidBlock(nnx.Module):
    """UNetMidBlock2DCrossAttn, UNetMidBlock2DSimpleCrossAttn (resnet, attention, resnet) or
    UNetMidBlock2D as the UNet builds it (a single resnet)."""

    def __init__(self, c: SDUNetConfig, kw):
        kind, ch = c.mid_block_type, c.block_out_channels[-1]
        count = 1 if kind == "UNetMidBlock2D" else 2
        opts = dict(output_scale_factor=c.mid_block_scale_factor)
        if kind == _SIMPLE_MID:
            opts["skip_time_act"] = c.resnet_skip_time_act
        self.resnets = nnx.List([_resnet(c, kind, ch, ch, kw, **opts) for _ in range(count)])
        # only_cross_attention does not reach UNetMidBlock2DCrossAttn.
        self.attentions = _attentions(
            c,
            kind,
            ch,
            kw,
            head_param=c.per_block("attention_head_dim")[-1],
            context_dim=c.per_block("cross_attention_dim")[-1],
            only_cross=c.mid_only_cross if kind == _SIMPLE_MID else False,
            depth=(c.transformer_layers_mid,) if kind != "UNetMidBlock2D" else (),
        )

    def __call__(self, x, temb, context, bias):
        x = self.resnets[0](x, temb)
        if self.attentions is not None:
            x = self.resnets[1](self.attentions[0](x, context, bias), temb)
        return x


# --------------------------------------------------------------------------------------------
# The UNet


class SDUNet(nnx.Module):
    """diffusers' UNet2DConditionModel (the parts its public SD / SDXL / IF configs use)."""

    def __init__(
        self,
        config: SDUNetConfig,
        *,
        rngs: nnx.Rngs,
        dtype=jnp.float32,
        param_dtype=jnp.float32,
    ):
        c = self.config = config
        self.dtype = dtype
        kw = dict(rngs=rngs, dtype=dtype, param_dtype=param_dtype)
        ch0 = c.block_out_channels[0]
        self.conv_in = _conv(c.in_channels, ch0, c.conv_in_kernel, kw)
        self.time_embedding = TimestepEmbedding(
            ch0, c.time_embed_dim, kw, act=c.act_fn, post_act=c.timestep_post_act
        )
        self.encoder_hid_proj = (
            nnx.Linear(c.encoder_hid_dim, c.cross_attention_dim, **kw) if c.hid_proj else None
        )
        self.class_embedding = _class_embedding(c, kw)
        self.add_embedding = _add_embedding(c, kw)
        self.down_blocks = nnx.List(
            [DownBlock(c, i, c.block_out_channels[max(i - 1, 0)], kw) for i in range(c.num_blocks)]
        )
        self.mid_block = MidBlock(c, kw) if c.mid_block_type is not None else None
        self.up_blocks = nnx.List([UpBlock(c, i, kw) for i in range(c.num_blocks)])
        self.conv_norm_out = _group_norm(ch0, c.norm_num_groups, c.norm_eps, kw)
        self.conv_out = _conv(ch0, c.out_channels, c.conv_out_kernel, kw)

    def __call__(
        self,
        sample: jax.Array,
        timesteps: jax.Array | float,
        encoder_hidden_states: jax.Array,
        *,
        added_cond: Mapping[str, jax.Array] | None = None,
        class_labels: jax.Array | None = None,
        encoder_attention_mask: jax.Array | None = None,
    ) -> jax.Array:
        """The model's prediction [B, H, W, out_channels] (channels-last).

        Args:
          sample: [B, H, W, in_channels] (NHWC; diffusers takes NCHW).
          timesteps: a scalar or [B] (discrete or fractional diffusion timesteps).
          encoder_hidden_states: [B, L, D] text-encoder tokens (D = encoder_hid_dim for IF).
          added_cond: SDXL's micro-conditioning, {"text_embeds": [B, P] pooled text,
            "time_ids": [B, n] size / crop (/ aesthetic score) ids}.
          class_labels: [B] ints (num_class_embeds: the x4 upscaler's noise level), or the
            augmentation timesteps (class_embed_type 'timestep': IF stage II), or vectors for
            'projection' / 'simple_projection' / 'identity'.
          encoder_attention_mask: [B, L], 1 keeps a token and 0 hides it from cross-attention.
        """
        c = self.config
        b = sample.shape[0]
        x = sample.astype(self.dtype)
        bias = None
        if encoder_attention_mask is not None:
            bias = (1 - jnp.asarray(encoder_attention_mask, jnp.float32)) * MASK_BIAS  # [B, L]
        if c.center_input_sample:
            x = 2 * x - 1.0
        emb = self.time_embedding(self._time_proj(timesteps, b))  # [B, E]
        emb = self._add_class(emb, class_labels)
        if self.add_embedding is not None:
            emb = emb + self._addition(encoder_hidden_states, added_cond, b)
        if c.time_embedding_act_fn is not None:
            emb = activation(c.time_embedding_act_fn)(emb)
        context = jnp.asarray(encoder_hidden_states).astype(self.dtype)
        if self.encoder_hid_proj is not None:
            context = self.encoder_hid_proj(context)

        x = self.conv_in(x)
        skips = [x]
        for block in self.down_blocks:
            x, outputs = block(x, emb, context, bias)
            skips.extend(outputs)
        if self.mid_block is not None:
            x = self.mid_block(x, emb, context, bias)
        # Sizes that do not halve evenly need the upsamplers told the skip's size.
        factor = 2 ** (c.num_blocks - 1)
        exact = all(s % factor == 0 for s in sample.shape[1:3])
        for i, block in enumerate(self.up_blocks):
            n = len(block.resnets)
            used, skips = skips[-n:], skips[:-n]
            size = None if exact or i == c.num_blocks - 1 else skips[-1].shape[1:3]
            x = block(x, used, emb, context, bias, size)
        x = activation(c.act_fn)(self.conv_norm_out(x))
        return self.conv_out(x)

    def _time_proj(self, t, batch):
        c = self.config
        t = jnp.broadcast_to(jnp.asarray(t, jnp.float32).reshape(-1), (batch,))
        emb = sinusoidal_embedding(
            t,
            c.block_out_channels[0],
            flip_sin_to_cos=c.flip_sin_to_cos,
            freq_shift=c.freq_shift,
        )
        return emb.astype(self.dtype)

    def _add_class(self, emb, class_labels):
        c = self.config
        if c.class_embed_type is None and c.num_class_embeds is None:
            return emb
        if class_labels is None:
            raise ValueError("this UNet needs class_labels (its config has a class embedding)")
        if c.class_embed_type == "timestep":
            class_emb = self.class_embedding(self._time_proj(class_labels, emb.shape[0]))
        elif c.class_embed_type == "identity":
            class_emb = jnp.asarray(class_labels).astype(self.dtype)
        elif c.class_embed_type is None:
            class_emb = self.class_embedding(jnp.asarray(class_labels).astype(jnp.int32))
        else:
            class_emb = self.class_embedding(jnp.asarray(class_labels).astype(self.dtype))
        class_emb = class_emb.astype(self.dtype)
        if c.class_embeddings_concat:
            return jnp.concatenate([emb, class_emb], axis=-1)
        return emb + class_emb

    def _addition(self, text, added_cond, batch):
        c = self.config
        if c.addition_embed_type == "text":  # pooled from the raw encoder states
            return self.add_embedding(jnp.asarray(text).astype(self.dtype))
        if not added_cond or "text_embeds" not in added_cond or "time_ids" not in added_cond:
            raise ValueError(
                "addition_embed_type='text_time' (SDXL) needs added_cond with 'text_embeds' "
                "and 'time_ids'"
            )
        time_ids = jnp.asarray(added_cond["time_ids"]).reshape(-1)
        time_embeds = sinusoidal_embedding(
            time_ids,
            c.addition_time_embed_dim,
            flip_sin_to_cos=c.flip_sin_to_cos,
            freq_shift=c.freq_shift,
        ).reshape(batch, -1)
        text_embeds = jnp.asarray(added_cond["text_embeds"]).astype(jnp.float32)
        add = jnp.concatenate([text_embeds, time_embeds], axis=-1).astype(self.dtype)
        return self.add_embedding(add)


def _add_embedding(c: SDUNetConfig, kw):
    if c.addition_embed_type == "text":  # pools the raw encoder states (before the hid proj)
        text_dim = c.encoder_hid_dim or c.cross_attention_dim
        return TextTimeEmbedding(text_dim, c.time_embed_dim, c.addition_embed_type_num_heads, kw)
    if c.addition_embed_type == "text_time":
        return TimestepEmbedding(c.projection_class_embeddings_input_dim, c.time_embed_dim, kw)
    return None


def _class_embedding(c: SDUNetConfig, kw):
    kind, dim = c.class_embed_type, c.time_embed_dim
    if kind is None and c.num_class_embeds is not None:
        return nnx.Embed(c.num_class_embeds, dim, **kw)
    if kind == "timestep":
        return TimestepEmbedding(c.block_out_channels[0], dim, kw, act=c.act_fn)
    if kind == "projection":
        return TimestepEmbedding(c.projection_class_embeddings_input_dim, dim, kw)
    if kind == "simple_projection":
        return nnx.Linear(c.projection_class_embeddings_input_dim, dim, **kw)
    return None  # none, or 'identity' (no parameters)


# --------------------------------------------------------------------------------------------
# diffusers weights


def hf_key_map(config: SDUNetConfig) -> dict[tuple, Source]:
    """Our state paths -> diffusers tensor names (`diffusers_loading.key_map`: dotted
    paths, kernel / scale / embedding -> weight, linear kernels transposed, convolution
    kernels permuted from PyTorch's [out, in, kh, kw])."""
    return diffusers_loading.key_map(_abstract_state(config))


def abstract_unet(config: SDUNetConfig, dtype=jnp.float32) -> SDUNet:
    """The model with `jax.ShapeDtypeStruct`s for parameters: nothing allocated or drawn."""
    return diffusers_loading.abstract_model(functools.partial(SDUNet, config), dtype)


@functools.lru_cache(maxsize=8)
def _abstract_state(config: SDUNetConfig) -> dict[tuple, Any]:
    return diffusers_loading.flat_state(abstract_unet(config))


def load_unet(
    path: str | os.PathLike,
    dtype=jnp.float32,
    *,
    allow_missing: Sequence[str] = (),
    allow_unexpected: Sequence[str] = (),
) -> tuple[SDUNet, SDUNetConfig]:
    """Loads a diffusers `unet/` directory (config.json and diffusion_pytorch_model.safetensors,
    or a sharded index with its shards).

    The model is built abstractly (`nnx.eval_shape`, no random initialization) and filled
    strictly: missing, unexpected and mis-shaped tensors are all named at once (regexes in
    allow_missing / allow_unexpected accept some on purpose). Parameters and computation are
    in `dtype` (float32 or bfloat16).

    Raises:
      CheckpointError: not a UNet2DConditionModel directory (e.g. a VAE's), a config value
        this module does not implement, missing / truncated weights, or mismatched tensors.
    """
    return diffusers_loading.load_model_dir(
        path,
        class_name=CLASS_NAME,
        folder="unet",
        parse_config=SDUNetConfig.from_hf,
        build=SDUNet,
        dtype=dtype,
        allow_missing=allow_missing,
        allow_unexpected=allow_unexpected,
        what="SDUNet",
    )
