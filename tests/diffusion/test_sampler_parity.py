"""Step-by-step parity of our samplers with the diffusers scheduler loops.

One deterministic stand-in network (a fixed random channel map of z, a function of t and a
per-sample conditioning vector) drives both sides; both run classifier-free guidance; the
stochastic samplers get the same injected noise. Every intermediate sample must agree within
1e-5 (float32), relative to the sample's scale. The one exception is DDPM, whose last noisy
step (t -> 0 at the lowest levels) is ill-conditioned in float32 on both sides: measured against
a float64 run of diffusers, ours and diffusers' float32 loops each stay within 9e-6, so they
may differ from each other by up to 2e-5.
"""

import functools

import diffusers
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

from imagen_jax.diffusion import samplers, schedules, time_grids

B, H, W, C = 2, 4, 4, 3
GUIDANCE = 4.0
TOL = 1e-5


def stand_in_params(out_channels, seed=0):
    rng = np.random.default_rng(seed)
    return dict(
        w=(rng.normal(size=(C, out_channels)) / np.sqrt(C)).astype(np.float32),
        u=rng.normal(size=(out_channels,)).astype(np.float32),
        cond=rng.normal(size=(B, out_channels)).astype(np.float32),
        uncond=rng.normal(size=(B, out_channels)).astype(np.float32) * 0.3,
    )


def jax_model(p):
    def model_fn(z, t, cond):  # z [B, H, W, C], t [B], cond [B, D]
        time = jnp.cos(t / 1000.0 * 3.0)[:, None, None, None]
        return 0.5 * jnp.einsum("bhwc,cd->bhwd", z, p["w"]) + time * p["u"] + cond[:, None, None]

    return model_fn


def torch_model(p):
    w, u = torch.from_numpy(p["w"]), torch.from_numpy(p["u"])

    def model_fn(x, t, cond):  # x [B, C, H, W]
        time = torch.cos(torch.as_tensor(t, dtype=torch.float32) / 1000.0 * 3.0)
        out = 0.5 * torch.einsum("bchw,cd->bdhw", x, w) + time * u[None, :, None, None]
        return out + cond[:, :, None, None]

    return model_fn


def to_torch(x):
    return torch.from_numpy(np.asarray(x)).permute(0, 3, 1, 2).contiguous()


def to_numpy(x):
    return x.permute(0, 2, 3, 1).numpy()


class NoiseFeed:
    """Replaces diffusers' `randn_tensor` with our noise of the current step."""

    def __init__(self, key):
        self.key, self.step = key, 0

    def __call__(self, shape, **kwargs):
        noise = samplers.step_noise(self.key, self.step, (B, H, W, C))
        return to_torch(noise)


def diffusers_loop(
    scheduler,
    num_steps,
    x_init,
    p,
    *,
    learned_variance=False,
    step_kwargs=None,
    noise_feed=None,
    heun=False,
):
    """The loop of the diffusers pipelines with CFG; returns the sample after every step."""
    model = torch_model(p)
    cond = torch.cat([torch.from_numpy(p["uncond"]), torch.from_numpy(p["cond"])])
    x = to_torch(x_init) * getattr(scheduler, "init_noise_sigma", 1.0)
    trajectory = []
    step = 0
    for call, t in enumerate(scheduler.timesteps):
        inp = torch.cat([x, x])
        if hasattr(scheduler, "scale_model_input"):
            inp = scheduler.scale_model_input(inp, t)
        out = model(inp, t, cond)
        if learned_variance:
            out_u, _ = out[:B].split(C, dim=1)
            out_c, var = out[B:].split(C, dim=1)
            out = torch.cat([out_u + GUIDANCE * (out_c - out_u), var], dim=1)
        else:
            out = out[:B] + GUIDANCE * (out[B:] - out[:B])
        if noise_feed is not None:
            noise_feed.step = step
        x = scheduler.step(out, t, x, **(step_kwargs or {})).prev_sample
        full_step = not heun or call % 2 == 1 or call == len(scheduler.timesteps) - 1
        if full_step:
            trajectory.append(to_numpy(x))
            step += 1
    return np.stack(trajectory)


