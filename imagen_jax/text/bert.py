"""The BERT encoder (Devlin et al. 2019), as transformers' `BertModel`.

Word + absolute position + token-type embeddings and a layer norm, then post-norm layers
(attention, add, norm; GELU MLP, add, norm), and optionally the tanh pooler over the first
token. The sentence embeddings of sentence-transformers (all-MiniLM-L6-v2, the encoder of
this project's shipped model) are the mean of the token states over the attention mask,
L2-normalized: `layers.mean_pool` and `layers.l2_normalize`.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Collection

import jax
import jax.numpy as jnp
from flax import nnx

from imagen_jax.text.layers import EncoderOutput, activation, attention, key_mask
from imagen_jax.weights import Source

MODEL_TYPES = ("bert",)
ARCHITECTURES = (
    "BertModel",
    "BertForMaskedLM",
    "BertForPreTraining",
    "BertLMHeadModel",
    "BertForNextSentencePrediction",
    "BertForSequenceClassification",
    "BertForTokenClassification",
    "BertForQuestionAnswering",
    "BertForMultipleChoice",
)
# Task heads of BertFor* checkpoints and the buffers that older checkpoints hold.
UNUSED = (r"cls\..*", r"(bert\.)?embeddings\.(position_ids|token_type_ids)")


@dataclasses.dataclass(frozen=True)
class BertConfig:
    # Defaults: transformers' BertConfig.
    vocab_size: int = 30522
    hidden_size: int = 768
    num_hidden_layers: int = 12
    num_attention_heads: int = 12
    intermediate_size: int = 3072
    hidden_act: str = "gelu"
    max_position_embeddings: int = 512
    type_vocab_size: int = 2
    layer_norm_eps: float = 1e-12
    add_pooling_layer: bool = True  # not in config.json: the loader sees if pooler.* exists

    @classmethod
    def from_hf(cls, hf: dict, checkpoint_keys: Collection[str] = ()) -> BertConfig:
        kind = hf.get("position_embedding_type", "absolute")
        if kind != "absolute":
            raise ValueError(f"position_embedding_type {kind!r} is not supported (only absolute)")
        fields = {f.name for f in dataclasses.fields(cls)}
        values = {k: v for k, v in hf.items() if k in fields}
        prefix = checkpoint_prefix(checkpoint_keys)
        values["add_pooling_layer"] = f"{prefix}pooler.dense.weight" in checkpoint_keys
        config = cls(**values)
        activation(config.hidden_act)
        return config


def checkpoint_prefix(keys: Collection[str]) -> str:
    """BertFor* checkpoints nest the encoder under `bert.`; BertModel's do not."""
    return "bert." if "bert.embeddings.word_embeddings.weight" in keys else ""


class BertLayer(nnx.Module):
    def __init__(self, config: BertConfig, *, rngs, dtype, param_dtype):
        kw = dict(rngs=rngs, dtype=dtype, param_dtype=param_dtype)
        d = config.hidden_size
        self.num_heads = config.num_attention_heads
        linear = functools.partial(nnx.Linear, d, d, **kw)
        self.query, self.key, self.value, self.attention_out = (linear() for _ in range(4))
        self.attention_norm = nnx.LayerNorm(
            d, epsilon=config.layer_norm_eps, use_fast_variance=False, **kw
        )
        self.intermediate = nnx.Linear(d, config.intermediate_size, **kw)
        self.output = nnx.Linear(config.intermediate_size, d, **kw)
        self.output_norm = nnx.LayerNorm(
            d, epsilon=config.layer_norm_eps, use_fast_variance=False, **kw
        )
        self.act = activation(config.hidden_act)

    def __call__(self, x, mask):  # x [B, L, D]
        return self.with_kv(x, mask)[0]

    def with_kv(self, x, mask, past_kv=None):
        """The layer on x [B, L, D], also returning x's own keys and values [B, L, H, Dh].

        past_kv: keys and values [B, Lp, H, Dh] of earlier tokens (a decoding cache), which
        x's queries see before x's own keys; the mask then covers Lp + L keys.
        """
        heads = (*x.shape[:2], self.num_heads, -1)
        q, k, v = (f(x).reshape(heads) for f in (self.query, self.key, self.value))
        keys, values = k, v
        if past_kv is not None:
            keys = jnp.concatenate([past_kv[0], k], axis=1)  # [B, Lp + L, H, Dh]
            values = jnp.concatenate([past_kv[1], v], axis=1)
        a = attention(q, keys, values, scale=q.shape[-1] ** -0.5, mask=mask)  # [B, L, H, Dh]
        x = self.attention_norm(x + self.attention_out(a.reshape(x.shape)))
        return self.output_norm(x + self.output(self.act(self.intermediate(x)))), (k, v)


