"""Loading the text encoders from local directories in Hugging Face layout.

`load_model(path, kind)` reads `config.json`, checks that its `model_type` and
`architectures` belong to the requested kind, builds the model abstractly (no random
initialization), and fills it from `model.safetensors` or a sharded index through the
model's key map, strictly (see `imagen_jax.weights.load_into`).
"""

from __future__ import annotations

import dataclasses
import functools
import os
from collections.abc import Callable, Collection, Iterable
from typing import Any

import jax.numpy as jnp
from flax import nnx

from imagen_jax.text import bert, clip, t5
from imagen_jax.weights import Checkpoint, CheckpointError, load_into, read_config


@dataclasses.dataclass(frozen=True)
class Family:
    """One kind of encoder: what config.json it accepts, its model and its key map."""

    kind: str
    model_types: tuple[str, ...]
    architectures: tuple[str, ...]
    model_cls: type
    config_from_hf: Callable[[dict, Collection[str]], Any]  # (config.json, tensor names)
    key_map: Callable[[Any, Collection[str]], dict]  # (config, tensor names)
    unused: tuple[str, ...]  # regexes of checkpoint tensors unused by design


FAMILIES = {
    "t5": Family(
        "t5",
        t5.MODEL_TYPES,
        t5.ARCHITECTURES,
        t5.T5Encoder,
        lambda hf, keys: t5.T5Config.from_hf(hf),
        lambda config, keys: t5.hf_key_map(config),
        t5.UNUSED,
    ),
    "clip": Family(
        "clip",
        clip.MODEL_TYPES,
        clip.ARCHITECTURES,
        clip.CLIPTextEncoder,
        lambda hf, keys: clip.CLIPTextConfig.from_hf(hf),
        lambda config, keys: clip.hf_key_map(config, clip.checkpoint_prefix(keys)),
        clip.UNUSED,
    ),
    "bert": Family(
        "bert",
        bert.MODEL_TYPES,
        bert.ARCHITECTURES,
        bert.BertEncoder,
        bert.BertConfig.from_hf,
        lambda config, keys: bert.hf_key_map(config, bert.checkpoint_prefix(keys)),
        bert.UNUSED,
    ),
}
KINDS = tuple(FAMILIES)


def family_for(path: str | os.PathLike, hf_config: dict, kind: str | None = None) -> Family:
    """The family of `kind` (or of config.json's model_type if None), checked against it."""
    model_type = hf_config.get("model_type")
    architectures = list(hf_config.get("architectures") or [])
    if kind is None:
        kind = next((k for k, f in FAMILIES.items() if model_type in f.model_types), None)
        if kind is None:
            raise CheckpointError(
                f"{os.path.join(path, 'config.json')}: model_type {model_type!r} is not a "
                f"supported text encoder (supported: {_supported()})"
            )
    if kind not in FAMILIES:
        raise ValueError(f"unknown text encoder kind {kind!r}; expected one of {KINDS}")
    family = FAMILIES[kind]
    bad_arch = architectures and not any(a in family.architectures for a in architectures)
    if model_type not in family.model_types or bad_arch:
        raise CheckpointError(
            f"{os.path.join(path, 'config.json')} is model_type {model_type!r}, architectures "
            f"{architectures}: not a {kind!r} encoder, which takes model_type "
            f"{' | '.join(family.model_types)} and architectures {', '.join(family.architectures)}"
        )
    return family


def _supported() -> str:
    return "; ".join(f"{k}: {', '.join(f.model_types)}" for k, f in FAMILIES.items())


def load_model(
    path: str | os.PathLike,
    kind: str | None = None,
    *,
    dtype=jnp.float32,
    allow_missing: Iterable[str] = (),
    allow_unexpected: Iterable[str] = (),
) -> nnx.Module:
    """Loads a text encoder from a Hugging Face-layout directory.

    Args:
      path: a directory with config.json and model.safetensors (or a sharded
        model.safetensors.index.json with its shards).
      kind: "t5" (T5, mT5, UMT5), "clip" (CLIPTextModel[WithProjection], or the text tower
        of a CLIPModel) or "bert"; None takes config.json's model_type.
      dtype: the dtype of the parameters and of the computation (float32 or bfloat16).
      allow_missing: regexes of checkpoint tensor names that may be absent (their
        parameters keep a fresh initialization; a warning names them).
      allow_unexpected: regexes of extra checkpoint tensors to ignore. Tensors that an
        encoder never uses (a T5 decoder and LM head, CLIP's vision tower, BERT's task
        heads, position_ids buffers) are ignored without being named here.

    Returns:
      T5Encoder, CLIPTextEncoder or BertEncoder, with every parameter of `dtype`.

    Raises:
      CheckpointError: a directory without config.json or weights, a config of another
        architecture, a shard missing from an index, or missing / unexpected / mis-shaped
        tensors (all of them named at once).
    """
    path = os.fspath(path)
    dtype = jnp.dtype(dtype)
    hf_config = read_config(path)
    family = family_for(path, hf_config, kind)
    checkpoint = Checkpoint(path)
    keys = frozenset(checkpoint)
    try:
        config = family.config_from_hf(hf_config, keys)
    except (TypeError, ValueError) as e:
        raise CheckpointError(f"{path}/config.json: {e}") from None
    build = functools.partial(family.model_cls, config, dtype=dtype, param_dtype=dtype)
    abstract = nnx.eval_shape(lambda: build(rngs=nnx.Rngs(0)))
    return load_into(
        abstract,
        family.key_map(config, keys),
        checkpoint,
        dtype=dtype,
        unused=family.unused,
        allow_missing=allow_missing,
        allow_unexpected=allow_unexpected,
        init_missing=lambda: build(rngs=nnx.Rngs(0)),
        what=f"{family.model_cls.__name__} ({hf_config.get('model_type')})",
    )
