"""GIT against transformers' GitForCausalLM on one tiny random model: logits, greedy and
beam-search token ids, captions, and the strict loader's refusals."""

from __future__ import annotations

import json
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from safetensors.numpy import load_file, save_file
from tiny_git import save_tiny_git

from imagen_jax.images import ImageProcessor
from imagen_jax.models import git
from imagen_jax.pipelines import captioning
from imagen_jax.weights import CheckpointError

TOL = 1e-4  # logits: max |ours - transformers|, float32
IMAGES = 6
MAX_LENGTH = 12


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp("git")
    hf, tok = save_tiny_git(path)
    return path, hf, tok


@pytest.fixture(scope="module")
def inputs(model_dir):
    rng = np.random.default_rng(0)
    images = [rng.integers(0, 256, (40, 48, 3), np.uint8) for _ in range(IMAGES)]
    processor = ImageProcessor.from_dir(model_dir[0])
    pixels = np.stack([processor(im) for im in images])  # [B, 32, 32, 3]
    return images, pixels, torch.from_numpy(pixels).permute(0, 3, 1, 2).contiguous()


@pytest.fixture(scope="module")
def ours(model_dir):
    return git.load_git(model_dir[0])


def test_logits_match_transformers_with_padded_text(model_dir, inputs, ours):
    _, hf, _ = model_dir
    _, pixels, pixels_t = inputs
    rng = np.random.default_rng(1)
    ids = rng.integers(5, 100, (IMAGES, 7)).astype(np.int64)
    ids[:, 0] = 2
    mask = np.ones_like(ids)
    mask[1, 4:] = 0  # right padding
    mask[3, 2:] = 0
    ids[mask == 0] = 0
    with torch.no_grad():
        want = hf(
            input_ids=torch.from_numpy(ids),
            attention_mask=torch.from_numpy(mask),
            pixel_values=pixels_t,
        ).logits.numpy()
    got = np.asarray(ours(jnp.asarray(pixels), jnp.asarray(ids), jnp.asarray(mask)))
    assert got.shape == want.shape == (IMAGES, 17 + 7, 100)
    np.testing.assert_allclose(got, want, atol=TOL, rtol=0)
    unmasked = np.asarray(ours(jnp.asarray(pixels), jnp.asarray(ids)))
    with torch.no_grad():
        want = hf(input_ids=torch.from_numpy(ids), pixel_values=pixels_t).logits.numpy()
    np.testing.assert_allclose(unmasked, want, atol=TOL, rtol=0)


def _transformers_generate(hf, pixels_t, **kw):
    with torch.no_grad():
        return hf.generate(pixel_values=pixels_t, max_length=MAX_LENGTH, do_sample=False, **kw)


def _decoding(**kw):
    return captioning.Decoding(max_length=MAX_LENGTH, eos_token_id=(3,), pad_token_id=0, **kw)


@pytest.mark.parametrize(
    "settings",
    [
        dict(num_beams=1),
        dict(num_beams=3, length_penalty=0.6),
        dict(num_beams=3, length_penalty=1.5, early_stopping=True),
        dict(num_beams=3, length_penalty=2.0, early_stopping="never"),
    ],
    ids=["greedy", "beam3_lp0.6", "beam3_lp1.5_early", "beam3_lp2_never"],
)
def test_generation_matches_transformers(model_dir, inputs, ours, settings):
    _, hf, _ = model_dir
    _, pixels, pixels_t = inputs
    want = _transformers_generate(hf, pixels_t, **settings).numpy()
    got = captioning.generate(ours, pixels, _decoding(**settings))
    np.testing.assert_array_equal(got.crop(), want)
    # The test can fail: captions differ, and some stop early while others run to max_length
    # (with "never" and length_penalty 2 every beam runs to the end).
    assert len({tuple(r) for r in want}) > 1 and want.shape[1] == MAX_LENGTH
    assert (want[:, 1:] == 3).any() == (settings.get("early_stopping") != "never")


