"""`TextEncoder`: prompts in, embeddings out; the one interface of trainer and sampler.

    encoder = load_text_encoder(path, kind="t5", max_length=128, empty="null")
    emb, mask, pooled = encoder.encode(["a red circle above a blue square", ""])
    # emb [2, 128, D], mask [2, 128] bool, pooled [2, P] or None

The model runs as one jitted function over a fixed shape [batch_bucket, max_length]: a
batch is padded up to a multiple of `batch_bucket` and encoded in chunks of that size, so
no prompt or batch size ever compiles it again (`trace_count` stays 1).

Empty prompts ("" or whitespace only):
  empty="encode": encoded like any other prompt (Stable Diffusion's unconditional input
    is the encoding of "").
  empty="null": embeddings, mask and pooled are all zeros (Imagen style): the trainer and
    sampler replace such rows with the model's learned null embedding, the same one that
    classifier-free guidance dropout uses.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterable, Sequence
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from imagen_jax.text import layers
from imagen_jax.text.loading import family_for, load_model
from imagen_jax.text.tokenizer import TOKENIZER_FILE, Tokenizer
from imagen_jax.weights import read_config

POOLINGS = ("model", "mean", "mean_normalized", "none")
EMPTY = ("encode", "null")
# Per kind: (pooling, pass the attention mask into the model). CLIP in Stable Diffusion
# gets no attention mask; IF gives T5 one (SD3 does not: model_mask=False there).
_KIND_DEFAULTS = {"t5": ("mean", True), "clip": ("model", False), "bert": ("mean", True)}


class TextEmbeddings(NamedTuple):
    embeddings: jax.Array  # [B, L, D]
    mask: jax.Array  # [B, L] bool: True = token
    pooled: jax.Array | None  # [B, P]; None with pooling="none"


class TextEncoder:
    """A frozen text encoder with its tokenizer, jitted over fixed padded shapes.

    Args:
      model: T5Encoder, CLIPTextEncoder or BertEncoder.
      tokenizer: a Tokenizer; its max_length is the sequence length L.
      batch_bucket: the batch size of the compiled function.
      hidden_layer: None for the model's last_hidden_state; else an index into its
        hidden_states (SDXL: -2, the penultimate layer without CLIP's final norm).
      pooling: "model" (CLIP: EOS state or its projection; BERT: the tanh pooler), "mean"
        (over the tokens of the mask, of the chosen hidden layer), "mean_normalized" (then
        L2-normalized: sentence-transformers' sentence embedding), or "none".
      model_mask: whether the model sees the attention mask (else padding is attended to).
      empty: "encode" | "null" (see the module docstring).
    """

    def __init__(
        self,
        model: nnx.Module,
        tokenizer: Tokenizer,
        *,
        batch_bucket: int = 8,
        hidden_layer: int | None = None,
        pooling: str = "model",
        model_mask: bool = True,
        empty: str = "encode",
    ):
        if pooling not in POOLINGS:
            raise ValueError(f"pooling must be one of {POOLINGS}, got {pooling!r}")
        if empty not in EMPTY:
            raise ValueError(f"empty must be one of {EMPTY}, got {empty!r}")
        if batch_bucket < 1:
            raise ValueError(f"batch_bucket must be positive, got {batch_bucket}")
        self.tokenizer = tokenizer
        self.max_length = tokenizer.max_length
        self.batch_bucket = batch_bucket
        self.hidden_layer = hidden_layer
        self.pooling = pooling
        self.model_mask = model_mask
        self.empty = empty
        self.trace_count = 0
        self._graphdef, self._state = nnx.split(model)
        self._forward = jax.jit(self._apply)

    def _apply(self, state, input_ids, attention_mask):  # [N, L] each
        self.trace_count += 1  # runs only while tracing
        model = nnx.merge(self._graphdef, state)
        out = model(input_ids, attention_mask if self.model_mask else None)
        if self.hidden_layer is None:
            emb = out.last_hidden_state
        else:
            emb = out.hidden_states[self.hidden_layer]
        if self.pooling == "model":
            if out.pooled is None:
                raise ValueError(f"{type(model).__name__} has no pooled output; use 'mean'")
            pooled = out.pooled
        elif self.pooling == "none":
            pooled = None
        else:
            pooled = layers.mean_pool(emb, attention_mask)
            if self.pooling == "mean_normalized":
                pooled = layers.l2_normalize(pooled)
        return emb, pooled

    def encode(self, prompts: Sequence[str]) -> TextEmbeddings:
        """prompts -> embeddings [B, L, D], mask [B, L] bool, pooled [B, P] (or None)."""
        if len(prompts) == 0:
            raise ValueError("encode needs at least one prompt")
        tokens = self.tokenizer(prompts)
        emb, pooled = self.encode_tokens(tokens.input_ids, tokens.attention_mask)
        keep = jnp.asarray(tokens.attention_mask.astype(bool))
        if self.empty == "null":
            real = jnp.asarray([bool(p.strip()) for p in prompts])
            emb = jnp.where(real[:, None, None], emb, 0)
            keep = keep & real[:, None]
            if pooled is not None:
                pooled = jnp.where(real[:, None], pooled, 0)
        return TextEmbeddings(emb, keep, pooled)

    __call__ = encode

    def encode_tokens(
        self, input_ids: np.ndarray, attention_mask: np.ndarray
    ) -> tuple[jax.Array, jax.Array | None]:
        """Tokenized ids and mask [B, L] -> embeddings [B, L, D], pooled [B, P] (or None).

        Runs the compiled function on chunks of batch_bucket rows (the last one padded);
        no handling of empty prompts.
        """
        n = len(input_ids)
        size = -(-n // self.batch_bucket) * self.batch_bucket
        ids, mask = (
            _pad_rows(np.asarray(input_ids), size),
            _pad_rows(np.asarray(attention_mask), size),
        )
        embs, pools = [], []
        for start in range(0, size, self.batch_bucket):
            chunk = slice(start, start + self.batch_bucket)
            emb, pooled = self._forward(self._state, ids[chunk], mask[chunk])
            embs.append(emb)
            pools.append(pooled)
        if len(embs) == 1 and size == n:
            return embs[0], pools[0]
        emb = jnp.concatenate(embs)[:n]
        return emb, None if pools[0] is None else jnp.concatenate(pools)[:n]


def _pad_rows(x: np.ndarray, size: int) -> np.ndarray:
    """Pads the batch to `size` rows with copies of the last row (their outputs are dropped)."""
    return np.concatenate([x, np.repeat(x[-1:], size - len(x), axis=0)]) if size > len(x) else x


def tokenizer_dir(path: str) -> str:
    """Where the tokenizer of a model directory lives: the directory itself, or in a
    diffusers pipeline the sibling `tokenizer[_N]` of `text_encoder[_N]`."""
    if os.path.isfile(os.path.join(path, TOKENIZER_FILE)):
        return path
    parent, name = os.path.split(os.path.normpath(path))
    if name.startswith("text_encoder"):
        sibling = os.path.join(parent, "tokenizer" + name.removeprefix("text_encoder"))
        if os.path.isdir(sibling):
            return sibling
    return path


def load_text_encoder(
    path: str | os.PathLike,
    kind: str | None = None,
    *,
    max_length: int | None = None,
    dtype=jnp.float32,
    batch_bucket: int = 8,
    hidden_layer: int | None = None,
    pooling: str | None = None,
    model_mask: bool | None = None,
    empty: str = "encode",
    tokenizer_path: str | os.PathLike | None = None,
    allow_missing: Iterable[str] = (),
    allow_unexpected: Iterable[str] = (),
) -> TextEncoder:
    """A TextEncoder from a Hugging Face-layout directory (model, config and tokenizer).

    Args:
      path: the model directory (a diffusers pipeline's text_encoder[_N] finds its
        tokenizer[_N] beside it).
      kind: "t5" | "clip" | "bert"; None takes config.json's model_type.
      max_length: tokens per prompt. None: CLIP's max_position_embeddings (77),
        sentence-transformers' max_seq_length (else BERT's max_position_embeddings);
        required for T5.
      dtype: float32 | bfloat16, of the parameters and the computation.
      pooling: None for the kind's default: t5 "mean"; clip "model"; bert
        "mean_normalized" for a sentence-transformers directory whose modules.json ends
        in Normalize, else "mean".
      model_mask: None for the kind's default: t5, bert True; clip False.
      Others: see TextEncoder and load_model.
    """
    path = os.fspath(path)
    hf_config = read_config(path)
    family = family_for(path, hf_config, kind)
    default_pooling, default_mask = _KIND_DEFAULTS[family.kind]
    if pooling is None:
        pooling = default_pooling
        if family.kind == "bert" and _sentence_transformers_normalizes(path):
            pooling = "mean_normalized"
    if max_length is None:
        max_length = _default_max_length(path, family.kind, hf_config)
    limit = _position_limit(family.kind, hf_config)
    if limit is not None and max_length > limit:
        raise ValueError(f"max_length {max_length} exceeds the model's {limit} positions")
    model = load_model(
        path,
        family.kind,
        dtype=dtype,
        allow_missing=allow_missing,
        allow_unexpected=allow_unexpected,
    )
    tokenizer = Tokenizer.from_dir(tokenizer_path or tokenizer_dir(path), max_length)
    return TextEncoder(
        model,
        tokenizer,
        batch_bucket=batch_bucket,
        hidden_layer=hidden_layer,
        pooling=pooling,
        model_mask=default_mask if model_mask is None else model_mask,
        empty=empty,
    )


def _position_limit(kind: str, hf_config: dict) -> int | None:
    if kind == "t5":
        return None  # relative positions: any length
    if kind == "clip" and hf_config.get("model_type") == "clip":
        hf_config = hf_config.get("text_config") or {}
    return hf_config.get("max_position_embeddings", 77 if kind == "clip" else 512)


def _default_max_length(path: str, kind: str, hf_config: dict) -> int:
    if kind == "t5":
        raise ValueError(f"{path}: T5 has no fixed length; pass max_length (Imagen: 128, IF: 77)")
    sbert = os.path.join(path, "sentence_bert_config.json")
    if kind == "bert" and os.path.isfile(sbert):
        with open(sbert) as f:
            return int(json.load(f)["max_seq_length"])
    return _position_limit(kind, hf_config)


def _sentence_transformers_normalizes(path: str) -> bool:
    file = os.path.join(path, "modules.json")
    if not os.path.isfile(file):
        return False
    with open(file) as f:
        modules = json.load(f)
    return bool(modules) and modules[-1].get("type", "").endswith(".Normalize")
