"""TextEncoder: prompts -> (embeddings, mask, pooled), jitted once over fixed shapes."""

import numpy as np
import pytest
import torch
from test_tokenizer import PROMPTS, clip_tokenizer, t5_tokenizer

from imagen_jax import text

L = 16
TOL = 1e-4


@pytest.fixture
def clip_dir(tmp_path, make_tiny):
    """A diffusers-style pipeline folder: text_encoder/ (WithProjection) and tokenizer/."""
    tok = clip_tokenizer()
    tok.save_pretrained(tmp_path / "tokenizer")
    vocab = len(tok)
    model = make_tiny(
        "clip_projection",
        tmp_path / "text_encoder",
        vocab_size=vocab,
        bos_token_id=vocab - 2,
        eos_token_id=vocab - 1,
    )
    return tmp_path / "text_encoder", model, tok


def reference(model, tok, prompts, *, mask=False):
    batch = tok(prompts, padding="max_length", truncation=True, max_length=L, return_tensors="pt")
    kw = dict(attention_mask=batch["attention_mask"]) if mask else {}
    with torch.no_grad():
        out = model(batch["input_ids"], output_hidden_states=True, **kw)
    return out, batch["attention_mask"].numpy().astype(bool)


def test_clip_encode_matches_transformers(clip_dir):
    path, model, tok = clip_dir
    encoder = text.load_text_encoder(path, max_length=L, batch_bucket=4)
    assert encoder.pooling == "model" and not encoder.model_mask  # Stable Diffusion's way
    emb, mask, pooled = encoder.encode(PROMPTS)
    out, want_mask = reference(model, tok, PROMPTS)
    np.testing.assert_array_equal(np.asarray(mask), want_mask)
    assert np.abs(np.asarray(emb) - out.last_hidden_state.numpy()).max() < TOL
    assert np.abs(np.asarray(pooled) - out.text_embeds.numpy()).max() < TOL

    penultimate = text.load_text_encoder(path, max_length=L, hidden_layer=-2, model_mask=True)
    emb, _, _ = penultimate.encode(PROMPTS)
    out, _ = reference(model, tok, PROMPTS, mask=True)
    assert np.abs(np.asarray(emb) - out.hidden_states[-2].numpy()).max() < TOL


def test_no_recompilation_and_batch_independence(clip_dir):
    path, _, _ = clip_dir
    encoder = text.load_text_encoder(path, max_length=L, batch_bucket=4)
    alone = encoder.encode(["a red circle"])
    for n in (3, 4, 7, 9, 1):
        prompts = [f"{PROMPTS[i % len(PROMPTS)]} {n}" for i in range(n - 1)] + ["a red circle"]
        emb, mask, pooled = encoder.encode(prompts)
        assert emb.shape == (n, L, 32) and mask.shape == (n, L) and pooled.shape == (n, 24)
        np.testing.assert_allclose(emb[-1], alone.embeddings[0], atol=1e-6)
        np.testing.assert_allclose(pooled[-1], alone.pooled[0], atol=1e-6)
    assert encoder.trace_count == 1


def test_empty_prompts(clip_dir):
    path, _, _ = clip_dir
    prompts = ["a red circle", "", "  "]
    null = text.load_text_encoder(path, max_length=L, empty="null").encode(prompts)
    assert not np.asarray(null.embeddings[1:]).any() and not np.asarray(null.pooled[1:]).any()
    assert not np.asarray(null.mask[1:]).any() and np.asarray(null.mask[0]).any()
    encoded = text.load_text_encoder(path, max_length=L, empty="encode").encode(prompts)
    np.testing.assert_array_equal(encoded.embeddings[0], null.embeddings[0])
    assert np.asarray(encoded.embeddings[1]).any() and np.asarray(encoded.mask[1, :2]).all()


def test_t5_encoder_mean_pooling(tmp_path, make_tiny):
    tok = t5_tokenizer()
    tok.save_pretrained(tmp_path)
    model = make_tiny("t5_v1_1", tmp_path, vocab_size=len(tok))
    encoder = text.load_text_encoder(tmp_path, "t5", max_length=L)
    emb, mask, pooled = encoder.encode(PROMPTS)
    out, want_mask = reference(model, tok, PROMPTS, mask=True)
    last = out.last_hidden_state.numpy()
    np.testing.assert_array_equal(np.asarray(mask), want_mask)
    assert np.abs(np.asarray(emb) - last).max() < TOL
    m = want_mask[..., None]
    assert np.abs(np.asarray(pooled) - (last * m).sum(1) / m.sum(1)).max() < TOL


def test_config_group(clip_dir):
    path, _, _ = clip_dir
    cfg = text.text_config(path=str(path), kind="clip", max_length=L, dtype="bfloat16")
    encoder = text.make_text_encoder(cfg)
    emb, _, _ = encoder.encode(["a red circle"])
    assert emb.dtype == np.dtype("bfloat16") and emb.shape == (1, L, 32)
    with pytest.raises(KeyError, match="unknown text config keys"):
        text.text_config(max_len=3)
    with pytest.raises(ValueError, match="text.path is empty"):
        text.make_text_encoder(text.text_config(kind="clip"))
    assert isinstance(text.make_text_encoder(text.text_config()), text.HashTextEncoder)


def test_bad_options(clip_dir, tmp_path, make_tiny):
    path, _, _ = clip_dir
    assert text.load_text_encoder(path).max_length == 16  # max_position_embeddings
    with pytest.raises(ValueError, match="max_length 17 exceeds the model's 16 positions"):
        text.load_text_encoder(path, max_length=17)
    with pytest.raises(ValueError, match="pooling must be one of"):
        text.load_text_encoder(path, pooling="max")
    make_tiny("t5_v1_1", tmp_path / "t5")
    with pytest.raises(ValueError, match="pass max_length"):
        text.load_text_encoder(tmp_path / "t5")
