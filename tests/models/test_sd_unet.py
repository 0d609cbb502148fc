"""Parity of SDUNet with diffusers' UNet2DConditionModel on tiny random configs.

One tiny config per public family (SD 1.x, SD 2.x, SDXL base and refiner, the SD x4 upscaler,
DeepFloyd IF stages I and II) keeps the block types and switches of the public config.json
and shrinks the widths; two more turn on the remaining implemented options. Each reference
is built under a fixed torch seed, its parameters perturbed (so that norms and biases are not
at their identity initialization), saved with `save_pretrained` as safetensors, and loaded
through `load_unet`. On the same inputs (NCHW for diffusers, NHWC for us) the float32 outputs
must agree within TOL (max absolute error); the outputs are O(1).
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

from imagen_jax.models import sd_unet
from imagen_jax.weights import CheckpointError

TOL = 1e-4  # float32 parity, max absolute error
BATCH, TEXT_LEN = 2, 7
TEXT_MASK = np.array([[1] * TEXT_LEN, [1] * 4 + [0] * (TEXT_LEN - 4)], np.float32)


@dataclasses.dataclass(frozen=True)
class Case:
    """A tiny config and the inputs its family's pipeline passes."""

    config: dict
    size: tuple[int, int]  # H, W of the sample
    timesteps: object = (10, 980)  # per example, or a scalar
    mask: bool = False  # pass an encoder attention mask (a padded second prompt)
    text_embeds: int = 0  # SDXL: pooled text width (time_ids follow)
    time_ids: int = 0
    class_labels: str | None = None  # int (noise level) | float (augmentation timestep) | vector


_SMALL = dict(norm_num_groups=8, layers_per_block=1, block_out_channels=(32, 64))

