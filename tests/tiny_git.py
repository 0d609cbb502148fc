"""A tiny random GIT (transformers' GitForCausalLM) saved in Hugging Face layout, with a
WordPiece tokenizer of whole-word tokens and a CLIP processor at 32 px: what the GIT and
captioning tests load through `imagen_jax` and compare with transformers."""

from __future__ import annotations

import pathlib

import torch
import transformers

SPECIAL = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]  # ids 0..4: pad, -, bos, eos
WORDS = [a + b for a in "abcdefghijklmnopqrs" for b in "aeiou"]  # 95 whole-word tokens
IMAGE_SIZE = 32


def hf_config(**overrides) -> transformers.GitConfig:
    vision = dict(
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        image_size=IMAGE_SIZE,
        patch_size=8,
        hidden_act="quick_gelu",
    )
    text = dict(
        vocab_size=len(SPECIAL) + len(WORDS),
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        max_position_embeddings=64,
        hidden_act="gelu",
        pad_token_id=0,
        bos_token_id=2,
        eos_token_id=3,
        initializer_range=0.2,  # wide logits: the argmax and the beams differ between images
    )
    return transformers.GitConfig(vision_config=vision, **{**text, **overrides})


def save_tiny_git(path: str | pathlib.Path, *, seed: int = 0):
    """Writes the model, tokenizer and processor to `path`; returns (the transformers
    model in eval mode, its tokenizer)."""
    path = pathlib.Path(path)
    torch.manual_seed(seed)
    hf = transformers.GitForCausalLM(hf_config()).eval()
    with torch.no_grad():  # LayerNorms and biases random too, so that their loading shows
        for name, p in hf.named_parameters():
            if "LayerNorm" in name or "layer_norm" in name or name.endswith("bias"):
                p.add_(0.1 * torch.randn_like(p))
        hf.output.bias[3] += 1.5  # eos often enough that some captions end early
    hf.save_pretrained(path)
    vocab = path / "vocab.txt"
    vocab.write_text("\n".join(SPECIAL + WORDS) + "\n")
    tok = transformers.BertTokenizerFast(vocab=str(vocab))  # v5: `vocab`, not vocab_file
    tok.save_pretrained(path)
    processor = transformers.CLIPImageProcessor(
        size={"shortest_edge": IMAGE_SIZE}, crop_size={"height": IMAGE_SIZE, "width": IMAGE_SIZE}
    )
    processor.save_pretrained(path)
    return hf, tok
