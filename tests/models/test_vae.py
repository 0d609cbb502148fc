"""The Flax AutoencoderKL against diffusers' on tiny random models of the same architecture,
saved in diffusers layout and loaded through `load_vae`; and the loader's errors.

Tolerances are max |ours - diffusers| / max |diffusers| over the output (float32 on CPU).
"""

import json
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from flax import nnx
from safetensors.numpy import load_file, save_file

from imagen_jax.models import vae
from imagen_jax.weights import CheckpointError

diffusers = pytest.importorskip("diffusers")

WEIGHTS = "diffusion_pytorch_model.safetensors"
RTOL = 1e-4
SD_LIKE = dict(
    block_out_channels=(32, 64),
    down_block_types=("DownEncoderBlock2D",) * 2,
    up_block_types=("UpDecoderBlock2D",) * 2,
    layers_per_block=1,
    norm_num_groups=8,
    sample_size=32,
    latent_channels=4,
)
SD3_LIKE = dict(
    SD_LIKE,
    layers_per_block=2,
    latent_channels=16,
    use_quant_conv=False,
    use_post_quant_conv=False,
    mid_block_add_attention=False,
    scaling_factor=1.5305,
    shift_factor=0.0609,
)


def _make_tiny(path, *, seed=0, **overrides):
    """A diffusers AutoencoderKL with every parameter re-drawn (norm scales away from 1,
    non-zero biases, so that a swapped or mis-laid tensor cannot go unnoticed), saved."""
    torch.manual_seed(seed)
    model = diffusers.AutoencoderKL(**{**SD_LIKE, **overrides}).eval()
    gen = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for name, p in model.named_parameters():
            noise = torch.randn(p.shape, generator=gen)
            if p.ndim == 1:
                p.copy_(1.0 + 0.2 * noise if "norm" in name and name.endswith("weight") else noise)
            else:
                p.copy_(noise / np.sqrt(np.prod(p.shape[1:])))
    model.save_pretrained(path, safe_serialization=True)
    return model


@pytest.fixture(scope="module")
def sd(tmp_path_factory):
    path = tmp_path_factory.mktemp("sd_vae")
    ref = _make_tiny(path)
    model, config = vae.load_vae(path)
    return ref, model, config, path


@pytest.fixture(scope="module")
def sd3(tmp_path_factory):
    path = tmp_path_factory.mktemp("sd3_vae")
    ref = _make_tiny(path, seed=3, **SD3_LIKE)
    model, config = vae.load_vae(path)
    return ref, model, config, path


def _nhwc(x: torch.Tensor) -> np.ndarray:
    return x.detach().numpy().transpose(0, 2, 3, 1)


