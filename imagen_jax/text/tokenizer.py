"""Tokenizers from a model directory's `tokenizer.json`, with fixed-length padding.

The `tokenizers` library reads the `tokenizer.json` that transformers saves beside every
fast tokenizer; here it is set up the way transformers' `tokenizer(prompts,
padding="max_length", truncation=True, max_length=N)` sets it up (longest-first truncation,
special tokens kept, the pad token and sides of `tokenizer_config.json`), so the ids are
the same. A prompt that does not fit loses its tail and a warning says how many tokens
(counting each prompt once, however many rows of the batch repeat it).
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from typing import NamedTuple

import numpy as np
import tokenizers
from absl import logging

TOKENIZER_FILE = "tokenizer.json"
_SLOW_FILES = ("spiece.model", "vocab.txt", "vocab.json", "sentencepiece.bpe.model")


class Tokens(NamedTuple):
    input_ids: np.ndarray  # [B, L] int32
    attention_mask: np.ndarray  # [B, L] int32, 1 = token, 0 = padding
    num_truncated: np.ndarray  # [B] int: tokens each prompt lost to truncation


class Tokenizer:
    """Pads and truncates every prompt to exactly `max_length` tokens."""

    def __init__(
        self,
        tokenizer: tokenizers.Tokenizer,
        *,
        max_length: int,
        pad_token: str,
        padding_side: str = "right",
        truncation_side: str = "right",
    ):
        if max_length < 1:
            raise ValueError(f"max_length must be positive, got {max_length}")
        pad_id = tokenizer.token_to_id(pad_token)
        if pad_id is None:
            raise ValueError(f"pad token {pad_token!r} is not in the tokenizer's vocabulary")
        self.max_length = max_length
        self.pad_id = pad_id
        self._full = tokenizers.Tokenizer.from_str(tokenizer.to_str())
        self._full.no_truncation()
        self._full.no_padding()
        self._tok = tokenizers.Tokenizer.from_str(tokenizer.to_str())
        self._tok.enable_truncation(
            max_length, stride=0, strategy="longest_first", direction=truncation_side
        )
        self._tok.enable_padding(
            direction=padding_side, pad_id=pad_id, pad_token=pad_token, length=max_length
        )

    @classmethod
    def from_dir(cls, path: str | os.PathLike, max_length: int) -> Tokenizer:
        """Reads `tokenizer.json` and the pad token of `tokenizer_config.json` in `path`."""
        path = os.fspath(path)
        file = os.path.join(path, TOKENIZER_FILE)
        if not os.path.isfile(file):
            slow = [f for f in _SLOW_FILES if os.path.isfile(os.path.join(path, f))]
            found = f" (it has {', '.join(slow)}, the files of a slow tokenizer)" if slow else ""
            raise FileNotFoundError(
                f"{path} has no {TOKENIZER_FILE}{found}. Tokenizers are read only from "
                f"{TOKENIZER_FILE}; write it once where transformers is installed: "
                f"AutoTokenizer.from_pretrained(dir).save_pretrained(dir)"
            )
        tok = tokenizers.Tokenizer.from_file(file)
        settings = _tokenizer_settings(path)
        pad_token = settings.get("pad_token") or (tok.padding or {}).get("pad_token")
        if not pad_token:
            raise ValueError(f"{path}: no pad token in tokenizer_config.json or {TOKENIZER_FILE}")
        return cls(
            tok,
            max_length=max_length,
            pad_token=pad_token,
            padding_side=settings.get("padding_side", "right"),
            truncation_side=settings.get("truncation_side", "right"),
        )

    def __call__(self, prompts: Sequence[str]) -> Tokens:
        if isinstance(prompts, str):
            raise TypeError("prompts must be a sequence of strings, not one string")
        encodings = self._tok.encode_batch(list(prompts))
        ids = np.array([e.ids for e in encodings], np.int32).reshape(len(prompts), self.max_length)
        mask = np.array([e.attention_mask for e in encodings], np.int32).reshape(ids.shape)
        lost = np.zeros(len(prompts), np.int64)
        cut = [i for i, e in enumerate(encodings) if e.overflowing]
        if cut:
            full = self._full.encode_batch([prompts[i] for i in cut])
            lost[cut] = [len(f.ids) - int(mask[i].sum()) for i, f in zip(cut, full, strict=True)]
            warn_truncated(prompts, lost, self.max_length)
        return Tokens(ids, mask, lost)

    def decode(self, rows: Sequence[Sequence[int]]) -> list[str]:
        """Token ids -> text, special tokens skipped (the tokenizer's own decoder, as
        transformers' fast tokenizers' `batch_decode(ids, skip_special_tokens=True)`)."""
        return self._full.decode_batch([list(map(int, r)) for r in rows], skip_special_tokens=True)


def warn_truncated(prompts: Sequence[str], lost: np.ndarray, max_length: int) -> None:
    """Logs how many prompts lost tokens to truncation to `max_length`, how many tokens in
    all, and the prompt that lost the most; lost [B] counts each row's dropped tokens.

    Prompts are counted once however many rows repeat them: callers pad a batch to its
    compiled size with copies of its last row (`pipelines.jobs.batches`) and give a prompt
    one row per image, so rows are not prompts ("1 of 1", not "4 of 4", for one prompt
    padded to a batch of 4)."""
    first_row = {}
    for row, prompt in enumerate(prompts):
        first_row.setdefault(prompt, row)
    rows = np.fromiter(first_row.values(), np.int64, len(first_row))  # one row per prompt
    per_prompt = np.asarray(lost)[rows]
    worst = int(rows[np.argmax(per_prompt)])
    logging.warning(
        "Truncated %d of %d prompts to %d tokens: %d tokens lost in all, %d from %r",
        int((per_prompt > 0).sum()),
        len(rows),
        max_length,
        int(per_prompt.sum()),
        int(lost[worst]),
        prompts[worst][:80] + ("..." if len(prompts[worst]) > 80 else ""),
    )


def _tokenizer_settings(path: str) -> dict:
    """pad_token, padding_side, truncation_side from tokenizer_config / special_tokens_map."""
    settings = {}
    for name in ("special_tokens_map.json", "tokenizer_config.json"):  # the latter wins
        file = os.path.join(path, name)
        if os.path.isfile(file):
            with open(file) as f:
                data = json.load(f)
            for key in ("pad_token", "padding_side", "truncation_side"):
                value = data.get(key)
                if isinstance(value, dict):  # an AddedToken: {"content": ..., ...}
                    value = value.get("content")
                if value:
                    settings[key] = value
    return settings
