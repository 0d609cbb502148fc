"""The text-embedding cache: its rows are the encoder's own outputs (HashTextEncoder and a
tiny random BERT, the latter encoded over 8 devices), a two-host build reads back like a
one-host one, and every way a cache can be wrong is named."""

import hashlib
import os
import shutil

import numpy as np
import pytest
import transformers
from safetensors.numpy import load_file

from imagen_jax import text
from imagen_jax.text.cache import INDEX, CacheError, EmbeddingCache, build_cache, shard_name
from imagen_jax.text.hash import HashTextEncoder

CAPTIONS = [
    "a red circle above a blue square",
    "two green triangles to the left of a yellow star",
    "",
    "Ünïcödé façade — 東京 🚀 naïve café",
    "a red circle above a blue square",  # a duplicate
    "UPPER case, punctuation!? and 12345",
    "   ",
    "three small purple hexagons " * 4,  # truncated to max_length
    "",
] + [f"caption number {i}" for i in range(20)]
UNIQUE = sorted(set(CAPTIONS))
L = 12


def bert_tokenizer(path):
    """A tiny WordPiece (BERT) tokenizer saved in `path`, with tokenizer.json."""
    words = ["a", "red", "circle", "above", "blue", "square", "the", "two", "green"]
    pieces = [*"abcdefghijklmnopqrstuvwxyz0123456789!?,.-", *[f"##{c}" for c in "aeiostnr"]]
    vocab = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *words, *pieces]
    os.makedirs(path, exist_ok=True)
    vocab_file = os.path.join(path, "vocab.txt")
    with open(vocab_file, "w") as f:
        f.write("\n".join(vocab) + "\n")
    tok = transformers.BertTokenizerFast(vocab_file=vocab_file)
    tok.save_pretrained(path)
    return len(vocab)


@pytest.fixture
def bert_dir(tmp_path, make_tiny):
    path = tmp_path / "bert"
    vocab = bert_tokenizer(path)
    make_tiny("bert", path, vocab_size=vocab)
    return path


def rows(embeddings):
    emb, mask, pooled = (None if x is None else np.asarray(x) for x in embeddings)
    return emb, mask, pooled


@pytest.mark.parametrize("dtype", ["float32", "float16"])
def test_hash_cache_holds_the_encoders_outputs(dtype, tmp_path):
    encoder = HashTextEncoder(dim=16, max_length=L)
    assert build_cache(tmp_path, CAPTIONS, encoder, dtype=dtype, batch_size=5) == UNIQUE
    cache = EmbeddingCache.open(tmp_path, expect_fingerprint=encoder.fingerprint())
    assert len(cache) == len(UNIQUE) and (cache.max_length, cache.dim) == (L, 16)
    asked = CAPTIONS[::-1]  # any order, duplicates included
    got, want = rows(cache.lookup(asked)), rows(encoder.encode(asked))
    assert got[0].dtype == np.float32 and got[1].dtype == bool
    np.testing.assert_array_equal(got[1], want[1])
    for g, w in ((got[0], want[0]), (got[2], want[2].astype(np.float32))):
        if dtype == "float32":
            np.testing.assert_array_equal(g, w)
        else:
            np.testing.assert_allclose(g, w, rtol=1e-3, atol=1e-3)  # float16: 11 bits
            assert np.abs(g - w).max() > 0  # really stored in float16
    cached = text.CachedTextEncoder(cache)
    assert cached.max_length == L
    np.testing.assert_array_equal(cached.encode(asked)[0], got[0])


@pytest.mark.parametrize("dtype", ["float32", "float16"])
def test_bert_cache_holds_the_encoders_outputs(dtype, bert_dir, tmp_path):
    encoder = text.load_text_encoder(bert_dir, "bert", max_length=L, batch_bucket=2)
    build_cache(tmp_path / "cache", CAPTIONS, encoder, dtype=dtype, batch_size=7)
    assert encoder.trace_count == 1  # one program: 8 devices × batch_bucket rows
    cache = EmbeddingCache.open(tmp_path / "cache", expect_fingerprint=encoder.fingerprint())
    assert (cache.dim, cache.pooled_dim) == (32, 32)
    got = rows(cache.lookup(UNIQUE))
    want = rows(encoder.encode(UNIQUE))  # on one device: another program
    assert encoder.trace_count == 2
    np.testing.assert_array_equal(got[1], want[1])
    assert got[1][UNIQUE.index("")].any()  # empty="encode": "" has [CLS] [SEP]
    for g, w in ((got[0], want[0]), (got[2], want[2])):
        if dtype == "float32":
            np.testing.assert_array_equal(g, w)
        else:
            np.testing.assert_allclose(g, w, rtol=1e-3, atol=1e-3)  # float16: 11 bits