def _nchw(x: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(np.ascontiguousarray(x.transpose(0, 3, 1, 2)))


def _relative_error(ours, ref: np.ndarray) -> float:
    return float(np.abs(np.asarray(ours, np.float32) - ref).max() / np.abs(ref).max())


def _images(shape=(2, 32, 32, 3), seed=0):
    return np.random.default_rng(seed).uniform(-1, 1, shape).astype(np.float32)


def _latents(shape, seed=1):
    return np.random.default_rng(seed).normal(size=shape).astype(np.float32)


@nnx.jit
def _encode(model, x):
    return model.encode(x)


@nnx.jit
def _decode(model, z):
    return model.decode(z)


# -- parity ---------------------------------------------------------------------------------


def test_encode_decode_match_diffusers(sd):
    ref, model, _, _ = sd
    x = _images()
    with torch.no_grad():
        posterior = ref.encode(_nchw(x)).latent_dist
    ours = _encode(model, x)
    assert ours.mean.shape == (2, 16, 16, 4)
    assert _relative_error(ours.mean, _nhwc(posterior.mean)) < RTOL
    assert _relative_error(ours.logvar, _nhwc(posterior.logvar)) < RTOL
    assert _relative_error(ours.std, _nhwc(posterior.std)) < RTOL

    z = _latents((2, 16, 16, 4))
    with torch.no_grad():
        want = _nhwc(ref.decode(_nchw(z)).sample)
    got = _decode(model, z)
    assert got.shape == (2, 32, 32, 3) and got.dtype == jnp.float32
    assert _relative_error(got, want) < RTOL


def test_sd3_like_config_matches_diffusers(sd3):
    """No quant convs, no mid-block attention, 16 latent channels, a shift factor."""
    ref, model, config, _ = sd3
    assert config.shift_factor == pytest.approx(0.0609) and model.quant_conv is None
    x = _images(seed=2)
    with torch.no_grad():
        mean = ref.encode(_nchw(x)).latent_dist.mean
        latents = (mean - ref.config.shift_factor) * ref.config.scaling_factor  # SD3 pipeline
        decoded = ref.decode(latents / ref.config.scaling_factor + ref.config.shift_factor).sample
    ours = nnx.jit(lambda m, x: m.latents_from_images(x))(model, x)
    assert ours.shape == (2, 16, 16, 16)
    assert _relative_error(ours, _nhwc(latents)) < RTOL
    images = nnx.jit(lambda m, z: m.images_from_latents(z))(model, _nhwc(latents))
    assert _relative_error(images, _nhwc(decoded)) < RTOL


def test_tiled_decode_matches_diffusers(sd):
    ref, model, _, _ = sd
    z = _latents((1, 14, 14, 4), seed=4)  # tiles of 8 every 6: 8, 8 and an edge tile of 2
    ref.enable_tiling()
    ref.tile_sample_min_size, ref.tile_latent_min_size = 16, 8
    try:
        with torch.no_grad():
            want = _nhwc(ref.decode(_nchw(z)).sample)
    finally:
        ref.disable_tiling()
    got = nnx.jit(lambda m, z: m.tiled_decode(z, tile_sample_size=16))(model, z)
    assert got.shape == (1, 28, 28, 3)
    assert _relative_error(got, want) < RTOL
    # The tiles did make a difference (each decodes alone), so the check above means something.
    assert _relative_error(_decode(model, z), want) > 1e-2


def test_tiled_encode_matches_diffusers(sd):
    ref, model, _, _ = sd
    x = _images((1, 28, 28, 3), seed=5)  # tiles of 16 pixels every 12: 16, 16 and 4
    ref.enable_tiling()
    ref.tile_sample_min_size, ref.tile_latent_min_size = 16, 8
    try:
        with torch.no_grad():
            want = ref.encode(_nchw(x)).latent_dist
    finally:
        ref.disable_tiling()
    got = nnx.jit(lambda m, x: m.tiled_encode(x, tile_sample_size=16))(model, x)
    assert got.mean.shape == (1, 14, 14, 4)
    assert _relative_error(got.mean, _nhwc(want.mean)) < RTOL
    assert _relative_error(got.logvar, _nhwc(want.logvar)) < RTOL


def test_tiled_only_when_larger_than_a_tile(sd):
    _, model, _, _ = sd
    z = _latents((1, 16, 16, 4), seed=6)  # exactly one tile of config.sample_size (32 px)
    tiled = nnx.jit(lambda m, z: m.decode(z, tiled=True))(model, z)
    np.testing.assert_array_equal(np.asarray(tiled), np.asarray(_decode(model, z)))


def test_bfloat16(sd):
    ref, _, _, path = sd
    model, _ = vae.load_vae(path, jnp.bfloat16)
    assert model.decoder.conv_in.kernel.dtype == jnp.bfloat16
    z = _latents((2, 16, 16, 4))
    with torch.no_grad():
        want = _nhwc(ref.decode(_nchw(z)).sample)
    got = _decode(model, z.astype(jnp.bfloat16))
    assert got.dtype == jnp.bfloat16
    assert _relative_error(got, want) < 5e-2


def test_sample_draws_around_the_mean(sd):
    _, model, _, _ = sd
    posterior = _encode(model, _images())
    a, b = (posterior.sample(jax.random.key(i)) for i in (0, 0))
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    c = posterior.sample(jax.random.key(1))
    noise = (np.asarray(c) - np.asarray(posterior.mean)) / np.asarray(posterior.std)
    assert abs(noise.mean()) < 0.05 and abs(noise.std() - 1) < 0.05
    assert posterior.kl().shape == (2,)


# -- the loader -----------------------------------------------------------------------------


def _copy(path, tmp_path, name="copy"):
    out = tmp_path / name
    shutil.copytree(path, out)
    return out


def _edit_config(path, **changes):
    file = path / "config.json"
    config = json.loads(file.read_text())
    file.write_text(json.dumps({**config, **changes}))


def test_legacy_attention_names_and_variant(sd, tmp_path):
    """Checkpoints from before diffusers 0.14 name the attention query/key/value/proj_attn."""
    ref, _, _, path = sd
    out = _copy(path, tmp_path)
    tensors = load_file(out / WEIGHTS)
    old = {"to_q": "query", "to_k": "key", "to_v": "value", "to_out.0": "proj_attn"}
    for name in [n for n in tensors if ".attentions." in n]:
        for new, legacy in old.items():
            if f".{new}." in name:
                tensors[name.replace(f".{new}.", f".{legacy}.")] = tensors.pop(name)
    (out / WEIGHTS).unlink()
    save_file(tensors, out / "diffusion_pytorch_model.fp16.safetensors")
    with pytest.raises(CheckpointError, match=f"expected {WEIGHTS}"):
        vae.load_vae(out)
    model, _ = vae.load_vae(out, variant="fp16")
    z = _latents((2, 16, 16, 4))
    with torch.no_grad():
        want = _nhwc(ref.decode(_nchw(z)).sample)
    assert _relative_error(_decode(model, z), want) < RTOL


def test_truncated_weights(sd, tmp_path):
    out = _copy(sd[3], tmp_path)
    file = out / WEIGHTS
    data = file.read_bytes()
    file.write_bytes(data[:-1000])
    with pytest.raises(CheckpointError, match=f"{file} is truncated: {len(data) - 1000} bytes"):
        vae.load_vae(out)
    file.write_bytes(data[:5])
    with pytest.raises(CheckpointError, match="not a safetensors file"):
        vae.load_vae(out)


def test_missing_and_unexpected_tensors(sd, tmp_path):
    out = _copy(sd[3], tmp_path)
    tensors = load_file(out / WEIGHTS)
    del tensors["decoder.mid_block.attentions.0.to_k.weight"]
    tensors["decoder.extra.weight"] = np.zeros(3, np.float32)
    save_file(tensors, out / WEIGHTS)
    with pytest.raises(CheckpointError) as e:
        vae.load_vae(out)
    message = str(e.value)
    assert "1 missing: decoder.mid_block.attentions.0.to_k.weight (expected shape (64, 64))" in (
        message
    )
    assert "1 unexpected: decoder.extra.weight" in message


def test_mismatched_shapes(sd, tmp_path):
    out = _copy(sd[3], tmp_path)
    _edit_config(out, latent_channels=8)
    with pytest.raises(CheckpointError) as e:
        vae.load_vae(out)
    message = str(e.value)
    assert "mis-shaped" in message
    assert "encoder.conv_out.weight: checkpoint (8, 64, 3, 3), expected (16, 64, 3, 3)" in message
    assert "decoder.conv_in.weight: checkpoint (64, 4, 3, 3), expected (64, 8, 3, 3)" in message


def test_not_a_vae(sd, tmp_path):
    out = _copy(sd[3], tmp_path)
    _edit_config(out, _class_name="UNet2DConditionModel")
    with pytest.raises(CheckpointError, match="_class_name 'UNet2DConditionModel', not 'Autoenc"):
        vae.load_vae(out)
    pipeline = tmp_path / "pipeline"
    shutil.copytree(sd[3], pipeline / "vae")
    (pipeline / "model_index.json").write_text("{}")
    with pytest.raises(CheckpointError, match="pass its VAE folder .*pipeline/vae"):
        vae.load_vae(pipeline)


@pytest.mark.parametrize(
    "changes, words",
    [
        (dict(down_block_types=["DownEncoderBlock2D", "AttnDownEncoderBlock2D"]),
         ["down_block_types", "AttnDownEncoderBlock2D"]),
        (dict(up_block_types=["UpDecoderBlock2D", "AttnUpDecoderBlock2D"]),
         ["up_block_types", "AttnUpDecoderBlock2D"]),
        (dict(act_fn="tanh"), ["act_fn", "'tanh'"]),
        (dict(norm_num_groups=24), ["norm_num_groups 24", "[32, 64]"]),
        (dict(block_out_channels=[32]), ["block_out_channels (32,)", "same length"]),
    ],
)  # fmt: skip
def test_unsupported_config(sd, tmp_path, changes, words):
    hf = {**json.loads((sd[3] / "config.json").read_text()), **changes}
    with pytest.raises(ValueError) as e:
        vae.VAEConfig.from_hf(hf)
    assert all(w in str(e.value) for w in words), str(e.value)
    out = _copy(sd[3], tmp_path)
    _edit_config(out, **changes)
    with pytest.raises(CheckpointError, match="config.json: VAE config: "):
        vae.load_vae(out)
