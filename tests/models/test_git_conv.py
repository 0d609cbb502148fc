"""A GIT captioner with the project's conv image tower (`image_tower="conv"`): its decoder is
transformers' GitForCausalLM's (same logits given the same image tokens), its directory
round-trips strictly, and transformers refuses it instead of loading a ViT around it."""

from __future__ import annotations

import dataclasses
import json
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import transformers
from flax import nnx
from safetensors.numpy import load_file, save_file
from tiny_git import IMAGE_SIZE, hf_config

from imagen_jax.models import git
from imagen_jax.pipelines import captioning
from imagen_jax.weights import CheckpointError

TOL = 1e-4  # logits: max |ours - transformers|, float32
WIDTHS = (8, 16)  # 32 px -> 8x8 tokens


def conv_config() -> git.GitConfig:
    hf = hf_config().to_dict()
    base = git.GitConfig.from_hf({**hf, "model_type": "git"})
    vision = dataclasses.replace(base.vision, patch_size=2 ** len(WIDTHS))
    return dataclasses.replace(
        base,
        vision=vision,
        image_tower="conv",
        conv_widths=WIDTHS,
        conv_foreground=True,
        conv_cell_classes=7,
    )


@pytest.fixture(scope="module")
def conv_dir(tmp_path_factory):
    """Our random conv-tower GIT saved with save_git, beside tiny_git's tokenizer and
    processor files (the pipeline needs them)."""
    from tiny_git import save_tiny_git

    vit_dir = tmp_path_factory.mktemp("git_vit")
    save_tiny_git(vit_dir)
    path = tmp_path_factory.mktemp("git_conv")
    for f in vit_dir.iterdir():
        if f.name not in ("config.json", "model.safetensors"):
            shutil.copy(f, path / f.name)
    config = conv_config()
    model = git.GitForCausalLM(config, rngs=nnx.Rngs(3))
    params = nnx.to_pure_dict(nnx.state(model, nnx.Param))
    params = jax.tree.map(lambda p: p + 0.05 * jnp.sin(jnp.arange(p.size).reshape(p.shape)), params)
    git.save_git(path, params, config)
    return path, config


def test_decoder_matches_transformers_given_the_same_image_tokens(conv_dir):
    """transformers' GitForCausalLM with our decoder weights and its image encoder replaced
    by our conv tower's tokens gives our logits: everything after the tower is GIT's."""
    path, config = conv_dir
    ours = git.load_git(path)
    hf = transformers.GitForCausalLM(hf_config()).eval()
    tensors = {k: torch.from_numpy(v) for k, v in load_file(path / "model.safetensors").items()}
    missing, unexpected = hf.load_state_dict(tensors, strict=False)
    assert all(k.startswith("git.image_encoder.vision_model.") for k in missing)
    assert unexpected and all(k.startswith("git.image_encoder.conv.") for k in unexpected)

    rng = np.random.default_rng(0)
    pixels = rng.uniform(-1, 1, (3, IMAGE_SIZE, IMAGE_SIZE, 3)).astype(np.float32)
    tokens = ours.image_encoder(jnp.asarray(pixels)).last_hidden_state
    tokens = np.asarray(ours.image_encoder.post_layernorm(tokens))  # as GIT's ViT returns them

    class Tokens(torch.nn.Module):
        def forward(self, pixel_values, **kw):
            return transformers.modeling_outputs.BaseModelOutput(
                last_hidden_state=torch.from_numpy(tokens)
            )

    hf.git.image_encoder = Tokens()
    ids = rng.integers(5, 100, (3, 6)).astype(np.int64)
    ids[:, 0] = 2
    mask = np.ones_like(ids)
    mask[1, 3:] = 0
    with torch.no_grad():
        want = hf(
            input_ids=torch.from_numpy(ids),
            attention_mask=torch.from_numpy(mask),
            pixel_values=torch.zeros(3, 3, IMAGE_SIZE, IMAGE_SIZE),
        ).logits.numpy()
    got = np.asarray(ours(jnp.asarray(pixels), jnp.asarray(ids), jnp.asarray(mask)))
    assert got.shape == want.shape == (3, config.num_image_tokens + 6, 100)
    assert config.num_image_tokens == (IMAGE_SIZE // 4) ** 2
    np.testing.assert_allclose(got, want, atol=TOL, rtol=0)


def test_captions_do_not_depend_on_batch_or_devices(conv_dir):
    path, _ = conv_dir
    rng = np.random.default_rng(1)
    images = [rng.integers(0, 256, (IMAGE_SIZE, IMAGE_SIZE, 3), np.uint8) for _ in range(5)]
    one = captioning.load_captioner(path, max_length=10, batch_size=1, devices=jax.devices()[:1])
    two = captioning.load_captioner(path, max_length=10, batch_size=4, devices=jax.devices()[:2])
    assert one(images) == two(images)
    assert len(set(one(images))) > 1  # the images' tokens reach the captions


def test_round_trip_is_strict_and_transformers_refuses_it(conv_dir, tmp_path):
    path, config = conv_dir
    assert git.read_git_config(path) == config
    hf = json.loads((path / "config.json").read_text())
    assert hf["model_type"] == git.CONV_MODEL_TYPE and hf["conv_widths"] == list(WIDTHS)
    with pytest.raises(ValueError, match=git.CONV_MODEL_TYPE):
        transformers.AutoConfig.from_pretrained(path)

    bad = tmp_path / "bad"
    shutil.copytree(path, bad)
    tensors = load_file(bad / "model.safetensors")
    name = "git.image_encoder.conv.layers.6.kernel"
    assert tensors[name].shape == (3, 3, 16, 16)  # our layout: HWIO
    tensors.pop(name)
    save_file(tensors, bad / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(CheckpointError, match=rf"1 missing: {name}"):
        git.load_git(bad)
    hf["conv_widths"] = [8, 16, 32]  # 32 px: 4x4 tokens, other shapes
    (bad / "config.json").write_text(json.dumps(hf))
    with pytest.raises(CheckpointError, match="mis-shaped"):
        git.load_git(bad)
    hf["conv_widths"] = [8] * 6  # stride 64 > 32 px
    (bad / "config.json").write_text(json.dumps(hf))
    with pytest.raises(CheckpointError, match=r"not divisible by 64"):
        git.load_git(bad)


def test_config_refuses_conv_settings_on_a_vit():
    with pytest.raises(ValueError, match="image_tower='conv'"):
        git.make_config("shapes", image_size=64, conv_widths=(8,))
    with pytest.raises(ValueError, match="image_tower='cnn'"):
        git.make_config("shapes", image_size=64, image_tower="cnn")