def test_fingerprint_is_the_models_not_its_folder(bert_dir, tmp_path):
    shutil.copytree(bert_dir, tmp_path / "copy")
    first = text.load_text_encoder(bert_dir, "bert", max_length=L).fingerprint()
    assert text.load_text_encoder(tmp_path / "copy", "bert", max_length=L).fingerprint() == first
    assert first["kind"] == "BertEncoder" and first["max_length"] == L
    shorter = text.load_text_encoder(bert_dir, "bert", max_length=L - 1).fingerprint()
    assert shorter["max_length"] == L - 1 and shorter["sha256"] == first["sha256"]
    (tmp_path / "copy" / "vocab.txt").unlink()  # not read: no part of the fingerprint
    tokenizer_json = tmp_path / "copy" / "tokenizer.json"
    tokenizer_json.write_text(tokenizer_json.read_text().replace('"[UNK]"', '"[unk]"', 1))
    other = text.load_text_encoder(tmp_path / "copy", "bert", max_length=L).fingerprint()
    assert other["sha256"] != first["sha256"]


def test_two_hosts_read_back_like_one(tmp_path):
    encoder = HashTextEncoder(dim=16, max_length=L)
    build_cache(tmp_path / "one", CAPTIONS, encoder)
    with pytest.raises(CacheError, match=r"shards \['shard-00001-of-00002.safetensors'\]"):
        build_cache(tmp_path / "early", CAPTIONS, encoder, process_index=0, process_count=2)
    for index in (1, 0):  # process 0 writes cache.json once both shards exist
        build_cache(tmp_path / "two", CAPTIONS, encoder, process_index=index, process_count=2)
    assert sorted(os.listdir(tmp_path / "two")) == [INDEX, shard_name(0, 2), shard_name(1, 2)]
    one, two = (EmbeddingCache.open(tmp_path / name) for name in ("one", "two"))
    for a, b in zip(rows(one.lookup(CAPTIONS)), rows(two.lookup(CAPTIONS)), strict=True):
        np.testing.assert_array_equal(a, b)
    shard = load_file(str(tmp_path / "two" / shard_name(1, 2)))  # the safetensors library
    assert len(shard["key"]) == len(UNIQUE[1::2])
    assert bytes(shard["key"][0]) == hashlib.sha256(UNIQUE[1].encode()).digest()


def test_more_hosts_than_captions(tmp_path):
    encoder = HashTextEncoder(dim=16, max_length=L)
    for index in (2, 1, 0):
        build_cache(
            tmp_path, ["a", "b"], encoder, dtype="float32", process_index=index, process_count=3
        )
    cache = EmbeddingCache.open(tmp_path)
    np.testing.assert_array_equal(cache.lookup(["b", "a"])[0], encoder.encode(["b", "a"])[0])


@pytest.fixture
def cache_dir(tmp_path):
    build_cache(tmp_path, CAPTIONS, HashTextEncoder(dim=16, max_length=L))
    return tmp_path


def test_unknown_captions_are_named(cache_dir):
    cache = EmbeddingCache.open(cache_dir)
    with pytest.raises(CacheError) as e:
        cache.lookup(["a red circle above a blue square", "a green star", "東京タワー"])
    msg = str(e.value)
    assert "2 of 3 captions" in msg and str(cache_dir) in msg
    assert "'a green star'" in msg and "'東京タワー'" in msg and "blue square" not in msg
    with pytest.raises(CacheError, match=r"12 of 12 captions .*'new 4' and 7 more$"):
        cache.lookup([f"new {i}" for i in range(12)])


def test_fingerprint_mismatch_names_each_field(cache_dir):
    with pytest.raises(CacheError) as e:
        EmbeddingCache.open(cache_dir, expect_fingerprint=HashTextEncoder(8, L + 1).fingerprint())
    msg = str(e.value)
    assert str(cache_dir) in msg and "dim: cache 16, encoder 8" in msg
    assert f"max_length: cache {L}, encoder {L + 1}" in msg and "kind" not in msg


def test_missing_shard_index_or_format(cache_dir):
    index = cache_dir / INDEX
    content = index.read_text()
    index.write_text(content.replace("text_cache.v1", "text_cache.v0"))
    with pytest.raises(CacheError, match=f"{index} has format 'imagen_jax.text_cache.v0'"):
        EmbeddingCache.open(cache_dir)
    index.unlink()
    with pytest.raises(CacheError, match=f"{index} does not exist"):
        EmbeddingCache.open(cache_dir)
    index.write_text(content)
    shard = cache_dir / shard_name(0, 1)
    shard.rename(cache_dir / "elsewhere")
    with pytest.raises(CacheError, match=f"{shard} is missing"):
        EmbeddingCache.open(cache_dir)


def test_truncated_shard(cache_dir):
    shard = cache_dir / shard_name(0, 1)
    data = shard.read_bytes()
    shard.write_bytes(data[:-100])
    with pytest.raises(CacheError, match=f"{shard} is truncated: {len(data) - 100} bytes"):
        EmbeddingCache.open(cache_dir)
    shard.write_bytes(data[:6])
    with pytest.raises(CacheError, match=f"{shard} is not a safetensors file"):
        EmbeddingCache.open(cache_dir)
