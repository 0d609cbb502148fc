"""The weight-free HashTextEncoder: truncation to max_length words, with a warning."""

import logging

import numpy as np

from imagen_jax.text import hash as text_lib


def test_long_prompts_are_cut_with_a_warning_naming_the_lost_tokens(caplog):
    encoder = text_lib.HashTextEncoder(dim=8, max_length=4)
    prompts = ["a red circle", "one two three four five six", "a b c d e"]
    with caplog.at_level(logging.WARNING):
        emb, mask, _ = encoder.encode(prompts)
    assert mask.sum(1).tolist() == [3, 4, 4] and emb.shape == (3, 4, 8)
    assert "Truncated 2 of 3 prompts to 4 tokens: 3 tokens lost in all" in caplog.text
    assert "2 from 'one two three four five six'" in caplog.text
    # The kept tokens are those of the prompt cut to its first max_length words.
    np.testing.assert_array_equal(emb[1], encoder.encode(["one two three four"])[0][0])
    caplog.clear()
    with caplog.at_level(logging.WARNING):
        encoder.encode(["a red circle", "four words fit here"])
    assert "Truncated" not in caplog.text
