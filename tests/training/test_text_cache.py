"""Training from a text-embedding cache: the run equals the one that encodes every batch,
without running the encoder; a cache of another encoder stops the run at start-up."""

import jax
import numpy as np
import pytest
from conftest import tiny

from imagen_jax.text.cache import CacheError, EmbeddingCache
from imagen_jax.training import (
    SyntheticSource,
    loop,
    make_input,
    text_cache,
    train_and_evaluate,
)


def test_synthetic_captions_without_images():
    source = SyntheticSource(size=50, resolution=8, seed=3)
    assert text_cache.source_captions(source) == [source[i]["caption"] for i in range(50)]
    assert text_cache.source_captions(source, limit=7) == [source[i]["caption"] for i in range(7)]


def _record_text(monkeypatch) -> list[dict]:
    """Records the text of every global batch the train loop makes."""
    seen = []
    original = loop.device_batch

    def device_batch(*args):
        batch = original(*args)
        seen.append({k: np.asarray(jax.device_get(batch[k])) for k in ("text", "text_mask")})
        return batch

    monkeypatch.setattr(loop, "device_batch", device_batch)
    return seen


def test_cached_run_equals_encoded_run(tmp_path, monkeypatch):
    config = tiny("shapes_base", steps=2)
    seen = _record_text(monkeypatch)
    encoded, encoded_metrics = train_and_evaluate(config, str(tmp_path / "encoded"))
    encoded_text = seen[:]
    seen.clear()

    text_cache.build_text_cache(config, str(tmp_path / "cache"), dtype="float32")
    config.text.cache = str(tmp_path / "cache")
    calls = []
    original = loop.encode_captions
    monkeypatch.setattr(loop, "encode_captions", lambda *a: calls.append(1) or original(*a))
    cached, cached_metrics = train_and_evaluate(config, str(tmp_path / "cached"))

    assert not calls  # the batches brought their text; nothing was encoded
    assert len(seen) == len(encoded_text) == 2
    for got, want in zip(seen, encoded_text, strict=True):
        np.testing.assert_array_equal(got["text"], want["text"])
        np.testing.assert_array_equal(got["text_mask"], want["text_mask"])
    assert int(cached.step) == 2
    assert abs(cached_metrics["loss"] - encoded_metrics["loss"]) <= 1e-6
    for a, b in zip(
        jax.tree.leaves(jax.device_get(encoded.params)),
        jax.tree.leaves(jax.device_get(cached.params)),
        strict=True,
    ):
        np.testing.assert_allclose(np.asarray(b), np.asarray(a), rtol=0, atol=1e-6)


def test_cache_of_another_encoder_stops_the_run(tmp_path):
    config = tiny("shapes_base", steps=2)
    text_cache.build_text_cache(config, str(tmp_path / "cache"), limit=8)
    config.text.cache = str(tmp_path / "cache")
    config.text.max_length = 8
    with pytest.raises(CacheError, match="max_length: cache 16, encoder 8"):
        train_and_evaluate(config, str(tmp_path / "run"))


def test_cached_input_keeps_the_iterator_state(tmp_path):
    config = tiny("shapes_base", steps=2)
    text_cache.build_text_cache(config, str(tmp_path))
    cache = EmbeddingCache.open(tmp_path)
    cached, plain = make_input(config, cache), make_input(config)
    next(cached), next(plain)
    assert cached.get_state() == plain.get_state()
    state, want = cached.get_state(), next(cached)
    resumed = make_input(config, cache)
    resumed.set_state(state)
    got = next(resumed)
    assert list(got["caption"]) == list(want["caption"]) == list(next(plain)["caption"])
    np.testing.assert_array_equal(got["text"], want["text"])
    np.testing.assert_array_equal(got["text"], cache.lookup(want["caption"]).embeddings)
    for it in (cached, plain, resumed):
        it.close()