CASES = {
    # runwayml/stable-diffusion-v1-5 unet: conv proj_in/out, 8 heads, 2 layers per block.
    "sd1": Case(
        dict(
            act_fn="silu",
            attention_head_dim=8,
            block_out_channels=(32, 64),
            center_input_sample=False,
            cross_attention_dim=32,
            down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
            downsample_padding=1,
            flip_sin_to_cos=True,
            freq_shift=0,
            in_channels=4,
            layers_per_block=2,
            mid_block_scale_factor=1,
            norm_eps=1e-5,
            norm_num_groups=8,
            out_channels=4,
            sample_size=16,
            up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        ),
        size=(16, 16),
    ),
    # stabilityai/stable-diffusion-2-1 unet: linear projections, head counts per block,
    # upcast attention; a height that does not halve evenly (the upsampler is given the
    # skip's size), a scalar fractional timestep and a padded prompt.
    "sd2": Case(
        dict(
            act_fn="silu",
            attention_head_dim=(2, 4),
            block_out_channels=(32, 64),
            center_input_sample=False,
            class_embed_type=None,
            cross_attention_dim=24,
            down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
            downsample_padding=1,
            dual_cross_attention=False,
            flip_sin_to_cos=True,
            freq_shift=0,
            in_channels=4,
            layers_per_block=1,
            mid_block_scale_factor=1,
            norm_eps=1e-5,
            norm_num_groups=8,
            num_class_embeds=None,
            only_cross_attention=False,
            out_channels=4,
            resnet_time_scale_shift="default",
            sample_size=12,
            up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
            upcast_attention=True,
            use_linear_projection=True,
        ),
        size=(11, 10),
        timesteps=321.5,
        mask=True,
    ),
    # stabilityai/stable-diffusion-xl-base-1.0 unet: transformer depth per block, size and
    # crop micro-conditioning (6 time ids) with the pooled text embedding.
    "sdxl": Case(
        dict(
            _SMALL,
            addition_embed_type="text_time",
            addition_embed_type_num_heads=64,
            addition_time_embed_dim=8,
            attention_head_dim=(2, 4),
            cross_attention_dim=48,
            down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
            mid_block_type="UNetMidBlock2DCrossAttn",
            projection_class_embeddings_input_dim=16 + 6 * 8,
            transformer_layers_per_block=(1, 2),
            up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
            upcast_attention=None,
            use_linear_projection=True,
        ),
        size=(16, 16),
        text_embeds=16,
        time_ids=6,
    ),
    # stabilityai/stable-diffusion-xl-refiner-1.0 unet: aesthetic-score conditioning (5 time
    # ids), one transformer depth for all blocks, other widths.
    "sdxl_refiner": Case(
        dict(
            _SMALL,
            addition_embed_type="text_time",
            addition_time_embed_dim=8,
            attention_head_dim=(2, 4),
            cross_attention_dim=40,
            down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
            projection_class_embeddings_input_dim=24 + 5 * 8,
            transformer_layers_per_block=2,
            up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
            use_linear_projection=True,
        ),
        size=(16, 16),
        text_embeds=24,
        time_ids=5,
    ),
    # stabilityai/stable-diffusion-x4-upscaler unet: latents + low-res image in, the noise
    # level through a learned class table, only_cross_attention per block (the public
    # (True, True, True, False) puts both kinds of transformer block on the up path; with
    # two levels here, both down blocks carry attention to do the same).
    "x4_upscaler": Case(
        dict(
            act_fn="silu",
            attention_head_dim=8,
            block_out_channels=(32, 64),
            class_embed_type=None,
            cross_attention_dim=24,
            down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
            in_channels=7,
            layers_per_block=1,
            mid_block_type="UNetMidBlock2DCrossAttn",
            norm_num_groups=8,
            num_class_embeds=1000,
            only_cross_attention=(True, False),
            out_channels=4,
            resnet_time_scale_shift="default",
            up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
            upcast_attention=False,
            use_linear_projection=True,
        ),
        size=(16, 16),
        mask=True,
        class_labels="int",
    ),
    # DeepFloyd/IF-I: T5 states projected to the model width, attention-pooled text added to
    # the time embedding, resnet up/down-sampling, added-KV attention with group-normed text,
    # scale-shift time conditioning, GELU; 6 output channels (eps and the variance range).
    "if_stage1": Case(
        dict(
            _SMALL,
            act_fn="gelu",
            addition_embed_type="text",
            addition_embed_type_num_heads=2,
            attention_head_dim=8,
            cross_attention_dim=32,
            cross_attention_norm="group_norm",
            down_block_types=("ResnetDownsampleBlock2D", "SimpleCrossAttnDownBlock2D"),
            encoder_hid_dim=24,
            encoder_hid_dim_type="text_proj",
            in_channels=3,
            mid_block_type="UNetMidBlock2DSimpleCrossAttn",
            out_channels=6,
            resnet_time_scale_shift="scale_shift",
            up_block_types=("SimpleCrossAttnUpBlock2D", "ResnetUpsampleBlock2D"),
        ),
        size=(16, 16),
        mask=True,
    ),
    # DeepFloyd/IF-II: the noisy low-res image as 3 more input channels, its augmentation
    # level through a second TimestepEmbedding, GELU on the summed embedding, unactivated
    # time projections, 1/sqrt(1/2) output scaling, cross-attention only, layers per block.
    "if_stage2": Case(
        dict(
            norm_num_groups=8,
            act_fn="gelu",
            addition_embed_type="text",
            addition_embed_type_num_heads=2,
            attention_head_dim=8,
            block_out_channels=(32, 64),
            class_embed_type="timestep",
            class_embeddings_concat=False,
            cross_attention_dim=32,
            cross_attention_norm="group_norm",
            down_block_types=("ResnetDownsampleBlock2D", "SimpleCrossAttnDownBlock2D"),
            encoder_hid_dim=24,
            encoder_hid_dim_type="text_proj",
            in_channels=6,
            layers_per_block=(1, 2),
            mid_block_only_cross_attention=None,
            mid_block_scale_factor=1 / 0.7071,
            mid_block_type="UNetMidBlock2DSimpleCrossAttn",
            only_cross_attention=True,
            out_channels=6,
            resnet_out_scale_factor=1 / 0.7071,
            resnet_skip_time_act=True,
            resnet_time_scale_shift="scale_shift",
            time_embedding_act_fn="gelu",
            time_embedding_dim=48,
            up_block_types=("SimpleCrossAttnUpBlock2D", "ResnetUpsampleBlock2D"),
        ),
        size=(16, 16),
        class_labels="float",
    ),
    # The remaining implemented switches, in two configs of no public model.
    "options": Case(
        dict(
            _SMALL,
            act_fn="mish",
            attention_head_dim=8,
            center_input_sample=True,
            class_embed_type="timestep",
            class_embeddings_concat=True,
            conv_in_kernel=1,
            conv_out_kernel=5,
            cross_attention_dim=32,
            cross_attention_norm="layer_norm",
            down_block_types=("UNetResSimpleCrossAttnDownBlock2D", "DownBlock2D"),
            downsample_padding=0,
            flip_sin_to_cos=False,
            freq_shift=1,
            mid_block_type="UNetMidBlock2D",
            timestep_post_act="silu",
            up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        ),
        size=(16, 16),
        mask=True,
        class_labels="float",
    ),
    "options_transformer": Case(
        dict(
            _SMALL,
            attention_head_dim=(2, 4),
            class_embed_type="projection",
            cross_attention_dim=(32, 32),
            down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
            mid_block_type=None,
            projection_class_embeddings_input_dim=12,
            resnet_time_scale_shift="scale_shift",
            reverse_transformer_layers_per_block=((1, 2), (2, 1)),
            time_embedding_dim=40,
            transformer_layers_per_block=((2,), (1,)),
            up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
        ),
        size=(8, 8),
        mask=True,
        class_labels="vector",
    ),
}


