"""Tiny random two-tower models of transformers (CLIPModel, SiglipModel) saved in Hugging
Face layout: what the two-tower tests load through `imagen_jax` and compare with
transformers. The text towers are narrower than the image towers (24 against 32), so that a
width mixed up between them shows as a shape error."""

from __future__ import annotations

import math
import pathlib

import numpy as np
import torch
import transformers

IMAGE_SIZE = 32
VOCAB = 99
EOS = 98  # CLIP's end-of-text id here (the pooled position), also its padding
TEXT_LENGTH = 16
LOGIT_SCALE = math.log(20.0)  # wide enough for the logits' tolerance to mean something
LOGIT_BIAS = -3.0  # SigLIP's


def text_config(family: str, **overrides) -> dict:
    text = dict(
        vocab_size=VOCAB,
        hidden_size=24,
        intermediate_size=40,
        num_hidden_layers=2,
        num_attention_heads=4,
        max_position_embeddings=TEXT_LENGTH,
        hidden_act="gelu" if family == "clip" else "gelu_pytorch_tanh",
    )
    if family == "clip":
        text.update(bos_token_id=EOS - 1, eos_token_id=EOS, pad_token_id=EOS)
    else:
        text.update(projection_size=32, pad_token_id=1)
    return {**text, **overrides}


def vision_config(family: str, **overrides) -> dict:
    vision = dict(
        hidden_size=32,
        intermediate_size=48,
        num_hidden_layers=2,
        num_attention_heads=4,
        image_size=IMAGE_SIZE,
        patch_size=8,
        hidden_act="quick_gelu" if family == "clip" else "gelu_pytorch_tanh",
    )
    return {**vision, **overrides}


def hf_config(family: str, *, text=None, vision=None):
    text = text_config(family, **(text or {}))
    vision = vision_config(family, **(vision or {}))
    if family == "clip":
        return transformers.CLIPConfig(text_config=text, vision_config=vision, projection_dim=16)
    return transformers.SiglipConfig(text_config=text, vision_config=vision)


def redraw(model: torch.nn.Module, seed: int) -> None:
    """Non-trivial values for every parameter: biases non-zero, norms not 1, the logit
    scale and bias away from their inits (also the CLIP score tests' models)."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            noise = torch.randn(p.shape, generator=gen)
            if name == "logit_scale":
                p.fill_(LOGIT_SCALE)
            elif name == "logit_bias":
                p.fill_(LOGIT_BIAS)
            elif "norm" in name:  # weights near 1, biases near 0
                p.copy_(1.0 + 0.2 * noise if name.endswith("weight") else 0.2 * noise)
            elif name.endswith(
                ("token_embedding.weight", "position_embedding.weight", "class_embedding")
            ):
                p.copy_(noise)
            else:  # linear and patch-conv weights, biases, the probe: scaled by the fan-in
                p.copy_(noise * 0.5 / np.sqrt(p[0].numel() if p.ndim > 1 else p.shape[0]))


def save_tiny(path: str | pathlib.Path, family: str, *, seed: int = 0, **config):
    """Writes a random CLIPModel ("clip") or SiglipModel ("siglip") to `path`; returns the
    transformers model in eval mode."""
    torch.manual_seed(seed)
    cls = transformers.CLIPModel if family == "clip" else transformers.SiglipModel
    model = cls(hf_config(family, **config)).eval()
    redraw(model, seed)
    model.save_pretrained(path)
    return model


def inputs(family: str, batch: int = 5, *, seed: int = 0):
    """(pixel_values [B, 32, 32, 3] float32 NHWC, input_ids [B, L] int64, attention_mask
    [B, L]): texts of different lengths, right-padded; CLIP's end with EOS."""
    rng = np.random.default_rng(seed)
    pixels = rng.normal(size=(batch, IMAGE_SIZE, IMAGE_SIZE, 3)).astype(np.float32)
    ids = rng.integers(2, EOS - 1, (batch, TEXT_LENGTH)).astype(np.int64)
    mask = np.ones_like(ids)
    for row, length in enumerate(np.linspace(3, TEXT_LENGTH, batch).astype(int)):
        mask[row, length:] = 0
        if family == "clip":
            ids[row, length - 1] = EOS
            ids[row, length:] = EOS
        else:
            ids[row, length:] = 1
    return pixels, ids, mask


def nchw(pixels: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(pixels).permute(0, 3, 1, 2).contiguous()