class BertEncoder(nnx.Module):
    """transformers' BertModel (inference: no dropout); pooled is its tanh pooler output."""

    def __init__(
        self, config: BertConfig, *, rngs: nnx.Rngs, dtype=jnp.float32, param_dtype=jnp.float32
    ):
        self.config = config
        kw = dict(rngs=rngs, dtype=dtype, param_dtype=param_dtype)
        d = config.hidden_size
        self.word_embeddings = nnx.Embed(config.vocab_size, d, **kw)
        self.position_embeddings = nnx.Embed(config.max_position_embeddings, d, **kw)
        self.token_type_embeddings = nnx.Embed(config.type_vocab_size, d, **kw)
        self.embeddings_norm = nnx.LayerNorm(
            d, epsilon=config.layer_norm_eps, use_fast_variance=False, **kw
        )
        self.layers = nnx.List([BertLayer(config, **kw) for _ in range(config.num_hidden_layers)])
        self.pooler = nnx.Linear(d, d, **kw) if config.add_pooling_layer else None

    def __call__(
        self,
        input_ids: jax.Array,
        attention_mask: jax.Array | None = None,
        token_type_ids: jax.Array | None = None,
    ):
        """input_ids [B, L] int, attention_mask [B, L] (1 = token) -> EncoderOutput."""
        length = input_ids.shape[1]
        if token_type_ids is None:
            token_type_ids = jnp.zeros_like(input_ids)
        x = (
            self.word_embeddings(input_ids)
            + self.token_type_embeddings(token_type_ids)
            + self.position_embeddings(jnp.arange(length))
        )
        x = self.embeddings_norm(x)  # [B, L, D]
        mask = key_mask(attention_mask)
        hidden = [x]
        for layer in self.layers:
            x = layer(x, mask)
            hidden.append(x)
        pooled = jnp.tanh(self.pooler(x[:, 0])) if self.pooler is not None else None
        return EncoderOutput(x, tuple(hidden), pooled)


def hf_key_map(config: BertConfig, prefix: str = "") -> dict[tuple, Source]:
    """Our state paths -> transformers' BertModel tensor names (under `prefix`)."""
    e = f"{prefix}embeddings"
    m = {
        ("word_embeddings", "embedding"): Source.of(f"{e}.word_embeddings.weight"),
        ("position_embeddings", "embedding"): Source.of(f"{e}.position_embeddings.weight"),
        ("token_type_embeddings", "embedding"): Source.of(f"{e}.token_type_embeddings.weight"),
        ("embeddings_norm", "scale"): Source.of(f"{e}.LayerNorm.weight"),
        ("embeddings_norm", "bias"): Source.of(f"{e}.LayerNorm.bias"),
    }
    if config.add_pooling_layer:
        m[("pooler", "kernel")] = Source.of(f"{prefix}pooler.dense.weight", transpose=True)
        m[("pooler", "bias")] = Source.of(f"{prefix}pooler.dense.bias")
    for i in range(config.num_hidden_layers):
        m.update(layer_key_map(f"{prefix}encoder.layer.{i}", ("layers", i)))
    return m


def layer_key_map(hf: str, ours: tuple) -> dict[tuple, Source]:
    """One BertLayer's state paths (under `ours`) -> the tensors of transformers' BertLayer
    named `hf` (GIT's decoder layers have the same names)."""
    m = {}
    linears = {
        "query": "attention.self.query",
        "key": "attention.self.key",
        "value": "attention.self.value",
        "attention_out": "attention.output.dense",
        "intermediate": "intermediate.dense",
        "output": "output.dense",
    }
    for n, h in linears.items():
        m[(*ours, n, "kernel")] = Source.of(f"{hf}.{h}.weight", transpose=True)
        m[(*ours, n, "bias")] = Source.of(f"{hf}.{h}.bias")
    for n, h in (
        ("attention_norm", "attention.output.LayerNorm"),
        ("output_norm", "output.LayerNorm"),
    ):
        m[(*ours, n, "scale")] = Source.of(f"{hf}.{h}.weight")
        m[(*ours, n, "bias")] = Source.of(f"{hf}.{h}.bias")
    return m