def _inputs(case: Case, config: dict):
    """The same inputs in our layout and in diffusers' (NCHW, torch)."""
    rng = np.random.default_rng(0)
    h, w = case.size
    text_dim = config.get("encoder_hid_dim") or np.max(config["cross_attention_dim"])
    ours = dict(
        sample=rng.normal(size=(BATCH, h, w, config["in_channels"])).astype(np.float32),
        timesteps=np.asarray(case.timesteps)
        if isinstance(case.timesteps, tuple)
        else case.timesteps,
        encoder_hidden_states=rng.normal(size=(BATCH, TEXT_LEN, text_dim)).astype(np.float32),
        added_cond=None,
        class_labels=None,
        encoder_attention_mask=TEXT_MASK if case.mask else None,
    )
    if case.time_ids:
        ours["added_cond"] = dict(
            text_embeds=rng.normal(size=(BATCH, case.text_embeds)).astype(np.float32),
            time_ids=np.tile(np.array([64, 48, 0, 8, 64, 48][: case.time_ids], np.float32), (2, 1)),
        )
        if case.time_ids == 5:  # the refiner's aesthetic score in place of the crop size
            ours["added_cond"]["time_ids"][:, 4] = [6.0, 2.5]
    if case.class_labels == "int":
        ours["class_labels"] = np.array([20, 350])
    elif case.class_labels == "float":
        ours["class_labels"] = np.array([100.0, 250.0], np.float32)
    elif case.class_labels == "vector":
        width = config["projection_class_embeddings_input_dim"]
        ours["class_labels"] = rng.normal(size=(BATCH, width)).astype(np.float32)

    def t(x):
        return None if x is None else torch.from_numpy(np.asarray(x))

    ref = dict(
        sample=t(ours["sample"].transpose(0, 3, 1, 2)),
        timestep=ours["timesteps"] if np.isscalar(ours["timesteps"]) else t(ours["timesteps"]),
        encoder_hidden_states=t(ours["encoder_hidden_states"]),
        class_labels=t(ours["class_labels"]),
        encoder_attention_mask=t(ours["encoder_attention_mask"]),
        added_cond_kwargs=None
        if ours["added_cond"] is None
        else {k: t(v) for k, v in ours["added_cond"].items()},
    )
    return ours, ref


