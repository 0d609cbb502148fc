"""The frozen-text two-tower model: shapes, pooling, and its directory (save -> load gives the
same embeddings; the loader names missing, unexpected and mis-shaped tensors and refuses a
directory of another kind)."""

import json

import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from safetensors.numpy import load_file, save_file

from imagen_jax.images import clip_preprocessor_config
from imagen_jax.models import frozen_text_towers as ftt
from imagen_jax.weights import CheckpointError

TEXT = {"kind": "hash", "dim": 32, "max_length": 8}


def model(**overrides):
    config = ftt.make_config("runlocal", text_dim=32, **overrides)
    return config, ftt.FrozenTextTowers(config, rngs=nnx.Rngs(0))


def inputs(seed=0):
    rng = np.random.default_rng(seed)
    pixels = jnp.asarray(rng.normal(size=(3, 16, 16, 3)), jnp.float32)
    tokens = jnp.asarray(rng.normal(size=(3, 8, 32)), jnp.float32)
    mask = jnp.asarray(np.arange(8)[None, :] < np.array([[3], [8], [5]]))
    return pixels, tokens, mask


def test_embeddings_and_mean_pooling_ignore_padding():
    _, m = model(text_hidden=16)
    pixels, tokens, mask = inputs()
    image, text = m.embed(pixels, tokens, mask)
    assert image.shape == text.shape == (3, 32)
    np.testing.assert_allclose(np.linalg.norm(image, axis=-1), 1.0, rtol=1e-5)
    padded = tokens.at[0, 3:].set(100.0)  # row 0 has 3 tokens: the rest must not count
    np.testing.assert_array_equal(
        m.get_text_features(padded, mask), m.get_text_features(tokens, mask)
    )
    assert m.logits(image, text).shape == (3, 3)


def save(path, config, m):
    params = nnx.to_pure_dict(nnx.state(m, nnx.Param))
    processor = clip_preprocessor_config(16, (0.5,) * 3, (0.5,) * 3)
    return ftt.save_frozen_text_towers(
        path, config, params, text=TEXT, processor=processor, dtype=np.float32
    )


def test_directory_round_trip(tmp_path):
    config, m = model(logit_bias=False)
    save(tmp_path, config, m)
    loaded, text = ftt.load_frozen_text_towers(tmp_path)
    assert text == TEXT and loaded.logit_bias is None and loaded.config == config
    pixels, tokens, mask = inputs(1)
    for a, b in zip(m.embed(pixels, tokens, mask), loaded.embed(pixels, tokens, mask), strict=True):
        np.testing.assert_array_equal(a, b)


def test_loader_is_strict(tmp_path):
    config, m = model()
    save(tmp_path, config, m)
    file = tmp_path / "model.safetensors"
    tensors = load_file(file)
    tensors["extra"] = np.zeros(2, np.float32)
    tensors.pop("logit_bias")
    tensors["text_projection/kernel"] = np.zeros((31, 32), np.float32)
    save_file(tensors, file)
    with pytest.raises(CheckpointError) as e:
        ftt.load_frozen_text_towers(tmp_path)
    for part in (
        "missing logit_bias (1,)",
        "unexpected extra (2,)",
        "text_projection/kernel: file (31, 32), model (32, 32)",
    ):
        assert part in str(e.value)
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "git"}))
    with pytest.raises(CheckpointError, match="model_type 'git', not a 'frozen_text_two_towers'"):
        ftt.load_frozen_text_towers(tmp_path)


def test_conv_image_tower_round_trip_and_sees_where_things_are(tmp_path):
    config, m = model(image_tower="conv", conv_widths=(4, 8))
    assert config.conv_widths == (4, 8)
    save(tmp_path, config, m)
    loaded, _ = ftt.load_frozen_text_towers(tmp_path)
    assert loaded.config == config
    pixels, tokens, mask = inputs(2)
    for a, b in zip(m.embed(pixels, tokens, mask), loaded.embed(pixels, tokens, mask), strict=True):
        np.testing.assert_array_equal(a, b)
    # Flattened, not pooled: a mirrored image embeds differently.
    features = np.asarray(m.get_image_features(pixels))
    mirrored = np.asarray(m.get_image_features(pixels[:, :, ::-1]))
    assert features.shape == (3, 32) and np.abs(features - mirrored).max() > 1e-3


def test_bad_configs():
    with pytest.raises(ValueError, match="image_tower='cnn'"):
        model(image_tower="cnn")
    with pytest.raises(ValueError, match="conv_widths=\\(\\): positive widths"):
        model(image_tower="conv")
    with pytest.raises(ValueError, match="image_size 16 is not divisible by 32"):
        model(image_tower="conv", conv_widths=(2, 2, 2, 2, 2))
    with pytest.raises(ValueError, match="text_pooling='max'"):
        model(text_pooling="max")
    with pytest.raises(ValueError, match="vision.projection_dim must be unset"):
        model(vision={"projection_dim": 8})


def test_foreground_channel_is_the_silhouette_in_any_colour():
    """The conv tower's colour-blind channel: ~0 on the plain background, the same silhouette
    (above a floor) for one shape drawn in different colours."""
    import numpy as np

    from imagen_jax.models.conv_tower import foreground_channel
    from imagen_jax.shapes.edits import footprint
    from imagen_jax.shapes.render import render
    from imagen_jax.shapes.spec import Scene, SceneObject

    silhouettes = []
    for color in ("red", "blue", "yellow", "purple"):
        scene = Scene((SceneObject("star", color, 0.3, 0.5, 0.5),), "gray")
        pixels = render(scene, 64).astype(np.float32) / 127.5 - 1.0
        fg = np.asarray(foreground_channel(pixels[None]))[0, ..., 0]
        inside = footprint(scene, 0, 64)
        assert np.all(fg[~inside] < 1e-5)
        silhouettes.append(fg > 0.15)
    for other in silhouettes[1:]:
        assert (other != silhouettes[0]).mean() < 0.01
