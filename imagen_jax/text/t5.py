"""The T5 encoder: T5 (relu), T5 v1.1 / Flan-T5 / mT5 (gated GELU) and UMT5.

Matches transformers' `T5EncoderModel` and `UMT5EncoderModel` (Raffel et al. 2020,
"Exploring the Limits of Transfer Learning with a Unified Text-to-Text Transformer"):
pre-norm blocks with RMSNorm and no biases, unscaled dot-product attention plus a learned
relative position bias over log-spaced buckets. T5 and mT5 compute that bias in the first
layer and share it with every layer; UMT5 gives every layer its own. Imagen and DeepFloyd
IF condition on T5 v1.1 XXL, SD3 on T5 v1.1 XXL as its third encoder.
"""

from __future__ import annotations

import dataclasses
import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from imagen_jax.text.layers import EncoderOutput, activation, attention, key_mask
from imagen_jax.weights import Source

MODEL_TYPES = ("t5", "mt5", "umt5")
ARCHITECTURES = (
    "T5EncoderModel",
    "T5ForConditionalGeneration",
    "T5Model",
    "MT5EncoderModel",
    "MT5ForConditionalGeneration",
    "MT5Model",
    "UMT5EncoderModel",
    "UMT5ForConditionalGeneration",
    "UMT5Model",
)
# The defaults of transformers' T5Config / MT5Config / UMT5Config, which `save_pretrained`
# leaves out of config.json when a value equals them.
_DEFAULTS = {
    "t5": dict(
        vocab_size=32128,
        d_model=512,
        d_kv=64,
        d_ff=2048,
        num_layers=6,
        num_heads=8,
        feed_forward_proj="relu",
    ),
    "mt5": dict(
        vocab_size=250112,
        d_model=512,
        d_kv=64,
        d_ff=1024,
        num_layers=8,
        num_heads=6,
        feed_forward_proj="gated-gelu",
    ),
}
_DEFAULTS["umt5"] = _DEFAULTS["mt5"]

# Tensors of a full encoder-decoder checkpoint that an encoder does not use.
UNUSED = (r"decoder\..*", r"lm_head\.weight")


@dataclasses.dataclass(frozen=True)
class T5Config:
    vocab_size: int = 32128
    d_model: int = 512
    d_kv: int = 64  # per head
    d_ff: int = 2048
    num_layers: int = 6
    num_heads: int = 8
    relative_attention_num_buckets: int = 32
    relative_attention_max_distance: int = 128
    layer_norm_epsilon: float = 1e-6
    feed_forward_proj: str = "relu"  # relu | gated-gelu | gated-silu | ... ("gated-" + act)
    per_layer_position_bias: bool = False  # UMT5: every layer has its own bias table

    @property
    def is_gated_act(self) -> bool:
        return self.feed_forward_proj.split("-")[0] == "gated"

    @property
    def dense_act_fn(self) -> str:
        # As transformers' T5Config: "gated-gelu" means the tanh approximation.
        if self.feed_forward_proj == "gated-gelu":
            return "gelu_new"
        return self.feed_forward_proj.split("-")[-1]

    @classmethod
    def from_hf(cls, hf: dict) -> T5Config:
        """From a transformers config.json of model_type t5, mt5 or umt5."""
        model_type = hf.get("model_type", "t5")
        values = {**_DEFAULTS[model_type], **hf}
        parts = values["feed_forward_proj"].split("-")
        if len(parts) > 2 or (len(parts) == 2 and parts[0] != "gated"):
            raise ValueError(f"invalid feed_forward_proj {values['feed_forward_proj']!r}")
        fields = {f.name for f in dataclasses.fields(cls)}
        config = cls(
            **{k: v for k, v in values.items() if k in fields},
            per_layer_position_bias=model_type == "umt5",
        )
        activation(config.dense_act_fn)  # raises on an unknown activation
        return config


def relative_position_bucket(
    relative_position: np.ndarray, *, bidirectional: bool, num_buckets: int, max_distance: int
) -> np.ndarray:
    """transformers' `T5Attention._relative_position_bucket` (from Mesh TensorFlow), in numpy.

    Half the buckets hold exact offsets, the other half log-spaced ones up to
    max_distance; bidirectional splits them by sign. The arithmetic is float32 in the same
    order as there, so that offsets on a bucket boundary land in the same bucket.
    """
    buckets = np.zeros_like(relative_position)
    if bidirectional:
        num_buckets //= 2
        buckets += (relative_position > 0).astype(relative_position.dtype) * num_buckets
        n = np.abs(relative_position)
    else:
        n = -np.minimum(relative_position, 0)
    max_exact = num_buckets // 2
    scaled = (
        np.log(np.maximum(n, 1).astype(np.float32) / max_exact)
        / math.log(max_distance / max_exact)
        * (num_buckets - max_exact)
    )
    large = np.minimum(max_exact + scaled.astype(n.dtype), num_buckets - 1)
    return buckets + np.where(n < max_exact, n, large)


