"""CLIP and SigLIP two-tower models against transformers' CLIPModel and SiglipModel on tiny
random models (`tiny_two_towers`): embeddings, logits and losses; the compile-once
embedding functions; save and load both ways; the strict loaders' refusals."""

from __future__ import annotations

import json
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import tiny_two_towers as tiny
import torch
import transformers
from flax import nnx
from safetensors.numpy import load_file, save_file

from imagen_jax.models import two_towers, vit
from imagen_jax.text import clip
from imagen_jax.training import contrastive
from imagen_jax.weights import CheckpointError

EMBED_TOL = 1e-5  # embeddings: max |ours - transformers|, float32
LOGIT_TOL = 1e-4  # logits (up to ~20 here) and losses
FAMILIES = ("clip", "siglip")
LOAD = {"clip": two_towers.load_clip, "siglip": two_towers.load_siglip}
SAVE = {"clip": two_towers.save_clip, "siglip": two_towers.save_siglip}
LOSS = {"clip": "softmax", "siglip": "sigmoid"}


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    """family -> (directory, the transformers model, our model loaded from it)."""
    out = {}
    for family in FAMILIES:
        path = tmp_path_factory.mktemp(family)
        hf = tiny.save_tiny(path, family)
        out[family] = (path, hf, LOAD[family](path))
    return out


@nnx.jit
def _forward(model, pixels, ids, mask):
    """The model's output and the towers' unnormalised features: one program."""
    features = model.get_image_features(pixels), model.get_text_features(ids, mask)
    return model(pixels, ids, mask), features


@pytest.mark.parametrize("family", FAMILIES)
def test_embeddings_logits_and_loss_match_transformers(saved, family):
    _, hf, ours = saved[family]
    pixels, ids, mask = tiny.inputs(family)
    out, features = _forward(ours, jnp.asarray(pixels), jnp.asarray(ids), jnp.asarray(mask))
    t_ids, t_mask = torch.from_numpy(ids), torch.from_numpy(mask)
    with torch.no_grad():
        want = hf(
            input_ids=t_ids, attention_mask=t_mask, pixel_values=tiny.nchw(pixels), return_loss=True
        )
        want_features = (
            hf.get_image_features(tiny.nchw(pixels)).pooler_output,
            hf.get_text_features(input_ids=t_ids, attention_mask=t_mask).pooler_output,
        )
    err = lambda a, b: float(np.abs(np.asarray(a) - b.numpy()).max())  # noqa: E731
    errors = {
        "image_features": err(features[0], want_features[0]),
        "text_features": err(features[1], want_features[1]),
        "image_embeds": err(out.image_embeds, want.image_embeds),
        "text_embeds": err(out.text_embeds, want.text_embeds),
    }
    logit_errors = {
        "logits_per_image": err(out.logits_per_image, want.logits_per_image),
        "logits_per_text": err(out.logits_per_text, want.logits_per_text),
    }
    loss = contrastive.contrastive_loss(
        LOSS[family],
        out.image_embeds,
        out.text_embeds,
        logit_scale=ours.logit_scale[...],
        logit_bias=None if ours.logit_bias is None else ours.logit_bias[...],
    )
    logit_errors["loss"] = abs(float(loss) - float(want.loss))
    print(family, {k: f"{v:.1e}" for k, v in {**errors, **logit_errors}.items()})
    assert max(errors.values()) < EMBED_TOL, errors
    assert max(logit_errors.values()) < LOGIT_TOL, logit_errors
    # The comparison can fail: the logits spread over several units, per pair.
    assert np.ptp(want.logits_per_image.numpy()) > 1.0
    width = 16 if family == "clip" else 32
    assert out.image_embeds.shape == out.text_embeds.shape == (5, width)


def test_embedding_functions_compile_once_per_shape(saved):
    _, _, ours = saved["siglip"]
    pixels, ids, mask = tiny.inputs("siglip", batch=3, seed=1)
    before = two_towers.image_embeds._cache_size(), two_towers.text_embeds._cache_size()
    first = two_towers.embed_images(ours, pixels)
    again = two_towers.embed_images(ours, pixels[::-1].copy())
    two_towers.embed_texts(ours, ids, mask)
    two_towers.embed_texts(ours, ids[::-1].copy(), mask[::-1].copy())
    after = two_towers.image_embeds._cache_size(), two_towers.text_embeds._cache_size()
    assert (after[0] - before[0], after[1] - before[1]) == (1, 1)
    np.testing.assert_allclose(np.asarray(again)[::-1], first, atol=1e-6)
    np.testing.assert_allclose(np.linalg.norm(first, axis=-1), 1.0, atol=1e-6)
    with pytest.raises(ValueError, match="input images are 24x24; the model takes 32x32"):
        two_towers.embed_images(ours, np.zeros((1, 24, 24, 3), np.float32))


@pytest.mark.parametrize("family", FAMILIES)
def test_save_reads_back_in_transformers_and_here(saved, family, tmp_path):
    _, hf, ours = saved[family]
    out = SAVE[family](tmp_path / "saved", ours)
    cls = transformers.CLIPModel if family == "clip" else transformers.SiglipModel
    back = cls.from_pretrained(out).eval()
    want = {k: v for k, v in hf.state_dict().items() if not k.endswith("position_ids")}
    got = back.state_dict()
    assert set(want) <= set(got)
    for name, tensor in want.items():
        torch.testing.assert_close(got[name], tensor, rtol=0, atol=0, msg=name)
    again = LOAD[family](out)
    for a, b in zip(
        jax.tree.leaves(nnx.state(ours)), jax.tree.leaves(nnx.state(again)), strict=True
    ):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    with pytest.raises(TypeError, match="expected a CLIPModel, got SiglipModel"):
        two_towers.save_clip(tmp_path / "wrong", saved["siglip"][2])


