"""Frozen text encoders (T5, CLIP, BERT) in Flax NNX, their tokenizers and loaders, the
weight-free HashTextEncoder, and the one `text` config group that builds any of them.

Load a local Hugging Face-layout directory and encode prompts:

    from imagen_jax import text

    encoder = text.load_text_encoder(path, kind="clip")  # or from a config group:
    encoder = text.make_text_encoder(text.text_config(path=path, kind="clip"))
    emb, mask, pooled = encoder.encode(prompts)

or use the models directly: `text.load_model(path, kind)(input_ids, attention_mask)` gives
an `EncoderOutput(last_hidden_state, hidden_states, pooled)` equal to transformers'.

Encode a data set's captions once and read them back (`cache.py`):

    text.build_cache("cache/", captions, encoder)
    emb, mask, pooled = text.EmbeddingCache.open("cache/", encoder.fingerprint()).lookup(prompts)
"""

from imagen_jax.text.bert import BertConfig, BertEncoder
from imagen_jax.text.cache import CachedTextEncoder, CacheError, EmbeddingCache, build_cache
from imagen_jax.text.clip import CLIPTextConfig, CLIPTextEncoder, pool_eos
from imagen_jax.text.config import encode_captions, make_text_encoder, text_config, text_width
from imagen_jax.text.encoder import TextEmbeddings, TextEncoder, load_text_encoder
from imagen_jax.text.hash import HashTextEncoder
from imagen_jax.text.layers import EncoderOutput, l2_normalize, mean_pool
from imagen_jax.text.loading import KINDS, load_model
from imagen_jax.text.t5 import T5Config, T5Encoder
from imagen_jax.text.tokenizer import Tokenizer, Tokens

__all__ = [
    "KINDS",
    "BertConfig",
    "BertEncoder",
    "CLIPTextConfig",
    "CLIPTextEncoder",
    "CacheError",
    "CachedTextEncoder",
    "EmbeddingCache",
    "EncoderOutput",
    "HashTextEncoder",
    "T5Config",
    "T5Encoder",
    "TextEmbeddings",
    "TextEncoder",
    "Tokenizer",
    "Tokens",
    "build_cache",
    "encode_captions",
    "l2_normalize",
    "load_model",
    "load_text_encoder",
    "make_text_encoder",
    "mean_pool",
    "pool_eos",
    "text_config",
    "text_width",
]
