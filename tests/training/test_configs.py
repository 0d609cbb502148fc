"""Stage configs: every group present, strict arguments and keys (a mistyped command-line
key is one line naming the closest key), values that cannot work rejected by name, and the
checks that stop a run whose stage and data disagree before anything is compiled."""

import math
import pathlib
import subprocess
import sys

import ml_collections
import pytest
from conftest import ROOT, STAGES, stage_config, tiny

from imagen_jax import text as text_lib
from imagen_jax import training
from imagen_jax.config_utils import ConfigError
from imagen_jax.data.buckets import parse_buckets

GROUPS = {"model", "diffusion", "text", "data", "optim", "train", "sample", "evals", "mesh"}


@pytest.mark.parametrize("stage", STAGES)
@pytest.mark.parametrize("arg", ["", "runlocal"])
def test_configs_build(stage, arg):
    config = stage_config(stage, arg)
    assert set(config.keys()) == GROUPS
    unet = training.unet_config(config.model)
    assert unet.low_res == bool(config.model.low_resolution)
    assert unet.text_dim == (
        config.text.dim if arg else {"minilm": 384, "t5": 4096}[config.text.kind]
    )
    assert config.model.resolution == config.data.resolution
    assert config.model.low_resolution == config.data.low_resolution
    if arg == "runlocal":
        assert config.model.variant == "runlocal" and config.text.kind == "hash"
        assert config.data.source == "synthetic"


def test_full_size_configs_name_their_parts():
    assert stage_config("shapes_base", "").text.kind == "minilm"
    assert stage_config("shapes_base", "").model.resolution == 32
    sr = stage_config("shapes_sr", "")
    assert (sr.model.low_resolution, sr.model.resolution) == (32, 64)
    base = stage_config("imagen_base64", "data=/d/*.tar,t5=/m/t5,fsdp=4")
    assert base.data.path == "/d/*.tar" and base.text.path == "/m/t5"
    assert base.mesh == [("data", -1), ("fsdp", 4)]
    assert training.unet_config(base.model).text_dim == 4096
    assert stage_config("imagen_sr1024", "").model.low_resolution == 256


@pytest.mark.parametrize("stage", STAGES)
def test_unknown_config_arg_raises(stage):
    with pytest.raises(ValueError, match="Unknown config arg 'bogus'"):
        stage_config(stage, "runlocal,bogus=1")


def test_locked_config_rejects_unknown_keys():
    config = stage_config("shapes_base")
    config.lock()
    with pytest.raises(AttributeError, match="bogus"):
        config.train.bogus = 1
    with pytest.raises(KeyError, match="unknown train config keys"):
        training.train_config(bogus=1)
    with pytest.raises(KeyError, match="unknown model config keys"):
        training.model_config(bogus=1)
    model = training.model_config()
    model.bogus = 1  # added to an unlocked group
    with pytest.raises(ValueError, match="unknown UNet config keys"):
        training.unet_config(model)


def _train_py(workdir, *overrides):
    return subprocess.run(
        [
            sys.executable,
            str(ROOT / "train.py"),
            "--config=configs/shapes_base.py:runlocal",
            f"--workdir={workdir}",
            *overrides,
        ],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
    )


@pytest.mark.parametrize(
    "override, message",
    [
        ("--config.train.stepss=4", "unknown config key train.stepss; did you mean train.steps?"),
        (
            "--config.trian.loss.weighting=edm",
            "unknown config key trian.loss.weighting; did you mean train.loss.weighting?",
        ),
        (
            "--config.train.batchh=4",  # nothing close: the group's keys
            "unknown config key train.batchh; train has keys: allow_changes, aux_losses,",
        ),
    ],
)
def test_train_py_rejects_unknown_flag_key_in_one_line(override, message, tmp_path):
    result = _train_py(tmp_path, override)
    assert result.returncode == 1
    assert "Traceback" not in result.stderr
    errors = [line for line in result.stderr.splitlines() if "unknown config key" in line]
    assert len(errors) == 1 and message in errors[0], result.stderr
    assert not pathlib.Path(tmp_path, "checkpoints").exists()


