"""Tiny random transformers models of the real architectures, saved in Hugging Face layout.

`make_tiny(name, path, **overrides)` builds the PyTorch reference from a tiny config with a
fixed seed, re-draws every parameter (so that biases are non-zero and norms are not 1, and a
swapped key cannot go unnoticed), saves it with `save_pretrained` (safetensors) into `path`,
and returns the model in eval mode.
"""

import numpy as np
import pytest
import torch
import transformers

VOCAB = 99
T5_COMMON = dict(
    vocab_size=VOCAB,
    d_model=32,
    d_kv=8,
    d_ff=48,
    num_layers=3,
    num_heads=4,
    relative_attention_num_buckets=8,
    relative_attention_max_distance=12,
    dropout_rate=0.0,
)
CLIP_COMMON = dict(
    vocab_size=VOCAB,
    hidden_size=32,
    intermediate_size=48,
    num_hidden_layers=3,
    num_attention_heads=4,
    max_position_embeddings=16,
    bos_token_id=VOCAB - 2,
    eos_token_id=VOCAB - 1,
    pad_token_id=1,
)
BERT_COMMON = dict(
    vocab_size=VOCAB,
    hidden_size=32,
    num_hidden_layers=3,
    num_attention_heads=4,
    intermediate_size=48,
    max_position_embeddings=24,
    hidden_dropout_prob=0.0,
    attention_probs_dropout_prob=0.0,
)
TINY = {
    # name: (model class, config class, config kwargs)
    "t5": (transformers.T5EncoderModel, transformers.T5Config, dict(feed_forward_proj="relu")),
    "t5_v1_1": (
        transformers.T5EncoderModel,
        transformers.T5Config,
        dict(feed_forward_proj="gated-gelu"),
    ),
    "umt5": (
        transformers.UMT5EncoderModel,
        transformers.UMT5Config,
        dict(feed_forward_proj="gated-gelu"),
    ),
    "t5_full": (
        transformers.T5ForConditionalGeneration,
        transformers.T5Config,
        dict(feed_forward_proj="gated-gelu", tie_word_embeddings=False),
    ),
    "clip": (
        transformers.CLIPTextModel,
        transformers.CLIPTextConfig,
        dict(hidden_act="quick_gelu"),
    ),
    "clip_projection": (
        transformers.CLIPTextModelWithProjection,
        transformers.CLIPTextConfig,
        dict(hidden_act="gelu", projection_dim=24),
    ),
    "bert": (transformers.BertModel, transformers.BertConfig, {}),
}


def _common(name):
    if name.startswith(("t5", "umt5")):
        return T5_COMMON
    return CLIP_COMMON if name.startswith("clip") else BERT_COMMON


def build_tiny(name, path=None, *, seed=0, max_shard_size=None, **overrides):
    model_cls, config_cls, kwargs = TINY[name]
    config = config_cls(**{**_common(name), **kwargs, **overrides})
    torch.manual_seed(seed)
    model = model_cls(config).eval()
    gen = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for pname, p in model.named_parameters():
            noise = torch.randn(p.shape, generator=gen)
            if "norm" in pname.lower():
                p.copy_(1.0 + 0.2 * noise)
            elif "embed" in pname or "shared" in pname or "relative_attention_bias" in pname:
                p.copy_(noise)
            else:
                p.copy_(noise * 0.5 / np.sqrt(p.shape[-1]))
    if path is not None:
        kw = {} if max_shard_size is None else dict(max_shard_size=max_shard_size)
        model.save_pretrained(path, **kw)
    return model


@pytest.fixture
def make_tiny():
    return build_tiny


def padded_inputs(lengths, length, *, seed=0, low=3, high=VOCAB - 2, pad_id=0, eos_id=None):
    """Random ids [B, length] with the given real lengths, right-padded with pad_id; eos_id,
    if given, ends every sequence. Returns (ids, mask) as int64 numpy arrays."""
    rng = np.random.default_rng(seed)
    ids = rng.integers(low, high, size=(len(lengths), length))
    mask = (np.arange(length)[None] < np.array(lengths)[:, None]).astype(np.int64)
    if eos_id is not None:
        ids[np.arange(len(lengths)), np.array(lengths) - 1] = eos_id
    ids = np.where(mask == 1, ids, pad_id)
    return ids.astype(np.int64), mask


@pytest.fixture
def make_inputs():
    return padded_inputs
