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

import hashlib
import json
import os
from collections.abc import Iterable, Sequence
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.sharding import AxisType, NamedSharding
from jax.sharding import PartitionSpec as P

from imagen_jax.text import layers
from imagen_jax.text.loading import family_for, load_model
from imagen_jax.text.tokenizer import TOKENIZER_FILE, Tokenizer
from imagen_jax.weights import Checkpoint, read_config

POOLINGS = ("model", "mean", "mean_normalized", "none")
# What Tokenizer.from_dir reads: the files that decide the token ids.
TOKENIZER_FILES = (TOKENIZER_FILE, "tokenizer_config.json", "special_tokens_map.json")
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
      files: the weight, config and tokenizer files it was loaded from (`fingerprint`).
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
        files: Sequence[str] = (),
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
        self.files = tuple(os.fspath(f) for f in files)
        self.model_name = type(model).__name__
        self.trace_count = 0
        self._graphdef, self._state = nnx.split(model)
        self._forward = jax.jit(self._apply)
        self._on_devices: tuple | None = None  # (devices, replicated state, batch sharding)

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

    def encode(
        self, prompts: Sequence[str], *, devices: Sequence[jax.Device] | None = None
    ) -> TextEmbeddings:
        """prompts -> embeddings [B, L, D], mask [B, L] bool, pooled [B, P] (or None).

        `devices`: split the work over these devices (see `encode_tokens`).
        """
        if len(prompts) == 0:
            raise ValueError("encode needs at least one prompt")
        tokens = self.tokenizer(prompts)
        emb, pooled = self.encode_tokens(tokens.input_ids, tokens.attention_mask, devices=devices)
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
        self,
        input_ids: np.ndarray,
        attention_mask: np.ndarray,
        *,
        devices: Sequence[jax.Device] | None = None,
    ) -> tuple[jax.Array, jax.Array | None]:
        """Tokenized ids and mask [B, L] -> embeddings [B, L, D], pooled [B, P] (or None).

        Runs the compiled function on chunks of batch_bucket rows (the last one padded);
        no handling of empty prompts. With several `devices`, a chunk is batch_bucket rows
        per device, split over a 1-D mesh of them with the weights replicated on each: every
        device runs the shapes of the one-device program, and gives the same numbers.
        """
        state, chunk_rows, sharding = self._state, self.batch_bucket, None
        if devices is not None and len(devices) > 1:
            state, sharding = self._replicated(tuple(devices))
            chunk_rows *= len(devices)
        n = len(input_ids)
        size = -(-n // chunk_rows) * chunk_rows
        ids, mask = (
            _pad_rows(np.asarray(input_ids), size),
            _pad_rows(np.asarray(attention_mask), size),
        )
        embs, pools = [], []
        for start in range(0, size, chunk_rows):
            chunk = (ids[start : start + chunk_rows], mask[start : start + chunk_rows])
            if sharding is not None:
                chunk = jax.device_put(chunk, sharding)
            emb, pooled = self._forward(state, *chunk)
            embs.append(emb)
            pools.append(pooled)
        if len(embs) == 1 and size == n:
            return embs[0], pools[0]
        emb = jnp.concatenate(embs)[:n]
        return emb, None if pools[0] is None else jnp.concatenate(pools)[:n]

    def _replicated(self, devices: tuple[jax.Device, ...]) -> tuple[nnx.State, NamedSharding]:
        """(the weights replicated on `devices`, the sharding of a batch split over them);
        kept for the next call with the same devices."""
        if self._on_devices is None or self._on_devices[0] != devices:
            mesh = jax.make_mesh(
                (len(devices),), ("data",), axis_types=(AxisType.Auto,), devices=devices
            )
            state = jax.device_put(self._state, NamedSharding(mesh, P()))
            self._on_devices = (devices, state, NamedSharding(mesh, P("data")))
        return self._on_devices[1:]

    def fingerprint(self) -> dict:
        """What decides this encoder's outputs, as JSON values (a cache of them keeps it): the
        model class, max_length, dtype, empty mode, pooling, hidden layer, whether the model
        sees the mask, and a sha256 of the contents (not the paths) of the files it was
        loaded from, so two copies of one model in different folders match."""
        if not self.files:
            raise ValueError(
                "this TextEncoder was built from a model, not loaded from files "
                "(load_text_encoder), so it has no fingerprint"
            )
        return dict(
            kind=self.model_name,
            max_length=self.max_length,
            dtype=str(jax.tree.leaves(self._state)[0].dtype),
            empty=self.empty,
            pooling=self.pooling,
            hidden_layer=self.hidden_layer,
            model_mask=self.model_mask,
            sha256=_sha256_files(self.files),
        )


def _pad_rows(x: np.ndarray, size: int) -> np.ndarray:
    """Pads the batch to `size` rows with copies of the last row (their outputs are dropped)."""
    return np.concatenate([x, np.repeat(x[-1:], size - len(x), axis=0)]) if size > len(x) else x


def _sha256_files(files: Sequence[str]) -> str:
    """sha256 over each file's name (without its folder) and contents, in order."""
    digest = hashlib.sha256()
    for file in files:
        digest.update(os.path.basename(file).encode() + b"\0")
        with open(file, "rb") as f:
            while block := f.read(1 << 24):
                digest.update(block)
    return digest.hexdigest()


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
    tok_dir = os.fspath(tokenizer_path or tokenizer_dir(path))
    tokenizer = Tokenizer.from_dir(tok_dir, max_length)
    weights = sorted({tensor.file for tensor in Checkpoint(path).values()})
    tok_files = [os.path.join(tok_dir, f) for f in TOKENIZER_FILES]
    return TextEncoder(
        model,
        tokenizer,
        batch_bucket=batch_bucket,
        hidden_layer=hidden_layer,
        pooling=pooling,
        model_mask=default_mask if model_mask is None else model_mask,
        empty=empty,
        files=[*weights, os.path.join(path, "config.json"), *filter(os.path.isfile, tok_files)],
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
