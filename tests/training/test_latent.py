"""Latent training on the shapes domain: the VAE config (configs/shapes_vae.py) and the
latent SDUNet config (configs/shapes_latent.py), in their runlocal forms, through
train_and_evaluate: two steps, a checkpoint, a resume, the VAE's diffusers export read back
by diffusers itself, and the errors of a latent stage whose VAE is missing or does not fit.
"""

import json
import math
import pathlib
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from conftest import stage_config, tiny
from flax import nnx
from PIL import Image

from imagen_jax import training
from imagen_jax.diffusion import schedules
from imagen_jax.models import latent_unet, vae
from imagen_jax.training import step as step_lib
from imagen_jax.training.vae_trainer import EXPORT_DIR

STAGES = ("shapes_vae", "shapes_latent")


def _steps(workdir) -> list[dict]:
    return [json.loads(line) for line in (workdir / "metrics.jsonl").read_text().splitlines()]


def _check_run(workdir, state, metrics, steps: int) -> None:
    assert int(state.step) == steps and math.isfinite(metrics["loss"])
    lines = _steps(workdir)
    assert [line["step"] for line in lines] == list(range(1, steps + 1))
    assert all(math.isfinite(line["loss"]) and math.isfinite(line["grad_norm"]) for line in lines)
    assert (workdir / "checkpoints" / str(steps) / "state").is_dir()


def _random_vae_dir(path, *, seed=0, **overrides):
    """A tiny diffusers VAE directory with random weights (drawn in numpy: no compile)."""
    cfg = vae.make_config("runlocal", **overrides)
    abstract = nnx.eval_shape(lambda: vae.AutoencoderKL(cfg, rngs=nnx.Rngs(0)))
    rng = np.random.default_rng(seed)
    params = jax.tree.map(
        lambda x: rng.normal(size=x.shape).astype(np.float32) * 0.1,
        nnx.to_pure_dict(nnx.state(abstract, nnx.Param)),
    )
    return pathlib.Path(vae.save_vae(path, params, cfg)), params


def test_vae_trains_resumes_and_exports_for_diffusers(tmp_path):
    diffusers = pytest.importorskip("diffusers")
    config = stage_config("shapes_vae", steps=2, log_every=1, checkpoint_every=2, sample_every=2)
    state, metrics = training.train_and_evaluate(config, str(tmp_path))
    _check_run(tmp_path, state, metrics, 2)
    assert {"rec_loss", "kl"} <= set(metrics) and metrics["kl"] >= 0
    grid = np.asarray(Image.open(tmp_path / "samples" / "step_00000002.png"))
    assert grid.shape == (2 * 18 + 2, 2 * 18 + 2, 3)  # originals over reconstructions

    export = tmp_path / EXPORT_DIR
    ours, cfg = vae.load_vae(export)
    ema = jax.tree.map(np.asarray, state.ema_params)
    loaded = nnx.to_pure_dict(nnx.state(ours, nnx.Param))
    jax.tree.map(np.testing.assert_array_equal, loaded, ema)  # the round trip is exact
    assert cfg.scaling_factor > 0 and cfg.sample_size == 16

    ref = diffusers.AutoencoderKL.from_pretrained(str(export)).eval()
    latents = np.random.default_rng(0).normal(size=(2, 8, 8, 4)).astype(np.float32)
    with torch.no_grad():
        theirs = ref.decode(torch.from_numpy(latents.transpose(0, 3, 1, 2))).sample.numpy()
    mine = np.asarray(nnx.jit(lambda m, z: m.decode(z))(ours, latents)).transpose(0, 3, 1, 2)
    assert np.abs(mine - theirs).max() / np.abs(theirs).max() < 1e-4

    resumed = stage_config("shapes_vae", steps=3, log_every=1, checkpoint_every=3, sample_every=0)
    state, metrics = training.train_and_evaluate(resumed, str(tmp_path))
    _check_run(tmp_path, state, metrics, 3)


def test_latent_stage_trains_and_resumes(tmp_path):
    config = stage_config("shapes_latent", steps=2, log_every=1, checkpoint_every=2, sample_every=2)
    assert config.latent.vae == "random"  # runlocal: an untrained tiny VAE
    state, metrics = training.train_and_evaluate(config, str(tmp_path))
    _check_run(tmp_path, state, metrics, 2)
    grid = np.asarray(Image.open(tmp_path / "samples" / "step_00000002.png"))
    assert grid.shape == (18 + 2, 2 * 18 + 2, 3)  # decoded to 16 px images

    resumed = tiny("shapes_latent", steps=3)
    state, metrics = training.train_and_evaluate(resumed, str(tmp_path))
    _check_run(tmp_path, state, metrics, 3)