def ours(grid, x_init, p, sampler, *, key=None, sampler_options=None, **denoiser_options):
    z = jnp.asarray(x_init) * grid.init_sigma
    _, zs = jax.jit(
        functools.partial(
            samplers.sample,
            jax_model(p),
            sampler=sampler,
            sampler_options=dict(sampler_options or {}, trajectory=True),
            uncond=jnp.asarray(p["uncond"]),
            guidance_scale=GUIDANCE,
            **denoiser_options,
        )
    )(z, grid, cond=jnp.asarray(p["cond"]), key=key)
    return np.asarray(zs)


def assert_trajectories_close(ours_zs, ref_zs, tol=TOL):
    assert ours_zs.shape == ref_zs.shape, (ours_zs.shape, ref_zs.shape)
    for i, (a, b) in enumerate(zip(ours_zs, ref_zs, strict=True)):
        scale = max(1.0, float(np.abs(b).max()))
        err = float(np.abs(a - b).max())
        assert err <= tol * scale, (
            f"step {i}: max |ours - diffusers| = {err:.3g} (scale {scale:.3g})"
        )


def x_init(seed=1):
    return np.random.default_rng(seed).normal(size=(B, H, W, C)).astype(np.float32)


STEPS = [1, 10, 50]
SPACINGS = ["leading", "trailing", "linspace"]
SD = dict(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012)


def discrete(**kw):
    cfg = {k: v for k, v in kw.items() if k in ("beta_start", "beta_end")}
    return schedules.DiscreteSchedule.from_config(kw.get("beta_schedule", "linear"), **cfg)


@pytest.mark.parametrize("num_steps", STEPS)
@pytest.mark.parametrize("spacing", SPACINGS)
@pytest.mark.parametrize("prediction", ["eps", "v"])
def test_ddim(num_steps, spacing, prediction):
    p = stand_in_params(C)
    pt = {"eps": "epsilon", "v": "v_prediction"}[prediction]
    ref = diffusers.DDIMScheduler(
        **SD, clip_sample=False, timestep_spacing=spacing, prediction_type=pt
    )
    ref.set_timesteps(num_steps)
    grid = time_grids.ddim_grid(discrete(**SD), num_steps, spacing=spacing)
    assert np.array_equal(grid.t, ref.timesteps.numpy())
    x = x_init()
    assert_trajectories_close(
        ours(grid, x, p, "ddim", prediction=prediction), diffusers_loop(ref, num_steps, x, p)
    )


@pytest.mark.parametrize("num_steps", STEPS)
@pytest.mark.parametrize("spacing", SPACINGS)
def test_ddim_eta_and_thresholding(num_steps, spacing):
    p = stand_in_params(C)
    key = jax.random.key(7)
    ref = diffusers.DDIMScheduler(timestep_spacing=spacing, thresholding=True, sample_max_value=1.5)
    ref.set_timesteps(num_steps)
    # DDIM takes its noise as an argument: feed ours step by step.
    model = torch_model(p)
    cond = torch.cat([torch.from_numpy(p["uncond"]), torch.from_numpy(p["cond"])])
    x = to_torch(x_init())
    ref_zs = []
    for i, t in enumerate(ref.timesteps):
        out = model(torch.cat([x, x]), t, cond)
        out = out[:B] + GUIDANCE * (out[B:] - out[:B])
        noise = to_torch(samplers.step_noise(key, i, (B, H, W, C)))
        x = ref.step(
            out, t, x, eta=1.0, use_clipped_model_output=True, variance_noise=noise
        ).prev_sample
        ref_zs.append(to_numpy(x))
    grid = time_grids.ddim_grid(discrete(), num_steps, spacing=spacing)
    got = ours(
        grid,
        x_init(),
        p,
        "ddim",
        key=key,
        sampler_options=dict(eta=1.0),
        dynamic_threshold=(0.995, 1.5),
    )
    assert_trajectories_close(got, np.stack(ref_zs))


