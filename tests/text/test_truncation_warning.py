"""The truncation warning counts prompts, not rows: a batch padded to its compiled size with
copies of its last row, or a prompt given one row per image, counts each prompt once."""

import logging

import numpy as np
import tokenizers
from tokenizers import models, pre_tokenizers

from imagen_jax.pipelines import jobs
from imagen_jax.text import Tokenizer
from imagen_jax.text import hash as text_lib

LONG = "one two three four five six"  # 6 words: 2 lost to max_length 4
SHORT = "a red circle"


def word_tokenizer(max_length: int) -> Tokenizer:
    words = ["[PAD]", "[UNK]", *LONG.split(), *SHORT.split()]
    tok = tokenizers.Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, "[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    return Tokenizer(tok, max_length=max_length, pad_token="[PAD]")


def padded_batch(prompts: list[str], images_per_prompt: int, batch_size: int) -> list[str]:
    """The prompts of a sampling job's first batch, as the cascade encodes them."""
    items = [
        jobs.WorkItem(p, i, jobs.PromptEntry(prompt))
        for p, prompt in enumerate(prompts)
        for i in range(images_per_prompt)
    ]
    chunk, _ = jobs.batches(items, batch_size)[0]
    return [item.entry.prompt for item in chunk]


def test_one_prompt_padded_to_a_batch_counts_once(caplog):
    rows = padded_batch([LONG], images_per_prompt=1, batch_size=4)
    assert rows == [LONG] * 4
    with caplog.at_level(logging.WARNING):
        tokens = word_tokenizer(4)(rows)
    assert tokens.num_truncated.tolist() == [2, 2, 2, 2]  # per row, as before
    assert "Truncated 1 of 1 prompts to 4 tokens: 2 tokens lost in all, 2 from" in caplog.text


def test_images_per_prompt_count_once(caplog):
    rows = padded_batch([LONG, SHORT], images_per_prompt=2, batch_size=8)
    assert rows == [LONG, LONG, SHORT, SHORT, SHORT, SHORT, SHORT, SHORT]
    with caplog.at_level(logging.WARNING):
        word_tokenizer(4)(rows)
    assert "Truncated 1 of 2 prompts to 4 tokens: 2 tokens lost in all" in caplog.text
    assert f"2 from {LONG!r}" in caplog.text


def test_hash_encoder_counts_prompts(caplog):
    encoder = text_lib.HashTextEncoder(dim=8, max_length=4)
    with caplog.at_level(logging.WARNING):
        _, mask, _ = encoder.encode([SHORT, LONG, LONG, LONG])
    assert mask.sum(1).tolist() == [3, 4, 4, 4]
    assert "Truncated 1 of 2 prompts to 4 tokens: 2 tokens lost in all" in caplog.text


def test_distinct_prompts_still_count_each(caplog):
    lost = np.array([0, 3, 1, 0])
    with caplog.at_level(logging.WARNING):
        text_lib.warn_truncated(["a", "b c d", "e f", "g"], lost, 4)
    assert "Truncated 2 of 4 prompts to 4 tokens: 4 tokens lost in all, 3 from 'b c d'" in (
        caplog.text
    )