def _reference(config: dict):
    """diffusers' model under a fixed seed, every parameter perturbed."""
    from diffusers import UNet2DConditionModel

    torch.manual_seed(0)
    model = UNet2DConditionModel(**config).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.1 * torch.randn_like(p))
    return model


@nnx.jit
def _apply(model, inputs):
    inputs = dict(inputs)
    return model(
        inputs.pop("sample"), inputs.pop("timesteps"), inputs.pop("encoder_hidden_states"), **inputs
    )


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    """name -> (directory, our inputs, diffusers' output in NHWC), built once per module."""
    cache = {}

    def get(name):
        if name not in cache:
            case = CASES[name]
            path = tmp_path_factory.mktemp(name)
            model = _reference(case.config)
            model.save_pretrained(path, safe_serialization=True)
            ours, ref = _inputs(case, dict(model.config))
            with torch.no_grad():
                out = model(**ref).sample.numpy().transpose(0, 2, 3, 1)
            cache[name] = (path, ours, out)
        return cache[name]

    return get


def _run(model, inputs):
    return np.asarray(_apply(model, jax.tree.map(jnp.asarray, inputs)))


@pytest.mark.parametrize("name", list(CASES))
def test_parity_float32(name, saved):
    path, inputs, expected = saved(name)
    model, config = sd_unet.load_unet(path)
    assert config == sd_unet.SDUNetConfig.from_hf(json.loads((path / "config.json").read_text()))
    out = _run(model, inputs)
    assert out.shape == expected.shape
    err = np.abs(out - expected).max()
    print(f"{name}: max abs error {err:.2e} (output max {np.abs(expected).max():.2f})")
    assert err < TOL


def test_bfloat16_close_to_float32(saved):
    path, inputs, expected = saved("sdxl")
    model, _ = sd_unet.load_unet(path, jnp.bfloat16)
    assert all(x.dtype == jnp.bfloat16 for x in jax.tree.leaves(nnx.state(model)))
    out = _apply(model, jax.tree.map(jnp.asarray, inputs))
    assert out.dtype == jnp.bfloat16
    out = np.asarray(out, np.float32)
    assert np.isfinite(out).all()
    # bfloat16 keeps ~3 significant digits; errors grow through the blocks.
    err = np.abs(out - expected).max()
    print(f"bfloat16: max abs error {err:.2e} (output max {np.abs(expected).max():.2f})")
    assert err < 0.05 * np.abs(expected).max()


def test_sharded_checkpoint_loads_the_same(saved, tmp_path):
    path, _, _ = saved("sd1")
    _reference(CASES["sd1"].config).save_pretrained(
        tmp_path, safe_serialization=True, max_shard_size="100KB"
    )
    assert (tmp_path / f"{sd_unet.WEIGHTS_NAME}.index.json").exists()
    single, _ = sd_unet.load_unet(path)
    sharded, _ = sd_unet.load_unet(tmp_path)
    for a, b in zip(
        jax.tree.leaves(nnx.state(single)), jax.tree.leaves(nnx.state(sharded)), strict=True
    ):
        np.testing.assert_array_equal(a, b)


def _copy(src, dst):
    shutil.copytree(src, dst)
    return dst / sd_unet.WEIGHTS_NAME


def test_strict_load_names_every_bad_tensor(saved, tmp_path):
    path, _, _ = saved("sd1")
    weights = _copy(path, tmp_path / "unet")
    tensors = load_file(weights)
    del tensors["mid_block.attentions.0.proj_in.weight"]
    tensors["extra.weight"] = np.zeros(3, np.float32)
    tensors["conv_in.bias"] = np.zeros(5, np.float32)
    save_file(tensors, weights)
    with pytest.raises(CheckpointError) as e:
        sd_unet.load_unet(tmp_path / "unet")
    message = str(e.value)
    assert "1 missing: mid_block.attentions.0.proj_in.weight (expected shape (64, 64, 1, 1))" in (
        message
    )
    assert "1 unexpected: extra.weight" in message
    assert "1 mis-shaped: conv_in.bias: checkpoint (5,), expected (32,)" in message


