"""Latent training on the shapes domain: the VAE config (configs/shapes_vae.py), the
latent SDUNet config (configs/shapes_latent.py) and the SD3-style MMDiT config
(configs/shapes_mmdit.py), in their runlocal forms, through train_and_evaluate: two steps, a
checkpoint, a resume, the VAE's diffusers export read back by diffusers itself, the MMDiT
learning a fixed batch with rectified flow, and the errors of a latent stage whose VAE is
missing or does not fit.
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
from test_learning import _probe_losses

from imagen_jax import training
from imagen_jax.diffusion import schedules
from imagen_jax.diffusion.adapter import model_fn
from imagen_jax.models import latent_mmdit, latent_unet, vae
from imagen_jax.text.config import make_text_encoder
from imagen_jax.training import latent_space as latent_lib
from imagen_jax.training import loop
from imagen_jax.training.vae_trainer import EXPORT_DIR

STAGES = ("shapes_vae", "shapes_latent", "shapes_mmdit")
FAMILY = {"shapes_vae": "vae", "shapes_latent": "sd_unet", "shapes_mmdit": "mmdit"}


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


@pytest.mark.parametrize("stage", ["shapes_latent", "shapes_mmdit"])
def test_latent_stage_trains_and_resumes(stage, tmp_path):
    config = stage_config(stage, steps=2, log_every=1, checkpoint_every=2, sample_every=2)
    assert config.latent.vae == "random"  # runlocal: an untrained tiny VAE
    state, metrics = training.train_and_evaluate(config, str(tmp_path))
    _check_run(tmp_path, state, metrics, 2)
    grid = np.asarray(Image.open(tmp_path / "samples" / "step_00000002.png"))
    assert grid.shape == (18 + 2, 2 * 18 + 2, 3)  # decoded to 16 px images

    resumed = tiny(stage, steps=3)
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
    model_fn(Recorder(), schedule=discrete)(jnp.zeros((2, 1)), jnp.array([0, 999]), {})
    np.testing.assert_array_equal(seen["t"], [0, 999])  # not 999 / 1000
    cosine = schedules.LogSNRSchedule("cosine")
    model_fn(Recorder(), schedule=cosine)(jnp.zeros((1, 1)), jnp.array([0.25]), {})
    np.testing.assert_allclose(seen["t"], [250.0])
    assert latent_unet.LatentUNet.time_input == "timesteps"


def test_mmdit_learns_a_fixed_batch_with_rectified_flow():
    """On one fixed batch of latents, the flow-matching loss of the MMDiT stage falls far
    below where it starts (the same probe as test_learning.py's for the pixel UNet)."""
    config = tiny("shapes_mmdit", steps=100)
    mesh = loop.make_mesh(config)
    with jax.set_mesh(mesh):
        net = training.make_network(config.model)
        assert isinstance(net.build(nnx.Rngs(0)), latent_mmdit.LatentMMDiT)
        latent = latent_lib.LatentSpace.from_config(config, net, mesh)
        tx, lr_schedule = training.make_optimizer(config.optim, config.train.steps)
        state, shardings, rest = training.create_train_state(config, net, tx, mesh)
        encoder = make_text_encoder(config.text)
        batch = loop.device_batch(next(training.make_input(config)), encoder, mesh)
        batch = latent.encode_batch(batch, 0)
        train_step = training.make_train_step(config, net, tx, lr_schedule, mesh, shardings, rest)
        before = _probe_losses(train_step, state, rest, batch)
        for _ in range(config.train.steps):
            state, metrics = train_step(state, rest, batch)
            jax.block_until_ready(metrics)
        after = _probe_losses(train_step, state, rest, batch)
    print(f"flow loss on the same draws: before {before.mean():.3f}, after {after.mean():.3f}")
    assert np.isfinite(after).all()
    assert after.mean() < 0.6 * before.mean(), (before, after)


def test_mmdit_is_told_sigma_times_1000_and_pools_real_tokens():
    seen = {}
    model = latent_mmdit.LatentMMDiT(latent_mmdit.make_config("runlocal"), rngs=nnx.Rngs(0))

    def spy(z, t, text, pooled):
        seen.update(t=t, text=text, pooled=pooled)
        return z

    model.transformer = spy
    flow = schedules.FlowSchedule(shift=3.0)  # the loss and samplers use sigma * 1000 as t
    text = jnp.ones((2, 4, 32)).at[:, 2:].set(5.0)  # two real tokens, then padding
    mask = jnp.array([[True, True, False, False]] * 2)
    cond = {"text": text, "text_mask": mask, "drop_text": jnp.array([False, True])}
    t = jnp.array([250.0, 999.0])
    model_fn(model, schedule=flow)(jnp.zeros((2, 4, 4, 4)), t, cond)
    np.testing.assert_array_equal(seen["t"], [250.0, 999.0])  # as SD3's transformer is told
    np.testing.assert_array_equal(seen["text"][0, 2:], 0.0)  # padding zeroed
    np.testing.assert_allclose(seen["pooled"][0], 1.0)  # the mean of the real tokens
    null = model.null_text[...][0]  # dropped row: the learned null tokens and their mean
    np.testing.assert_allclose(seen["text"][1, :2], null)
    np.testing.assert_allclose(seen["pooled"][1], null.mean(axis=0), rtol=1e-6)


@pytest.mark.parametrize("stage", STAGES)
@pytest.mark.parametrize("arg", ["", "runlocal"])
def test_configs_build(stage, arg):
    config = stage_config(stage, arg)
    net = training.make_network(config.model)
    assert net.family == FAMILY[stage]
    assert config.model.resolution == config.data.resolution
    if stage in ("shapes_latent", "shapes_mmdit"):
        assert net.text_dim == (config.text.dim if arg else 384)
        assert net.cfg.in_channels == 4 and config.evals.every == 0
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
    with pytest.raises(KeyError, match="unknown model config keys"):
        training.model_config(family="mmdit", cross_attention_dim=32)  # an SDUNet key
    with pytest.raises(ValueError, match="pooled_projection_dim=16 must equal"):
        training.make_network(training.model_config(family="mmdit", pooled_projection_dim=16))
    model = training.model_config(family="sd_unet", low_resolution=8)
    with pytest.raises(ValueError, match="latent super-resolution is not implemented"):
        training.make_network(model)


def test_mmdit_adaln_zero_starts_as_identity_and_still_learns():
    """adaLN-Zero: every block the identity and a zero prediction at initialization, yet
    the output layer has a gradient; the shipped variant uses it, diffusers' init does not."""
    assert latent_mmdit.make_config("shapes_mmdit").adaln_zero
    default = latent_mmdit.make_config("runlocal")
    cfg = latent_mmdit.make_config("runlocal", adaln_zero=True)
    model = latent_mmdit.LatentMMDiT(cfg, rngs=nnx.Rngs(0))
    plain = latent_mmdit.LatentMMDiT(default, rngs=nnx.Rngs(0))
    z = jax.random.normal(jax.random.key(1), (2, 8, 8, 4))
    cond = {"text": jax.random.normal(jax.random.key(2), (2, 3, 32)), "text_mask": jnp.ones((2, 3))}
    t = jnp.array([100.0, 900.0])
    np.testing.assert_array_equal(model(z, t, cond), 0.0)
    assert float(jnp.abs(plain(z, t, cond)).mean()) > 1e-2
    tr = model.transformer
    tokens = tr.pos_embed(z)
    text = tr.context_embedder(cond["text"])
    temb = tr.time_text_embed(t, cond["text"].mean(axis=1))
    out, ctx = tr.transformer_blocks[0](tokens, text, temb)
    np.testing.assert_array_equal(out, tokens)
    np.testing.assert_array_equal(ctx, text)

    def loss(m):
        return jnp.mean((m(z, t, cond) - z) ** 2)

    grads = nnx.grad(loss)(model)
    assert float(jnp.abs(grads.transformer.proj_out.kernel[...]).max()) > 0


class _SpyVAE:
    """An autoencoder whose encoder returns fixed latents and whose decoder records what it is
    given (and returns zeros): what `vae_loss` decodes, seen directly."""

    def __init__(self, latents):
        self.latents, self.decoded = latents, None

    def encode(self, x):
        latents = self.latents

        class Posterior:
            def mode(self):
                return latents

            def sample(self, key):
                return latents + jax.random.normal(key, latents.shape)

            def kl(self):
                return jnp.zeros(latents.shape[0])

        return Posterior()

    def decode(self, z):
        self.decoded = z
        return jnp.zeros(z.shape[:1] + (8, 8, 3))


def test_vae_latent_noise_decodes_noised_latents_in_their_own_units():
    """`vae_loss.latent_noise = s` decodes the latents plus noise of std u * s * std(z), u
    drawn per example in [0, 1); 0 decodes what the loss decoded before (the latents, or the
    posterior's draw from the same key); a negative s stops the loss and the config check."""
    from imagen_jax.training.config import ConfigError, check_config
    from imagen_jax.training.vae_step import vae_loss

    latents = jnp.asarray(np.random.default_rng(0).normal(size=(64, 4, 4, 4)) * 3.0 + 1.0)
    images = jnp.zeros((64, 8, 8, 3), jnp.uint8)
    key = jax.random.key(0)
    options = dict(reconstruction="l1", kl_weight=0.0, sample_posterior=False)
    spy = _SpyVAE(latents)
    vae_loss(spy, images, key, **options)
    np.testing.assert_array_equal(spy.decoded, latents)
    vae_loss(spy, images, key, **options, latent_noise=0.5)
    noise = np.asarray(spy.decoded - latents) / float(jnp.std(latents))
    per_example = noise.reshape(64, -1).std(axis=1)
    assert 0 < per_example.min() < 0.1 and 0.4 < per_example.max() < 0.55, per_example
    assert 0.15 < per_example.mean() < 0.35  # E[u s] = 0.25
    sampled = dict(options, sample_posterior=True)
    vae_loss(spy, images, key, **sampled)
    drawn = spy.decoded
    vae_loss(spy, images, key, **sampled, latent_noise=0.5)
    assert not np.array_equal(spy.decoded, drawn)
    vae_loss(spy, images, key, **sampled, latent_noise=0.0)
    np.testing.assert_array_equal(spy.decoded, drawn)
    with pytest.raises(ValueError, match="latent_noise=-0.1"):
        vae_loss(spy, images, key, **options, latent_noise=-0.1)
    config = stage_config("shapes_vae")
    config.vae_loss.latent_noise = -1.0
    with pytest.raises(ConfigError, match="vae_loss.latent_noise=-1.0: must be >= 0"):
        check_config(config)