@pytest.mark.parametrize("num_steps", STEPS)
@pytest.mark.parametrize("spacing", SPACINGS)
@pytest.mark.parametrize("variance", ["fixed_small", "learned_range"])
def test_ddpm(num_steps, spacing, variance, monkeypatch):
    learned = variance == "learned_range"
    p = stand_in_params(2 * C if learned else C)
    if learned:  # keep the variance outputs in [-1, 1], as IF's are in practice
        p["w"][:, C:] *= 0.1
        p["u"][C:] = np.tanh(p["u"][C:]) * 0.5
        p["cond"][:, C:] = np.tanh(p["cond"][:, C:]) * 0.3
        p["uncond"][:, C:] = 0.0
    key = jax.random.key(3)
    feed = NoiseFeed(key)
    monkeypatch.setattr("diffusers.schedulers.scheduling_ddpm.randn_tensor", feed)
    ref = diffusers.DDPMScheduler(
        beta_schedule="squaredcos_cap_v2",
        variance_type=variance,
        timestep_spacing=spacing,
        thresholding=True,
        sample_max_value=1.5,
    )
    ref.set_timesteps(num_steps)
    grid = time_grids.ddpm_grid(
        schedules.DiscreteSchedule.from_config("squaredcos_cap_v2"), num_steps, spacing=spacing
    )
    x = x_init()
    expected = diffusers_loop(ref, num_steps, x, p, learned_variance=learned, noise_feed=feed)
    got = ours(
        grid,
        x,
        p,
        "ddpm",
        key=key,
        sampler_options=dict(variance=variance),
        learned_variance=learned,
        dynamic_threshold=(0.995, 1.5),
    )
    assert_trajectories_close(got, expected, tol=2e-5)


def _sigma_sampler_case(
    cls, sampler, num_steps, spacing, karras, monkeypatch, module=None, heun=False, prediction="eps"
):
    p = stand_in_params(C)
    key = jax.random.key(11)
    feed = None
    if module is not None:
        feed = NoiseFeed(key)
        monkeypatch.setattr(f"diffusers.schedulers.{module}.randn_tensor", feed)
    extra = dict(use_karras_sigmas=True) if karras else {}
    pt = {"eps": "epsilon", "v": "v_prediction"}[prediction]
    ref = cls(**SD, timestep_spacing=spacing, prediction_type=pt, **extra)
    ref.set_timesteps(num_steps)
    grid = time_grids.sigma_grid(discrete(**SD), num_steps, spacing=spacing, karras=karras)
    np.testing.assert_allclose(
        grid.t, ref.timesteps.numpy()[:: 2 if heun else 1][:num_steps], rtol=1e-5, atol=1e-3
    )
    x = x_init()
    expected = diffusers_loop(ref, num_steps, x, p, noise_feed=feed, heun=heun)
    got = ours(grid, x, p, sampler, key=key, prediction=prediction)
    assert_trajectories_close(got, expected)


@pytest.mark.parametrize("num_steps", STEPS)
@pytest.mark.parametrize("spacing", SPACINGS)
@pytest.mark.parametrize("karras", [False, True])
def test_euler(num_steps, spacing, karras, monkeypatch):
    _sigma_sampler_case(
        diffusers.EulerDiscreteScheduler,
        "euler",
        num_steps,
        spacing,
        karras,
        monkeypatch,
        prediction="v" if karras else "eps",
    )


@pytest.mark.parametrize("num_steps", STEPS)
@pytest.mark.parametrize("spacing", SPACINGS)
def test_euler_ancestral(num_steps, spacing, monkeypatch):
    _sigma_sampler_case(
        diffusers.EulerAncestralDiscreteScheduler,
        "euler_ancestral",
        num_steps,
        spacing,
        False,
        monkeypatch,
        module="scheduling_euler_ancestral_discrete",
    )


@pytest.mark.parametrize("num_steps", STEPS)
@pytest.mark.parametrize("spacing", SPACINGS)
@pytest.mark.parametrize("karras", [False, True])
def test_heun(num_steps, spacing, karras, monkeypatch):
    _sigma_sampler_case(
        diffusers.HeunDiscreteScheduler, "heun", num_steps, spacing, karras, monkeypatch, heun=True
    )


def multistep_grid(ref, num_steps, spacing, karras, final_sigma="zero"):
    """Our grid of diffusers' multistep solvers (DPM-Solver, UniPC) on SD's schedule; its
    timesteps must be the scheduler's, which this sets."""
    ref.set_timesteps(num_steps)
    grid = time_grids.sigma_grid(
        discrete(**SD),
        num_steps,
        spacing=spacing,
        karras=karras,
        final_sigma=final_sigma,
        space="vp",
        dpm_spacing=True,
        round_timesteps=True,
    )
    assert np.array_equal(grid.t, ref.timesteps.numpy())
    return grid


