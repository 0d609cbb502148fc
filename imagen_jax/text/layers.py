"""Pieces shared by the text encoders: their common output, activations and attention."""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import NamedTuple

import jax
import jax.numpy as jnp


class EncoderOutput(NamedTuple):
    """What every text encoder returns.

    last_hidden_state: [B, L, D], the model's output (after its final norm, if it has one).
    hidden_states: the embedding output, then the output of every layer, each [B, L, D],
      with transformers' convention for the last entry: T5 puts the final-normed state
      there (so it equals last_hidden_state), CLIP the last layer's output before its
      final layer norm (SDXL takes hidden_states[-2], the penultimate layer, un-normed).
    pooled: [B, P] where the model defines one (CLIP: the EOS token's state, projected by
      CLIPTextModelWithProjection; BERT: its tanh pooler), else None (T5).
    """

    last_hidden_state: jax.Array
    hidden_states: tuple[jax.Array, ...]
    pooled: jax.Array | None


def _quick_gelu(x):
    return x * jax.nn.sigmoid(1.702 * x)


# transformers' ACT2FN names. gelu_new, gelu_fast and gelu_pytorch_tanh are all the tanh
# approximation (they differ only in how the same formula is written).
ACTIVATIONS: dict[str, Callable[[jax.Array], jax.Array]] = {
    "relu": jax.nn.relu,
    "gelu": functools.partial(jax.nn.gelu, approximate=False),
    "gelu_new": functools.partial(jax.nn.gelu, approximate=True),
    "gelu_fast": functools.partial(jax.nn.gelu, approximate=True),
    "gelu_pytorch_tanh": functools.partial(jax.nn.gelu, approximate=True),
    "quick_gelu": _quick_gelu,
    "silu": jax.nn.silu,
    "swish": jax.nn.silu,
}


def activation(name: str) -> Callable[[jax.Array], jax.Array]:
    if name not in ACTIVATIONS:
        raise ValueError(f"unsupported activation {name!r}; supported: {sorted(ACTIVATIONS)}")
    return ACTIVATIONS[name]


def attention(
    q: jax.Array,
    k: jax.Array,
    v: jax.Array,
    *,
    scale: float,
    bias: jax.Array | None = None,
    mask: jax.Array | None = None,
) -> jax.Array:
    """Multi-head dot-product attention, softmax in float32.

    Args:
      q, k, v: [B, L, H, Dh].
      scale: multiplies the logits (T5: 1, others: Dh ** -0.5).
      bias: added to the logits, broadcastable to [B, H, Lq, Lk] (T5's position bias).
      mask: bool, broadcastable to [B, H, Lq, Lk]; False keys are not attended to.

    Returns:
      [B, Lq, H, Dh].
    """
    logits = jnp.einsum("bqhd,bkhd->bhqk", q, k) * scale  # [B, H, Lq, Lk]
    logits = logits.astype(jnp.float32)
    if bias is not None:
        logits = logits + bias.astype(jnp.float32)
    if mask is not None:
        logits = jnp.where(mask, logits, jnp.finfo(jnp.float32).min)
    weights = jax.nn.softmax(logits, axis=-1).astype(v.dtype)
    return jnp.einsum("bhqk,bkhd->bqhd", weights, v)


def key_mask(attention_mask: jax.Array | None) -> jax.Array | None:
    """[B, Lk] (1 = token, 0 = padding) -> bool [B, 1, 1, Lk] for `attention`."""
    if attention_mask is None:
        return None
    return attention_mask.astype(bool)[:, None, None, :]


def mean_pool(hidden: jax.Array, attention_mask: jax.Array) -> jax.Array:
    """Mean over the tokens of each sequence, as sentence-transformers' `Pooling`.

    [B, L, D], [B, L] -> [B, D]; an all-padding row gives zeros (the count is clamped
    at 1e-9 as there).
    """
    m = attention_mask.astype(jnp.float32)[..., None]  # [B, L, 1]
    total = (hidden.astype(jnp.float32) * m).sum(axis=1)
    return (total / jnp.maximum(m.sum(axis=1), 1e-9)).astype(hidden.dtype)


def l2_normalize(x: jax.Array, eps: float = 1e-12) -> jax.Array:
    """x / max(|x|, eps) along the last axis (torch.nn.functional.normalize)."""
    norm = jnp.linalg.norm(x.astype(jnp.float32), axis=-1, keepdims=True)
    return (x / jnp.maximum(norm, eps)).astype(x.dtype)