def _copy(saved, family, tmp_path):
    dst = tmp_path / family
    shutil.copytree(saved[family][0], dst)
    return dst


def _edit_weights(path, fn):
    tensors = load_file(path / "model.safetensors")
    fn(tensors)
    save_file(tensors, path / "model.safetensors", metadata={"format": "pt"})


def _edit_config(path, fn):
    config = json.loads((path / "config.json").read_text())
    fn(config)
    (path / "config.json").write_text(json.dumps(config))


def test_strict_loading_names_each_tensor(saved, tmp_path):
    path = _copy(saved, "siglip", tmp_path)
    probe = "vision_model.head.probe"
    _edit_weights(path, lambda t: t.pop(probe))
    _edit_weights(path, lambda t: t.update({"text_model.extra": np.zeros(3, np.float32)}))
    _edit_weights(path, lambda t: t.update({"logit_bias": np.zeros(2, np.float32)}))
    with pytest.raises(CheckpointError) as e:
        two_towers.load_siglip(path)
    message = str(e.value)
    assert f"1 missing: {probe} (expected shape (1, 1, 32))" in message
    assert "1 unexpected: text_model.extra" in message
    assert "1 mis-shaped: logit_bias: checkpoint (2,), expected (1,)" in message


def test_one_tower_checkpoints_are_refused(saved, tmp_path):
    vision_only = tmp_path / "clip_vision"
    config = transformers.CLIPVisionConfig(**tiny.vision_config("clip"))
    transformers.CLIPVisionModel(config).save_pretrained(vision_only)
    message = (
        r"'clip_vision_model' \(CLIPVisionModel\) holds only the image tower: not a full CLIPModel"  # noqa: E501
    )
    with pytest.raises(CheckpointError, match=message):
        two_towers.load_clip(vision_only)
    text_only = tmp_path / "siglip_text"
    config = transformers.SiglipTextConfig(**tiny.text_config("siglip"))
    transformers.SiglipTextModel(config).save_pretrained(text_only)
    with pytest.raises(CheckpointError, match=r"holds only the text tower: not a full SiglipModel"):
        two_towers.load_siglip(text_only)
    # A full model's config.json beside the weights of one tower.
    path = _copy(saved, "clip", tmp_path)
    drop = lambda t: [t.pop(k) for k in list(t) if k.startswith("text_model.")]  # noqa: E731
    _edit_weights(path, drop)
    with pytest.raises(CheckpointError, match=r"holds only the image tower \(no text_model\.\*"):
        two_towers.load_clip(path)
    with pytest.raises(CheckpointError, match=r"model_type 'siglip'.*not a full CLIPModel"):
        two_towers.load_clip(saved["siglip"][0])


def _set(section, **values):
    def fn(config):
        config[section].update(values)

    return fn


@pytest.mark.parametrize(
    "family, edit, message",
    [
        ("siglip", _set("vision_config", vision_use_head=False), r"vision_config: vision_use_head=False is not supported"),  # noqa: E501
        ("siglip", _set("vision_config", image_size=[32, 48]), r"vision_config: image_size=\[32, 48\]: only square"),  # noqa: E501
        ("clip", _set("text_config", hidden_act="mish"), r"text_config: hidden_act='mish'"),
        ("clip", _set("vision_config", patch_size=5), r"image_size 32 is not a multiple of patch_size 5"),  # noqa: E501
        ("siglip", _set("text_config", projection_size=24), r"widths differ: the text tower embeds into 24 dimensions \(text projection_size\), the image tower into 32 \(image hidden_size\)"),  # noqa: E501
    ],
    ids=["no_head", "non_square", "activation", "patch", "widths"],
)  # fmt: skip
def test_unsupported_configs_are_named(saved, tmp_path, family, edit, message):
    path = _copy(saved, family, tmp_path)
    _edit_config(path, edit)
    with pytest.raises(CheckpointError, match=rf"config\.json: .*{message}"):
        LOAD[family](path)


def test_mismatched_tower_widths_in_our_configs():
    text = clip.CLIPTextConfig(
        vocab_size=10, hidden_size=8, intermediate_size=8, num_hidden_layers=1,
        num_attention_heads=2, max_position_embeddings=4, projection_dim=6,
    )  # fmt: skip
    vision = vit.CLIPVisionConfig(
        hidden_size=8, intermediate_size=8, num_hidden_layers=1, num_attention_heads=2,
        image_size=8, patch_size=4, projection_dim=4,
    )  # fmt: skip
    with pytest.raises(ValueError, match=r"text tower embeds into 6 .* image tower into 4"):
        two_towers.CLIPModel(text, vision, rngs=nnx.Rngs(0))
    with pytest.raises(ValueError, match="a SiglipModel needs siglip towers, got a clip text"):
        two_towers.SiglipModel(text, vision, rngs=nnx.Rngs(0))