class T5Attention(nnx.Module):
    def __init__(self, config: T5Config, *, has_position_bias: bool, rngs, dtype, param_dtype):
        self.config = config
        inner = config.num_heads * config.d_kv
        linear = functools.partial(
            nnx.Linear, use_bias=False, dtype=dtype, param_dtype=param_dtype, rngs=rngs
        )
        self.q = linear(config.d_model, inner)
        self.k = linear(config.d_model, inner)
        self.v = linear(config.d_model, inner)
        self.o = linear(inner, config.d_model)
        self.relative_attention_bias = (
            nnx.Embed(
                config.relative_attention_num_buckets,
                config.num_heads,
                dtype=dtype,
                param_dtype=param_dtype,
                rngs=rngs,
            )
            if has_position_bias
            else None
        )

    def position_bias(self, length: int) -> jax.Array:
        """[1, H, L, L]: the learned bias of key position j for query position i."""
        pos = np.arange(length, dtype=np.int64)
        buckets = relative_position_bucket(
            pos[None, :] - pos[:, None],
            bidirectional=True,
            num_buckets=self.config.relative_attention_num_buckets,
            max_distance=self.config.relative_attention_max_distance,
        )
        values = self.relative_attention_bias(jnp.asarray(buckets, jnp.int32))  # [L, L, H]
        return values.transpose(2, 0, 1)[None]

    def __call__(self, x, bias, mask):  # x [B, L, D]
        heads = (*x.shape[:2], self.config.num_heads, self.config.d_kv)
        q, k, v = (f(x).reshape(heads) for f in (self.q, self.k, self.v))  # [B, L, H, Dh]
        out = attention(q, k, v, scale=1.0, bias=bias, mask=mask)
        return self.o(out.reshape(*x.shape[:2], -1))


class T5FeedForward(nnx.Module):
    def __init__(self, config: T5Config, *, rngs, dtype, param_dtype):
        linear = functools.partial(
            nnx.Linear, use_bias=False, dtype=dtype, param_dtype=param_dtype, rngs=rngs
        )
        self.act = activation(config.dense_act_fn)
        self.gated = config.is_gated_act
        if self.gated:
            self.wi_0 = linear(config.d_model, config.d_ff)
            self.wi_1 = linear(config.d_model, config.d_ff)
        else:
            self.wi = linear(config.d_model, config.d_ff)
        self.wo = linear(config.d_ff, config.d_model)

    def __call__(self, x):
        h = self.act(self.wi_0(x)) * self.wi_1(x) if self.gated else self.act(self.wi(x))
        return self.wo(h)


class T5Block(nnx.Module):
    def __init__(self, config: T5Config, *, has_position_bias: bool, rngs, dtype, param_dtype):
        kw = dict(rngs=rngs, dtype=dtype, param_dtype=param_dtype)
        norm = functools.partial(nnx.RMSNorm, config.d_model, epsilon=config.layer_norm_epsilon)
        self.attn_norm = norm(**kw)
        self.attn = T5Attention(config, has_position_bias=has_position_bias, **kw)
        self.ff_norm = norm(**kw)
        self.ff = T5FeedForward(config, **kw)

    def __call__(self, x, bias, mask):
        x = x + self.attn(self.attn_norm(x), bias, mask)
        return x + self.ff(self.ff_norm(x))


class T5Encoder(nnx.Module):
    """transformers' T5EncoderModel / UMT5EncoderModel (inference: no dropout)."""

    def __init__(
        self, config: T5Config, *, rngs: nnx.Rngs, dtype=jnp.float32, param_dtype=jnp.float32
    ):
        self.config = config
        kw = dict(rngs=rngs, dtype=dtype, param_dtype=param_dtype)
        self.embed_tokens = nnx.Embed(config.vocab_size, config.d_model, **kw)
        self.blocks = nnx.List(
            [
                T5Block(config, has_position_bias=i == 0 or config.per_layer_position_bias, **kw)
                for i in range(config.num_layers)
            ]
        )
        self.final_norm = nnx.RMSNorm(config.d_model, epsilon=config.layer_norm_epsilon, **kw)

    def __call__(self, input_ids: jax.Array, attention_mask: jax.Array | None = None):
        """input_ids [B, L] int, attention_mask [B, L] (1 = token) -> EncoderOutput."""
        x = self.embed_tokens(input_ids)  # [B, L, D]
        mask = key_mask(attention_mask)
        hidden, bias = [x], None
        for block in self.blocks:
            if block.attn.relative_attention_bias is not None:
                bias = block.attn.position_bias(input_ids.shape[1])
            x = block(x, bias, mask)
            hidden.append(x)
        x = self.final_norm(x)
        hidden[-1] = x  # transformers' convention: the last entry is the normed output
        return EncoderOutput(x, tuple(hidden), None)


def hf_key_map(config: T5Config) -> dict[tuple, Source]:
    """Our state paths -> transformers' T5EncoderModel tensor names."""
    m = {
        ("embed_tokens", "embedding"): Source.of("shared.weight", "encoder.embed_tokens.weight"),
        ("final_norm", "scale"): Source.of("encoder.final_layer_norm.weight"),
    }
    ff_names = ("wi_0", "wi_1", "wo") if config.is_gated_act else ("wi", "wo")
    for i in range(config.num_layers):
        hf, ours = f"encoder.block.{i}.layer", ("blocks", i)
        m[(*ours, "attn_norm", "scale")] = Source.of(f"{hf}.0.layer_norm.weight")
        for n in "qkvo":
            m[(*ours, "attn", n, "kernel")] = Source.of(
                f"{hf}.0.SelfAttention.{n}.weight", transpose=True
            )
        if i == 0 or config.per_layer_position_bias:
            m[(*ours, "attn", "relative_attention_bias", "embedding")] = Source.of(
                f"{hf}.0.SelfAttention.relative_attention_bias.weight"
            )
        m[(*ours, "ff_norm", "scale")] = Source.of(f"{hf}.1.layer_norm.weight")
        for n in ff_names:
            m[(*ours, "ff", n, "kernel")] = Source.of(
                f"{hf}.1.DenseReluDense.{n}.weight", transpose=True
            )
    return m