def test_latent_stage_names_a_missing_vae(tmp_path):
    missing = tmp_path / "no_such_vae"
    config = tiny("shapes_latent")
    config.latent.vae = str(missing)
    with pytest.raises(
        FileNotFoundError, match=re.escape(f"latent.vae='{missing}': no such directory")
    ):
        training.train_and_evaluate(config, str(tmp_path / "run"))
    config.latent.vae = ""
    with pytest.raises(FileNotFoundError, match="latent.vae is empty"):
        training.train_and_evaluate(config, str(tmp_path / "run"))


def test_latent_stage_rejects_a_vae_that_does_not_fit(tmp_path):
    path, _ = _random_vae_dir(tmp_path / "vae8", latent_channels=8)
    config = tiny("shapes_latent")
    config.latent.vae = str(path)
    with pytest.raises(ValueError, match="makes latents of 8 channels but the UNet takes "):
        training.train_and_evaluate(config, str(tmp_path / "run"))
    assert not (tmp_path / "run" / "checkpoints").exists()


def test_exported_tensors_have_diffusers_layouts(tmp_path):
    path, params = _random_vae_dir(tmp_path / "vae")
    from safetensors.numpy import load_file

    tensors = load_file(str(path / "diffusion_pytorch_model.safetensors"))
    kernel = params["encoder"]["conv_in"]["kernel"]  # [kh, kw, in, out]
    np.testing.assert_array_equal(tensors["encoder.conv_in.weight"], kernel.transpose(3, 2, 0, 1))
    to_q = params["encoder"]["mid_block"]["attention"]["to_q"]["kernel"]  # [in, out]
    np.testing.assert_array_equal(tensors["encoder.mid_block.attentions.0.to_q.weight"], to_q.T)
    hf = json.loads((path / "config.json").read_text())
    assert hf["_class_name"] == "AutoencoderKL" and hf["block_out_channels"] == [16, 32]


def test_latent_unet_is_told_diffusers_timesteps():
    seen = {}

    class Recorder(nnx.Module):
        time_input = "timesteps"

        def __call__(self, z_t, t, cond):
            seen["t"] = t
            return z_t

    discrete = schedules.DiscreteSchedule.from_config("scaled_linear", num_train_timesteps=1000)
    step_lib.model_fn(Recorder(), schedule=discrete)(jnp.zeros((2, 1)), jnp.array([0, 999]), {})
    np.testing.assert_array_equal(seen["t"], [0, 999])  # not 999 / 1000
    cosine = schedules.LogSNRSchedule("cosine")
    step_lib.model_fn(Recorder(), schedule=cosine)(jnp.zeros((1, 1)), jnp.array([0.25]), {})
    np.testing.assert_allclose(seen["t"], [250.0])
    assert latent_unet.LatentUNet.time_input == "timesteps"


@pytest.mark.parametrize("stage", STAGES)
@pytest.mark.parametrize("arg", ["", "runlocal"])
def test_configs_build(stage, arg):
    config = stage_config(stage, arg)
    net = training.make_network(config.model)
    assert net.family == {"shapes_vae": "vae", "shapes_latent": "sd_unet"}[stage]
    assert config.model.resolution == config.data.resolution
    if stage == "shapes_latent":
        assert net.text_dim == (config.text.dim if arg else 384)
        assert net.cfg.unet.in_channels == 4 and config.evals.every == 0
    else:
        assert net.cfg.latent_channels == 4 and set(config.vae_loss) >= {"kl_weight"}
    with pytest.raises(ValueError, match="Unknown config arg 'bogus'"):
        stage_config(stage, "runlocal,bogus=1")


def test_model_groups_are_strict():
    with pytest.raises(KeyError, match="unknown model config keys"):
        training.model_config(family="sd_unet", channels=32)  # an ImagenUNet key
    with pytest.raises(KeyError, match="unknown model config keys"):
        training.model_config(family="vae", text_dim=32)
    with pytest.raises(ValueError, match="model.family='dit'"):
        training.model_config(family="dit")
    model = training.model_config(family="sd_unet", low_resolution=8)
    with pytest.raises(ValueError, match="latent super-resolution is not implemented"):
        training.make_network(model)