@pytest.mark.parametrize(
    "override, message",
    [
        ("--config.train.steps=-5", "invalid config value train.steps=-5: must be >= 1"),
        ("--config.optim.lr=nan", "invalid config value optim.lr=nan: must be finite"),
    ],
)
def test_train_py_rejects_invalid_values_in_one_line(override, message, tmp_path):
    result = _train_py(tmp_path, override)
    assert result.returncode == 1
    assert "Traceback" not in result.stderr
    errors = [line for line in result.stderr.splitlines() if "invalid config value" in line]
    assert errors == [f"FATAL config error: {message}"], result.stderr
    assert not pathlib.Path(tmp_path, "checkpoints").exists()


@pytest.mark.parametrize(
    "group, key, value, message",
    [
        ("train", "steps", 0, "train.steps=0: must be >= 1"),
        ("train", "log_every", 0, "train.log_every=0: must be >= 1"),
        ("train", "cond_drop_prob", 1.5, "train.cond_drop_prob=1.5: must be <= 1"),
        ("data", "batch_size", 0, "data.batch_size=0: must be >= 1"),
        ("optim", "lr", 0.0, "optim.lr=0.0: must be > 0"),
        ("optim", "lr", -1e-4, "optim.lr=-0.0001: must be > 0"),
        ("optim", "lr", float("inf"), "optim.lr=inf: must be finite"),
        ("optim", "b2", 1.0, "optim.b2=1.0: must be < 1"),
        ("optim", "warmup_steps", -1, "optim.warmup_steps=-1: must be >= 0"),
        ("optim", "accum_steps", 0, "optim.accum_steps=0: must be >= 1"),
    ],
)
def test_values_that_cannot_work_stop_the_run_by_name(group, key, value, message, tmp_path):
    config = tiny()
    config[group][key] = value
    with pytest.raises(ConfigError, match=f"^invalid config value {message}$"):
        training.check_config(config)
    with pytest.raises(ConfigError, match="invalid config value"):
        training.train_and_evaluate(config, str(tmp_path))  # before anything is built
    assert not (tmp_path / "checkpoints").exists()


@pytest.mark.parametrize(
    "stage",
    [
        *STAGES,
        "shapes_vae",
        "shapes_latent",
        "shapes_mmdit",
        "shapes_captioner",
        "shapes_embedding",
    ],
)
@pytest.mark.parametrize("arg", ["", "runlocal"])
def test_every_stage_config_passes_the_value_checks(stage, arg):
    training.check_config(stage_config(stage, arg))


@pytest.mark.parametrize(
    "change, match",
    [
        (dict(data=dict(resolution=32)), "generates 16 px images .* data is 32 px"),
        (dict(data=dict(low_resolution=8)), "takes no px low-resolution inputs"),
        (dict(model=dict(resolution=17), data=dict(resolution=17)), "not divisible by 2"),
        (dict(data=dict(batch_size=12)), "must divide evenly"),
        (dict(text=dict(dim=24)), "24-dim embeddings but the model expects"),
        (dict(model=dict(low_resolution=8), data=dict(low_resolution=8)), "is a base UNet"),
    ],
)
def test_stage_and_data_must_agree(change, match, tmp_path):
    config = tiny()
    for group, values in change.items():
        for key, value in values.items():
            config[group][key] = value
    with pytest.raises(ValueError, match=match):
        training.train_and_evaluate(config, str(tmp_path))
    assert not (tmp_path / "checkpoints").exists() or not any((tmp_path / "checkpoints").iterdir())


def test_sr_stage_needs_low_resolution_data(tmp_path):
    config = tiny("shapes_sr")
    config.model.low_resolution = 0
    config.data.low_resolution = 0
    with pytest.raises(ValueError, match="is a super-resolution UNet"):
        training.train_and_evaluate(config, str(tmp_path))


def test_hash_text_encoder_is_deterministic_with_a_real_mask():
    encoder = text_lib.HashTextEncoder(dim=16, max_length=6)
    emb, mask, pooled = encoder.encode(["a red circle", "", "a red circle on the left side"])
    assert emb.shape == (3, 6, 16) and mask.shape == (3, 6) and pooled.shape == (3, 16)
    assert mask.sum(1).tolist() == [3, 0, 6]  # truncated to max_length
    assert not emb[1].any()
    again, _, _ = text_lib.HashTextEncoder(dim=16, max_length=6).encode(["a red circle"])
    assert (again[0] == emb[0]).all()
    swapped, _, _ = encoder.encode(["circle red a"])
    assert not (swapped[0] == emb[0]).all()  # word order matters (position code)


