"""Parity of SD3Transformer with diffusers' SD3Transformer2DModel on tiny random configs.

One tiny config per public family keeps the switches of its config.json and shrinks the
widths: SD 3.0 (plain MMDiT), SD 3.5 Large (RMS qk-norm) and SD 3.5 Medium (qk-norm and dual
attention in the first blocks), plus one without pos_embed_max_size (the position table
computed for the latent's grid). Each reference is built under a fixed torch seed, every
parameter perturbed (so that norm scales and biases are not at their initialization), saved
with `save_pretrained` as safetensors and loaded through `load_sd3_transformer`. On the same
inputs (NCHW for diffusers, NHWC for us), batch 2, the float32 outputs must agree within TOL
(max absolute error); the outputs are O(1). Latents smaller than the position table's grid
take its centre crop, so every case crops, and two use non-square latents.
"""

import dataclasses
import json
import os
import re
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from flax import nnx
from safetensors.numpy import load_file, save_file

from imagen_jax.models import sd3_transformer as sd3
from imagen_jax.weights import CheckpointError

TOL = 1e-4  # float32 parity, max absolute error
BATCH, TEXT_LEN = 2, 7
TIMESTEPS = (999.0, 312.5)  # sigma * 1000, as the flow-matching scheduler passes them

_TINY = dict(
    sample_size=16,
    patch_size=2,
    in_channels=4,
    num_layers=3,
    attention_head_dim=8,
    num_attention_heads=2,
    joint_attention_dim=24,
    caption_projection_dim=16,
    pooled_projection_dim=20,
    out_channels=4,
    pos_embed_max_size=16,
)

MODELS = {
    # stabilityai/stable-diffusion-3-medium: no qk norm, no dual attention.
    "sd3": dict(_TINY),
    # stabilityai/stable-diffusion-3.5-large: RMSNorm on queries and keys.
    "sd35_large": dict(_TINY, num_attention_heads=4, caption_projection_dim=32, qk_norm="rms_norm"),
    # stabilityai/stable-diffusion-3.5-medium: qk norm, attn2 in the first blocks (here the
    # first two of three; the last, context-pre-only block has none).
    "sd35_medium": dict(_TINY, qk_norm="rms_norm", dual_attention_layers=(0, 1)),
    # No public model: a table computed per latent grid; out_channels None (= in_channels).
    "no_max_size": dict(_TINY, sample_size=8, pos_embed_max_size=None, out_channels=None),
}


@dataclasses.dataclass(frozen=True)
class Case:
    model: str
    size: tuple[int, int]  # H, W of the latents


CASES = {
    "sd3": Case("sd3", (16, 16)),  # 8x8 patches of the 16x16 table
    "sd3_small_latent": Case("sd3", (10, 14)),  # 5x7 patches: odd crop margins
    "sd35_large": Case("sd35_large", (16, 16)),
    "sd35_medium": Case("sd35_medium", (12, 12)),
    "no_max_size": Case("no_max_size", (8, 12)),  # a 4x6 grid, base size 4
}


def _reference(config: dict):
    """diffusers' model under a fixed seed, every parameter perturbed."""
    from diffusers import SD3Transformer2DModel

    torch.manual_seed(0)
    model = SD3Transformer2DModel(**config).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.1 * torch.randn_like(p))
    return model


def _inputs(config: dict, size):
    """Our inputs (NHWC) and diffusers' (NCHW, torch)."""
    rng = np.random.default_rng(0)
    ours = dict(
        x=rng.normal(size=(BATCH, *size, config["in_channels"])).astype(np.float32),
        timestep=np.asarray(TIMESTEPS, np.float32),
        context=rng.normal(size=(BATCH, TEXT_LEN, config["joint_attention_dim"])).astype(
            np.float32
        ),
        pooled=rng.normal(size=(BATCH, config["pooled_projection_dim"])).astype(np.float32),
    )
    ref = dict(
        hidden_states=torch.from_numpy(ours["x"].transpose(0, 3, 1, 2).copy()),
        timestep=torch.from_numpy(ours["timestep"]),
        encoder_hidden_states=torch.from_numpy(ours["context"]),
        pooled_projections=torch.from_numpy(ours["pooled"]),
    )
    return ours, ref


@nnx.jit
def _apply(model, inputs):
    return model(inputs["x"], inputs["timestep"], inputs["context"], inputs["pooled"])


def _run(model, inputs):
    return np.asarray(_apply(model, jax.tree.map(jnp.asarray, inputs)))


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    """model name -> (directory, diffusers' model), saved once per module."""
    cache = {}

    def get(name):
        if name not in cache:
            path = tmp_path_factory.mktemp(name)
            model = _reference(MODELS[name])
            model.save_pretrained(path, safe_serialization=True)
            cache[name] = (path, model)
        return cache[name]

    return get