def test_left_padded_prompts_match_transformers(model_dir, inputs, ours):
    """Prompts of different lengths, left-padded with a mask (question answering's form)."""
    _, hf, _ = model_dir
    _, pixels, pixels_t = inputs
    ids = np.array([[2, 7, 9, 11], [0, 0, 2, 40], [0, 2, 60, 61]] * 2, np.int64)
    mask = (ids != 0).astype(np.int64)
    with torch.no_grad():
        want = hf.generate(
            pixel_values=pixels_t,
            input_ids=torch.from_numpy(ids),
            attention_mask=torch.from_numpy(mask),
            max_length=MAX_LENGTH,
            do_sample=False,
        ).numpy()
    got = captioning.generate(ours, pixels, _decoding(), prompt_ids=ids, prompt_mask=mask)
    np.testing.assert_array_equal(got.crop(), want)


def test_captioner_pads_and_shards_the_batch(model_dir, inputs):
    """A batch of 4 on 2 devices for 6 images: a full batch and a padded one; the same ids
    and captions as transformers' generate + batch_decode."""
    path, hf, tok = model_dir
    images, _, pixels_t = inputs
    captioner = captioning.load_captioner(
        path, max_length=MAX_LENGTH, num_beams=3, length_penalty=0.6, batch_size=4,
        devices=jax.local_devices()[:2],
    )  # fmt: skip
    want = _transformers_generate(hf, pixels_t, num_beams=3, length_penalty=0.6)
    assert captioner(images) == tok.batch_decode(want, skip_special_tokens=True)
    got = captioner.generate(captioner.processor(images[0])[None])
    np.testing.assert_array_equal(got.crop(), want[:1, : got.crop().shape[1]].numpy())


def _copy(model_dir, tmp_path):
    dst = tmp_path / "model"
    shutil.copytree(model_dir[0], dst)
    return dst


def _edit_weights(path, fn):
    tensors = load_file(path / "model.safetensors")
    fn(tensors)
    save_file(tensors, path / "model.safetensors", metadata={"format": "pt"})


def _edit_config(path, **changes):
    config = json.loads((path / "config.json").read_text())
    config.update(changes)
    (path / "config.json").write_text(json.dumps(config))


def test_strict_loading_names_each_problem(model_dir, tmp_path):
    path = _copy(model_dir, tmp_path)
    name = "git.encoder.layer.1.attention.self.key.weight"
    _edit_weights(path, lambda t: t.pop(name))
    with pytest.raises(CheckpointError, match=rf"1 missing: {name}"):
        git.load_git(path)
    _edit_weights(path, lambda t: t.update({name: np.zeros((32, 32), np.float32)}))
    _edit_weights(path, lambda t: t.update({"git.extra.weight": np.zeros(3, np.float32)}))
    with pytest.raises(CheckpointError, match=r"1 unexpected: git\.extra\.weight"):
        git.load_git(path)
    _edit_weights(path, lambda t: t.pop("git.extra.weight"))
    _edit_weights(path, lambda t: t.update({"output.bias": np.zeros(7, np.float32)}))
    with pytest.raises(CheckpointError, match=r"mis-shaped: output\.bias: checkpoint \(7,\)"):
        git.load_git(path)


def test_refuses_other_architectures_and_unsupported_settings(model_dir, tmp_path):
    path = _copy(model_dir, tmp_path)
    _edit_config(path, model_type="bert", architectures=["BertModel"])
    with pytest.raises(CheckpointError, match=r"model_type 'bert'.*not a GIT"):
        git.load_git(path)
    _edit_config(path, model_type="git", architectures=["GitModel"])
    with pytest.raises(CheckpointError, match=r"\['GitModel'\]"):
        git.load_git(path)
    _edit_config(path, architectures=["GitForCausalLM"], num_image_with_embedding=6)
    with pytest.raises(CheckpointError, match=r"num_image_with_embedding=6 is not supported"):
        git.load_git(path)
    _edit_config(path, num_image_with_embedding=None, hidden_act="mish")
    with pytest.raises(CheckpointError, match=r"hidden_act='mish'"):
        git.load_git(path)
    config = json.loads((path / "config.json").read_text())
    config["hidden_act"] = "gelu"
    config["vision_config"]["image_size"] = 30
    (path / "config.json").write_text(json.dumps(config))
    with pytest.raises(CheckpointError, match=r"vision_config.image_size=30"):
        git.load_git(path)