def test_text_groups_build_their_encoders():
    assert isinstance(text_lib.make_text_encoder(text_lib.text_config()), text_lib.HashTextEncoder)
    with pytest.raises(ValueError, match="text.path is empty"):
        text_lib.make_text_encoder(text_lib.text_config(kind="t5", path=""))
    with pytest.raises(ValueError, match="text.kind must be one of"):
        text_lib.make_text_encoder(text_lib.text_config(kind="t3"))


def test_evals_group_is_a_config_dict():
    assert isinstance(stage_config().evals, ml_collections.ConfigDict)


def test_the_shapes_mmdit_trains_on_five_canvases_of_the_pixel_budget():
    from configs import shapes_mmdit

    config = shapes_mmdit.get_config()
    shapes = parse_buckets(config.data.buckets)
    assert shapes == ((64, 64), (56, 72), (72, 56), (48, 88), (88, 48))
    for h, w in shapes:  # whole 2x2 patches of the factor-4 VAE's latents, at most 2:1
        assert h % 8 == 0 and w % 8 == 0 and max(h, w) <= 2 * min(h, w)
        assert abs(h * w - 64 * 64) <= 0.05 * 64 * 64
    assert config.data.wordings == "train"
    assert shapes_mmdit.get_config("buckets=").data.buckets == ""
    assert shapes_mmdit.get_config("runlocal").data.buckets == ""


def test_the_shapes_mmdit_patch_arg_sets_its_tokens():
    """`configs/shapes_mmdit.py:patch=P` embeds the 16x16 latents in PxP patches: the patch
    embedding's kernel is PxP, and the number of parameters is otherwise the same."""
    import jax

    kernels, counts = {}, {}
    for patch in (1, 2):
        model = stage_config("shapes_mmdit", f"vae=V,patch={patch}").model
        assert model.patch_size == patch
        params = training.make_network(model).abstract_params
        flat = {
            jax.tree_util.keystr(p): x.shape
            for p, x in jax.tree_util.tree_flatten_with_path(params)[0]
        }
        (key,) = [k for k in flat if "pos_embed" in k and "proj" in k and "kernel" in k]
        kernels[patch] = flat[key]
        counts[patch] = sum(math.prod(shape) for shape in flat.values())
    assert kernels[1][:2] == (1, 1) and kernels[2][:2] == (2, 2)
    # The patch embedding and the final projection shrink by 4x; nothing else changes.
    assert 0 < counts[2] - counts[1] < 0.01 * counts[2]


def test_the_shipped_arg_is_the_network_of_the_shipped_shapes_base():
    """`configs/shapes_base.py:shipped` builds the network whose parameters the shipped
    stage holds, every name and shape (so `train.init_from=checkpoints/shapes/base` with it
    passes the strict check); settings given beside it win."""
    import dataclasses
    import json

    from safetensors import safe_open

    from imagen_jax import stages
    from imagen_jax.training import state as state_lib

    stage = ROOT / "checkpoints" / "shapes" / "base"
    model = stage_config("shapes_base", "shipped").model
    stored = json.loads((stage / "stage.json").read_text())["unet"]
    unet = dataclasses.asdict(training.unet_config(model))
    assert {k: list(v) if isinstance(v, tuple) else v for k, v in unet.items()} == stored
    with safe_open(str(stage / "params.safetensors"), "np") as f:
        names = f.keys()  # a safe_open handle is not iterable
        shapes = {key: f.get_slice(key).get_shape() for key in names}
    expected = stages.flatten(state_lib.make_network(model).abstract_params)
    assert {k: list(v.shape) for k, v in expected.items()} == shapes
    plain = stage_config("shapes_base", "shipped,text_refiner=0").model
    assert (plain.text_refiner, plain.layout_grid) == (0, 4)
    assert stage_config("shapes_base", "").model.text_refiner == 0


