"""`HashTextEncoder`: a deterministic text encoder with no weights (runlocal configs,
tests), called as the real encoders are: `encode(prompts) -> (embeddings [B, L, D],
mask [B, L], pooled [B, D])`. `text.kind="hash"` in a `text` config group builds it.
"""

from __future__ import annotations

import re
import zlib
from collections.abc import Sequence

import numpy as np

from imagen_jax.text.tokenizer import warn_truncated

_WORD = re.compile(r"[a-z0-9]+|[^\sa-z0-9]")


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
