"""Our tokenizer gives the ids and masks of transformers' `tokenizer(prompts,
padding="max_length", truncation=True, max_length=N)`.

The tokenizers are tiny ones of the real kinds, built and saved with transformers: T5's
Unigram (SentencePiece) and CLIP's byte-level BPE. BERT's WordPiece is checked on the real
all-MiniLM-L6-v2 tokenizer in test_minilm.py.
"""

import logging
import string

import numpy as np
import pytest
import transformers
from tokenizers import pre_tokenizers

from imagen_jax.text import Tokenizer

PROMPTS = [
    "a red circle above a blue square",
    "",
    " ",
    "Ünïcödé façade — 東京 🚀 naïve café",
    "  leading, trailing   and   repeated spaces  ",
    "UPPER lower MiXeD 12345 !?.,;:",
    "tabs\tand\nnewlines\r\n",
    "don't it's we're",
    "<extra_id_0> looks special",
    "red " * 60,
]


def t5_tokenizer(**kwargs):
    pieces = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0), ("▁", -2.0)]
    pieces += [(c, -5.0) for c in string.ascii_letters + string.digits + string.punctuation + "é"]
    words = ["▁a", "▁red", "▁circle", "▁blue", "▁square", "re", "ed", "▁the", "▁above"]
    pieces += [(w, -3.0) for w in words]
    pieces += [(f"<extra_id_{i}>", 0.0) for i in range(2, -1, -1)]
    return transformers.T5Tokenizer(vocab=pieces, extra_ids=3, **kwargs)


def clip_tokenizer(**kwargs):
    alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())
    vocab = {c: i for i, c in enumerate(alphabet)}
    vocab.update({c + "</w>": len(alphabet) + i for i, c in enumerate(alphabet)})
    merges = [("r", "e"), ("re", "d</w>"), ("c", "i"), ("ci", "r"), ("a", "b"), ("b", "l")]
    for a, b in merges:
        vocab[a + b] = len(vocab)
    for special in ("<|startoftext|>", "<|endoftext|>"):
        vocab[special] = len(vocab)
    return transformers.CLIPTokenizer(vocab=vocab, merges=merges, **kwargs)


CASES = {
    "t5": lambda: t5_tokenizer(),
    "t5_left_padding": lambda: t5_tokenizer(padding_side="left"),
    "clip": lambda: clip_tokenizer(),  # SD 1.x: pads with <|endoftext|>
    "clip_pad_bang": lambda: clip_tokenizer(pad_token="!"),  # SD 2.x: pads with "!"
}


@pytest.mark.parametrize("max_length", [8, 16, 77])
@pytest.mark.parametrize("name", list(CASES))
def test_ids_match_transformers(name, max_length, tmp_path):
    CASES[name]().save_pretrained(tmp_path)
    ref = transformers.AutoTokenizer.from_pretrained(tmp_path)
    want = ref(PROMPTS, padding="max_length", truncation=True, max_length=max_length)
    got = Tokenizer.from_dir(tmp_path, max_length)(PROMPTS)
    np.testing.assert_array_equal(got.input_ids, np.array(want["input_ids"]))
    np.testing.assert_array_equal(got.attention_mask, np.array(want["attention_mask"]))
    assert got.input_ids.dtype == np.int32 and got.input_ids.shape == (len(PROMPTS), max_length)


def test_truncation_is_counted_and_logged(tmp_path, caplog):
    clip_tokenizer().save_pretrained(tmp_path)
    ref = transformers.AutoTokenizer.from_pretrained(tmp_path)
    full = [len(ids) for ids in ref(PROMPTS)["input_ids"]]
    with caplog.at_level(logging.WARNING):
        got = Tokenizer.from_dir(tmp_path, 16)(PROMPTS)
    np.testing.assert_array_equal(got.num_truncated, [max(n - 16, 0) for n in full])
    lost = sum(max(n - 16, 0) for n in full)
    assert f"{lost} tokens lost in all" in caplog.text
    caplog.clear()
    with caplog.at_level(logging.WARNING):
        Tokenizer.from_dir(tmp_path, 77)(PROMPTS[:3])
    assert "Truncated" not in caplog.text


def test_slow_tokenizer_files_only(tmp_path):
    (tmp_path / "spiece.model").write_bytes(b"\x00")
    with pytest.raises(FileNotFoundError, match=r"no tokenizer\.json \(it has spiece\.model"):
        Tokenizer.from_dir(tmp_path, 8)


def test_one_string_is_refused(tmp_path):
    t5_tokenizer().save_pretrained(tmp_path)
    with pytest.raises(TypeError, match="not one string"):
        Tokenizer.from_dir(tmp_path, 8)("a red circle")
