"""The `text` config group of every experiment, and the TextEncoder it builds."""

from __future__ import annotations

import jax.numpy as jnp
import ml_collections

from imagen_jax.text.encoder import TextEncoder, load_text_encoder

DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}


def text_config(**overrides) -> ml_collections.ConfigDict:
    """Defaults of the `text` group; `overrides` replace them (unknown keys raise)."""
    cfg = ml_collections.ConfigDict(
        dict(
            path="",  # a local directory in Hugging Face layout (config.json, safetensors,
            #           tokenizer.json); a diffusers text_encoder[_N] folder also works
            kind=None,  # t5 | clip | bert; None = config.json's model_type
            max_length=None,  # tokens per prompt; None = the model's limit (CLIP: 77,
            #                   sentence-transformers: max_seq_length); T5 needs one
            dtype="float32",  # float32 | bfloat16
            batch_bucket=8,  # the compiled batch size; batches are padded to a multiple
            hidden_layer=None,  # None = last hidden state | index into hidden_states (SDXL: -2)
            pooling=None,  # model | mean | mean_normalized | none; None = the kind's default
            model_mask=None,  # the model sees the attention mask; None = kind's default
            empty="encode",  # encode (SD: "" is encoded) | null (Imagen: zeros, zero mask)
        )
    )
    unknown = sorted(set(overrides) - set(cfg.keys()))
    if unknown:
        raise KeyError(f"unknown config keys {unknown}; allowed: {sorted(cfg.keys())}")
    cfg.update(overrides)
    return cfg


def make_text_encoder(cfg: ml_collections.ConfigDict) -> TextEncoder:
    """The TextEncoder of a `text` group."""
    if not cfg.path:
        raise ValueError("text.path is empty: set it to a local model directory")
    if cfg.dtype not in DTYPES:
        raise ValueError(f"text.dtype must be one of {tuple(DTYPES)}, got {cfg.dtype!r}")
    return load_text_encoder(
        cfg.path,
        cfg.kind,
        max_length=cfg.max_length,
        dtype=DTYPES[cfg.dtype],
        batch_bucket=cfg.batch_bucket,
        hidden_layer=cfg.hidden_layer,
        pooling=cfg.pooling,
        model_mask=cfg.model_mask,
        empty=cfg.empty,
    )