@pytest.mark.parametrize("num_steps", STEPS)
@pytest.mark.parametrize("spacing", SPACINGS)
@pytest.mark.parametrize("variant", ["2m", "2m_karras", "2m_sde", "2m_heun_v", "3m", "3m_karras_v"])
def test_dpm_solver(num_steps, spacing, variant, monkeypatch):
    p = stand_in_params(C)
    key = jax.random.key(5)
    sde = "sde" in variant
    order = 3 if variant.startswith("3m") else 2
    karras = "karras" in variant
    solver_type = "heun" if "heun" in variant else "midpoint"
    prediction = "v" if variant.endswith("_v") else "eps"
    feed = None
    if sde:
        feed = NoiseFeed(key)
        monkeypatch.setattr(
            "diffusers.schedulers.scheduling_dpmsolver_multistep.randn_tensor", feed
        )
    ref = diffusers.DPMSolverMultistepScheduler(
        **SD,
        timestep_spacing=spacing,
        use_karras_sigmas=karras,
        solver_type=solver_type,
        solver_order=order,
        algorithm_type="sde-dpmsolver++" if sde else "dpmsolver++",
        prediction_type={"eps": "epsilon", "v": "v_prediction"}[prediction],
        thresholding=not sde,
        sample_max_value=1.5,
    )
    grid = multistep_grid(ref, num_steps, spacing, karras)
    x = x_init()
    expected = diffusers_loop(ref, num_steps, x, p, noise_feed=feed)
    got = ours(
        grid,
        x,
        p,
        "dpmpp_3m" if order == 3 else "dpmpp_2m_sde" if sde else "dpmpp_2m",
        key=key,
        prediction=prediction,
        sampler_options=dict(solver_type=solver_type),
        dynamic_threshold=None if sde else (0.995, 1.5),
    )
    assert_trajectories_close(got, expected)


@pytest.mark.parametrize("num_steps", STEPS)
@pytest.mark.parametrize("spacing", SPACINGS)
@pytest.mark.parametrize("variant", ["2", "3", "2_karras_v", "3_bh1_sigma_min"])
def test_unipc(num_steps, spacing, variant):
    p = stand_in_params(C)
    order = int(variant[0])
    karras = "karras" in variant
    solver_type = "bh1" if "bh1" in variant else "bh2"
    final_sigma = "sigma_min" if "sigma_min" in variant else "zero"
    prediction = "v" if variant.endswith("_v") else "eps"
    ref = diffusers.UniPCMultistepScheduler(
        **SD,
        timestep_spacing=spacing,
        use_karras_sigmas=karras,
        solver_order=order,
        solver_type=solver_type,
        final_sigmas_type=final_sigma,
        prediction_type={"eps": "epsilon", "v": "v_prediction"}[prediction],
        thresholding=True,
        sample_max_value=1.5,
    )
    grid = multistep_grid(ref, num_steps, spacing, karras, final_sigma=final_sigma)
    x = x_init()
    expected = diffusers_loop(ref, num_steps, x, p)
    got = ours(
        grid,
        x,
        p,
        "unipc",
        prediction=prediction,
        sampler_options=dict(order=order, solver_type=solver_type),
        dynamic_threshold=(0.995, 1.5),
    )
    assert_trajectories_close(got, expected)


@pytest.mark.parametrize("num_steps", STEPS)
@pytest.mark.parametrize("shift", [1.0, 3.0])
def test_flow_euler(num_steps, shift):
    p = stand_in_params(C)
    ref = diffusers.FlowMatchEulerDiscreteScheduler(shift=shift)
    ref.set_timesteps(num_steps)
    grid = time_grids.flow_grid(num_steps, shift=shift)
    np.testing.assert_allclose(grid.t, ref.timesteps.numpy(), rtol=1e-6)
    x = x_init()
    got = ours(grid, x, p, "flow_euler", prediction="flow", model_space="flow")
    assert_trajectories_close(got, diffusers_loop(ref, num_steps, x, p))