def test_the_width_arg_scales_the_shapes_base_to_the_mmdits_size():
    """`configs/shapes_base.py:width=22` is the plain UNet of the equal-parameter comparison
    with the shapes MMDiT: within 5% of the MMDiT's parameters, every level with the
    variant's heads and channels a group."""
    default = training.unet_config(stage_config("shapes_base", "").model)
    unet = training.unet_config(stage_config("shapes_base", "width=22").model)
    assert (unet.channels, unet.head_dim, unet.groups) == (22, 22, 22)
    for mult in unet.channel_mult:  # heads and channels a group, level by level
        assert mult * unet.channels // unet.head_dim == mult * default.channels // default.head_dim
        assert mult * unet.channels // unet.groups == mult * default.channels // default.groups
    pixel = param_count(stage_config("shapes_base", "width=22").model)
    mmdit = param_count(stage_config("shapes_mmdit", "").model)
    assert abs(pixel / mmdit - 1) < 0.05, (pixel, mmdit)


def test_the_latent_unet_of_the_mmdits_size_trains_with_its_objective():
    """`configs/shapes_latent.py:width=32,layers=1,objective=flow` is the third arm of the
    equal-parameter comparison: a latent UNet within 5% of the MMDiT's parameters, with the
    variant's channels a group and head width at every level, trained and sampled with the
    MMDiT's objective on the same VAE and wordings."""
    arg = "vae=V,width=32,layers=1,objective=flow,wordings=train"
    latent, mmdit = stage_config("shapes_latent", arg), stage_config("shapes_mmdit", "vae=V")
    default = stage_config("shapes_latent", "").model
    unet = training.make_network(latent.model).cfg.unet
    assert unet.block_out_channels == (32, 64, 128) and unet.layers_per_block == 1
    base = training.make_network(default).cfg.unet
    for ch, base_ch in zip(unet.block_out_channels, base.block_out_channels, strict=True):
        assert ch // unet.norm_num_groups == base_ch // base.norm_num_groups
        assert ch // unet.attention_head_dim == base_ch // base.attention_head_dim
    assert abs(param_count(latent.model) / param_count(mmdit.model) - 1) < 0.05
    for group in ("diffusion", "sample"):
        assert latent[group].to_dict() == mmdit[group].to_dict(), group
    assert latent.train.loss.to_dict() == mmdit.train.loss.to_dict()
    assert latent.latent.vae == mmdit.latent.vae == "V"
    assert latent.data.wordings == mmdit.data.wordings == "train"
    assert stage_config("shapes_latent", "").diffusion.prediction == "eps"
    v, pixel = stage_config("shapes_latent", "objective=v"), stage_config("shapes_base", "")
    assert v.sample.to_dict() == pixel.sample.to_dict()
    assert v.train.loss.to_dict() == pixel.train.loss.to_dict()
    for key in ("schedule", "prediction", "model_space", "logsnr_min", "logsnr_max"):
        assert v.diffusion[key] == pixel.diffusion[key], key
    with pytest.raises(ValueError, match="objective"):
        stage_config("shapes_latent", "objective=x0")
    with pytest.raises(ValueError, match="width must be a multiple of 8"):
        stage_config("shapes_latent", "width=20")


@pytest.mark.parametrize("res, factor, latent", [(64, 4, 16), (64, 8, 8), (32, 2, 16)])
def test_the_shapes_vae_factor_sets_its_latents_size(res, factor, latent):
    """`configs/shapes_vae.py:res=R,factor=F` encodes R px scenes to (R/F)^2 x 4 latents, at
    both widths (`res=32,factor=2`: the 16x16 latents of the pixel base's 32 px scenes)."""
    import jax
    import jax.numpy as jnp

    for width in ("base", "small"):
        config = stage_config("shapes_vae", f"res={res},factor={factor},width={width}")
        net = training.make_network(config.model)
        z = jax.eval_shape(
            lambda p, x, net=net: net.merge(p, net.abstract_rest).encode(x).mean,
            net.abstract_params,
            jax.ShapeDtypeStruct((1, res, res, 3), jnp.float32),
        )
        assert z.shape == (1, latent, latent, 4), (width, z.shape)
    with pytest.raises(ValueError, match="factor=3"):
        stage_config("shapes_vae", "factor=3")


def param_count(model) -> int:
    """The parameters of the network `model` (a config's model group) builds, traced only."""
    import jax

    from imagen_jax.training import state as state_lib

    params = state_lib.make_network(model).abstract_params
    return sum(leaf.size for leaf in jax.tree.leaves(params))