@pytest.mark.parametrize("name", list(CASES))
def test_parity_float32(name, saved):
    case = CASES[name]
    path, reference = saved(case.model)
    ours, ref = _inputs(dict(reference.config), case.size)
    with torch.no_grad():
        expected = reference(**ref).sample.numpy().transpose(0, 2, 3, 1)
    model, config = sd3.load_sd3_transformer(path)
    assert config == sd3.SD3TransformerConfig.from_hf(
        json.loads((path / "config.json").read_text())
    )
    out = _run(model, ours)
    assert out.shape == expected.shape == (BATCH, *case.size, config.output_channels)
    err = np.abs(out - expected).max()
    print(f"{name}: max abs error {err:.2e} (output max {np.abs(expected).max():.2f})")
    assert err < TOL


def test_position_tables_match_diffusers(saved):
    from diffusers.models.embeddings import get_2d_sincos_pos_embed

    _, reference = saved("sd3")
    c = sd3.SD3TransformerConfig(**MODELS["sd3"])
    m = c.pos_embed_max_size
    buffer = reference.pos_embed.pos_embed.numpy()[0]  # a buffer: not perturbed
    np.testing.assert_allclose(
        sd3.sincos_pos_table(c.inner_dim, m, m, c.base_size), buffer, rtol=0, atol=1e-6
    )
    # A non-square grid (pos_embed_max_size None recomputes it per latent size).
    theirs = get_2d_sincos_pos_embed(32, (4, 6), base_size=4).float().numpy()
    np.testing.assert_allclose(sd3.sincos_pos_table(32, 4, 6, 4), theirs, rtol=0, atol=1e-6)


def test_sharded_checkpoint_loads_the_same(saved, tmp_path):
    path, reference = saved("sd35_medium")
    reference.save_pretrained(tmp_path, safe_serialization=True, max_shard_size="20KB")
    assert (tmp_path / f"{sd3.WEIGHTS_NAME}.index.json").exists()
    single, _ = sd3.load_sd3_transformer(path)
    sharded, _ = sd3.load_sd3_transformer(tmp_path)
    for a, b in zip(
        jax.tree.leaves(nnx.state(single)), jax.tree.leaves(nnx.state(sharded)), strict=True
    ):
        np.testing.assert_array_equal(a, b)


def _copy(src, dst):
    shutil.copytree(src, dst)
    return dst / sd3.WEIGHTS_NAME


def test_strict_load_names_every_bad_tensor(saved, tmp_path):
    path, _ = saved("sd35_medium")
    weights = _copy(path, tmp_path / "transformer")
    tensors = load_file(weights)
    del tensors["transformer_blocks.1.attn2.norm_k.weight"]
    tensors["transformer_blocks.2.ff_context.net.2.weight"] = np.zeros((16, 64), np.float32)
    tensors["context_embedder.bias"] = np.zeros(5, np.float32)
    save_file(tensors, weights)
    with pytest.raises(CheckpointError) as e:
        sd3.load_sd3_transformer(tmp_path / "transformer")
    message = str(e.value)
    assert "1 missing: transformer_blocks.1.attn2.norm_k.weight (expected shape (8,))" in message
    # The last block is context-pre-only: it has no text MLP.
    assert "1 unexpected: transformer_blocks.2.ff_context.net.2.weight" in message
    assert "1 mis-shaped: context_embedder.bias: checkpoint (5,), expected (16,)" in message


def test_missing_position_table(saved, tmp_path):
    path, _ = saved("sd3")
    weights = _copy(path, tmp_path / "transformer")
    tensors = load_file(weights)
    del tensors["pos_embed.pos_embed"]
    save_file(tensors, weights)
    with pytest.raises(CheckpointError, match=re.escape("missing: pos_embed.pos_embed")):
        sd3.load_sd3_transformer(tmp_path / "transformer")


def test_truncated_weights(saved, tmp_path):
    path, _ = saved("sd3")
    weights = _copy(path, tmp_path / "transformer")
    os.truncate(weights, os.path.getsize(weights) - 1000)
    with pytest.raises(CheckpointError, match="is truncated"):
        sd3.load_sd3_transformer(tmp_path / "transformer")


def test_not_a_transformer_directory(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"_class_name": "AutoencoderKL"}))
    with pytest.raises(CheckpointError, match="describes a 'AutoencoderKL', not a SD3Transformer"):
        sd3.load_sd3_transformer(tmp_path)
    (tmp_path / "empty").mkdir()
    with pytest.raises(CheckpointError, match="has no config.json"):
        sd3.load_sd3_transformer(tmp_path / "empty")