def test_truncated_weights(saved, tmp_path):
    path, _, _ = saved("sd1")
    weights = _copy(path, tmp_path / "unet")
    os.truncate(weights, os.path.getsize(weights) - 1000)
    with pytest.raises(CheckpointError, match="is truncated"):
        sd_unet.load_unet(tmp_path / "unet")


def test_not_a_unet_directory(tmp_path):
    from diffusers import AutoencoderKL

    AutoencoderKL(block_out_channels=(8,), norm_num_groups=8, latent_channels=2).save_pretrained(
        tmp_path, safe_serialization=True
    )
    with pytest.raises(CheckpointError, match="describes a 'AutoencoderKL', not a UNet2DCondition"):
        sd_unet.load_unet(tmp_path)
    (tmp_path / "empty").mkdir()
    with pytest.raises(CheckpointError, match="has no config.json"):
        sd_unet.load_unet(tmp_path / "empty")


@pytest.mark.parametrize(
    "key, value, named",
    [
        ("time_embedding_type", "fourier", None),
        ("down_block_types", ("AttnDownBlock2D", "DownBlock2D"), "'AttnDownBlock2D'"),
        ("mid_block_type", "UNetMidBlock2DCrossAttnX", None),
        ("resnet_time_scale_shift", "spatial", None),
        ("addition_embed_type", "image", None),
        ("class_embed_type", "labels", None),
        ("encoder_hid_dim_type", "image_proj", None),
        ("attention_type", "gated", None),
        ("dual_cross_attention", True, None),
        ("time_cond_proj_dim", 32, None),
        ("act_fn", "tanh", None),
        ("unknown_option", 1, None),
    ],
)
def test_unimplemented_config_values_are_refused(key, value, named):
    config = dict(CASES["sd1"].config, _class_name="UNet2DConditionModel", **{key: value})
    named = repr(value) if named is None else named
    with pytest.raises(ValueError, match=re.escape(f"{key}={named}")):
        sd_unet.SDUNetConfig.from_hf(config)


def test_inputs_the_config_needs():
    model = sd_unet.abstract_unet(sd_unet.SDUNetConfig(**CASES["sdxl"].config))
    assert isinstance(model, sd_unet.SDUNet)
    x, ctx = jnp.zeros((1, 16, 16, 4)), jnp.zeros((1, TEXT_LEN, 48))
    with pytest.raises(ValueError, match="needs added_cond with 'text_embeds' and 'time_ids'"):
        jax.eval_shape(lambda m: m(x, 1, ctx), model)


def test_key_map_names_diffusers_tensors():
    key_map = sd_unet.hf_key_map(sd_unet.SDUNetConfig(**CASES["sd1"].config))
    ff = ("down_blocks", 0, "attentions", 0, "transformer_blocks", 0, "ff", "net", 0, "proj")
    assert key_map[(*ff, "kernel")].names == (
        "down_blocks.0.attentions.0.transformer_blocks.0.ff.net.0.proj.weight",
    )
    assert key_map[(*ff, "kernel")].transpose  # nn.Linear [out, in] -> [in, out]
    conv = key_map[("up_blocks", 1, "resnets", 2, "conv_shortcut", "kernel")]
    assert conv.names == ("up_blocks.1.resnets.2.conv_shortcut.weight",)
    assert conv.permute == (2, 3, 1, 0)  # [out, in, kh, kw] -> [kh, kw, in, out]
    assert key_map[("conv_norm_out", "scale")].names == ("conv_norm_out.weight",)