def test_unknown_config_key_in_checkpoint(saved, tmp_path):
    path, _ = saved("sd3")
    shutil.copytree(path, tmp_path / "transformer")
    config_file = tmp_path / "transformer" / "config.json"
    config = json.loads(config_file.read_text())
    config["use_pos_embed_interpolation"] = True
    config_file.write_text(json.dumps(config))
    with pytest.raises(CheckpointError, match="use_pos_embed_interpolation=True"):
        sd3.load_sd3_transformer(tmp_path / "transformer")


@pytest.mark.parametrize(
    "key, value, named",
    [
        ("qk_norm", "layer_norm", None),
        ("qk_norm", "rms_norm_across_heads", None),
        ("dual_attention_layers", (0, 3), "(0, 3)"),
        ("dual_attention_layers", (1, 1), "(1, 1)"),
        ("caption_projection_dim", 24, None),
        ("pos_embed_max_size", 0, None),
        ("num_layers", 0, None),
        ("unknown_option", 1, None),
    ],
)
def test_unimplemented_config_values_are_refused(key, value, named):
    config = dict(MODELS["sd3"], _class_name="SD3Transformer2DModel", **{key: value})
    named = repr(value) if named is None else named
    with pytest.raises(ValueError, match=re.escape(f"{key}={named}")):
        sd3.SD3TransformerConfig.from_hf(config)


def test_latent_sizes_the_model_refuses():
    model = sd3.abstract_sd3_transformer(sd3.SD3TransformerConfig(**MODELS["sd3"]))
    assert isinstance(model, sd3.SD3Transformer)
    t, ctx, pooled = jnp.ones(1), jnp.zeros((1, TEXT_LEN, 24)), jnp.zeros((1, 20))
    with pytest.raises(ValueError, match="not a multiple of patch_size=2"):
        jax.eval_shape(lambda m: m(jnp.zeros((1, 9, 8, 4)), t, ctx, pooled), model)
    with pytest.raises(ValueError, match="exceeds pos_embed_max_size=16"):
        jax.eval_shape(lambda m: m(jnp.zeros((1, 34, 8, 4)), t, ctx, pooled), model)
    out = jax.eval_shape(lambda m: m(jnp.zeros((1, 32, 8, 4)), t, ctx, pooled), model)
    assert out.shape == (1, 32, 8, 4)


def test_key_map_names_diffusers_tensors():
    config = sd3.SD3TransformerConfig(**MODELS["sd35_medium"])
    key_map = sd3.hf_key_map(config)
    q = key_map[("transformer_blocks", 0, "attn", "add_q_proj", "kernel")]
    assert q.names == ("transformer_blocks.0.attn.add_q_proj.weight",)
    assert q.transpose  # nn.Linear [out, in] -> [in, out]
    conv = key_map[("pos_embed", "proj", "kernel")]
    assert conv.names == ("pos_embed.proj.weight",)
    assert conv.permute == (2, 3, 1, 0)  # [out, in, kh, kw] -> [kh, kw, in, out]
    table = key_map[("pos_embed", "pos_embed")]
    assert table.names == ("pos_embed.pos_embed",) and not table.transpose
    assert key_map[("transformer_blocks", 1, "attn2", "norm_q", "scale")].names == (
        "transformer_blocks.1.attn2.norm_q.weight",
    )
    names = {src.names[0] for src in key_map.values()}
    assert "transformer_blocks.2.attn.to_add_out.weight" not in names  # context pre only
    assert "transformer_blocks.2.attn2.to_q.weight" not in names


def test_bfloat16_close_to_float32(saved):
    path, reference = saved("sd35_medium")
    ours, ref = _inputs(dict(reference.config), (12, 12))
    with torch.no_grad():
        expected = reference(**ref).sample.numpy().transpose(0, 2, 3, 1)
    model, _ = sd3.load_sd3_transformer(path, jnp.bfloat16)
    assert all(x.dtype == jnp.bfloat16 for x in jax.tree.leaves(nnx.state(model)))
    out = _apply(model, jax.tree.map(jnp.asarray, ours))
    assert out.dtype == jnp.bfloat16
    out = np.asarray(out, np.float32)
    assert np.isfinite(out).all()
    # bfloat16 keeps ~3 significant digits; errors grow through the blocks.
    err = np.abs(out - expected).max()
    print(f"bfloat16: max abs error {err:.2e} (output max {np.abs(expected).max():.2f})")
    assert err < 0.05 * np.abs(expected).max()
