"""Closed-form properties of the samplers, compilation, and bad input."""

import collections
import functools

import diffusers
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

from imagen_jax.diffusion import guidance, samplers, schedules, time_grids

SHAPE = (2, 4, 4, 3)
SD = dict(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012)
SCHED = schedules.DiscreteSchedule.from_config("scaled_linear", beta_start=0.00085, beta_end=0.012)


def _x0():
    return jnp.asarray(np.random.default_rng(0).uniform(-1, 1, SHAPE), jnp.float32)


def _eps():
    return jnp.asarray(np.random.default_rng(1).normal(size=SHAPE), jnp.float32)


def _oracle_eps_model(x0, schedule):
    """Predicts the true noise of a state that lies on x0's VP path."""

    def model_fn(z, t, cond):
        del cond
        alpha, sigma = schedule.alpha_sigma(jnp.round(t).astype(jnp.int32))
        return (z - alpha[:, None, None, None] * x0) / sigma[:, None, None, None]

    return model_fn


def _linear_model(z, t, cond):
    return 0.3 * z + 0.1 * jnp.cos(t / 300.0)[:, None, None, None] + cond[:, None, None, :]


@pytest.mark.parametrize(
    "sampler,make_grid",
    [
        ("ddim", lambda n: time_grids.ddim_grid(SCHED, n, spacing="trailing")),
        ("ddpm", lambda n: time_grids.ddpm_grid(SCHED, n)),
        ("dpmpp_2m", lambda n: time_grids.sigma_grid(SCHED, n, space="vp", dpm_spacing=True)),
        ("dpmpp_3m", lambda n: time_grids.sigma_grid(SCHED, n, space="vp", dpm_spacing=True)),
        ("unipc", lambda n: time_grids.sigma_grid(SCHED, n, space="vp", dpm_spacing=True)),
    ],
)
def test_true_noise_recovers_x0(sampler, make_grid):
    """A network that predicts the true noise walks x0's path and ends exactly on x0."""
    x0, eps = _x0(), _eps()
    grid = make_grid(10)
    z = grid.alpha[0] * x0 + grid.sigma[0] * eps
    out = samplers.sample(
        _oracle_eps_model(x0, SCHED), z, grid, sampler=sampler, cond=None, key=jax.random.key(0)
    )
    np.testing.assert_allclose(out, x0, atol=2e-5)


@pytest.mark.parametrize("sampler", ["euler", "heun", "euler_ancestral", "dpmpp_2m_sde"])
def test_x0_oracle_ends_on_x0(sampler):
    """A network that predicts the true x0 ends on it, whatever the state space."""
    x0 = _x0()
    grid = time_grids.sigma_grid(SCHED, 7, karras=True)
    z = grid.init_sigma * _eps()
    out = samplers.sample(
        lambda z, t, c: jnp.broadcast_to(x0, z.shape),
        z,
        grid,
        sampler=sampler,
        prediction="x0",
        key=jax.random.key(1),
    )
    np.testing.assert_allclose(out, x0, atol=1e-5)


def test_ddim_eta0_is_deterministic():
    grid = time_grids.ddim_grid(SCHED, 10)
    z = _eps()
    cond = jnp.ones((2, 3))
    run = functools.partial(samplers.sample, _linear_model, z, grid, sampler="ddim", cond=cond)
    a = run(key=jax.random.key(0))
    b = run(key=jax.random.key(1))
    np.testing.assert_array_equal(a, b)
    c = run(key=jax.random.key(1), sampler_options=dict(eta=1.0))
    assert not np.allclose(a, c)


def test_cfg_scale_one_is_the_conditional_prediction():
    z, t = _eps(), jnp.full((2,), 500.0)
    cond, uncond = jnp.ones((2, 3)), -jnp.ones((2, 3))
    guided = guidance.cfg_model(_linear_model, uncond=uncond, guidance_scale=1.0)
    np.testing.assert_allclose(guided(z, t, cond), _linear_model(z, t, cond), atol=1e-6)
    zero = guidance.cfg_model(_linear_model, uncond=uncond, guidance_scale=0.0)
    np.testing.assert_allclose(zero(z, t, cond), _linear_model(z, t, uncond), atol=1e-6)


def test_dynamic_threshold_matches_diffusers():
    x0 = 3.0 * _eps()
    ref = diffusers.DDPMScheduler(
        thresholding=True, dynamic_thresholding_ratio=0.9, sample_max_value=2.0
    )
    expected = ref._threshold_sample(torch.from_numpy(np.asarray(x0)).permute(0, 3, 1, 2))
    got = guidance.dynamic_threshold(x0, percentile=0.9, max_value=2.0)
    # The quantile is over all of a sample's values, so the layout does not matter.
    np.testing.assert_allclose(got, expected.permute(0, 2, 3, 1).numpy(), atol=1e-6)


def test_guidance_rescale_matches_diffusers():
    from diffusers.pipelines.stable_diffusion_xl.pipeline_stable_diffusion_xl import (
        rescale_noise_cfg,
    )

    guided, cond = 2.0 * _eps(), _x0()
    expected = rescale_noise_cfg(
        torch.from_numpy(np.asarray(guided)),
        torch.from_numpy(np.asarray(cond)),
        guidance_rescale=0.7,
    )
    got = guidance.rescale_guidance(guided, cond, guidance_rescale=0.7)
    np.testing.assert_allclose(got, expected.numpy(), rtol=1e-5, atol=1e-6)


def test_compiles_once_whatever_the_prompts():
    traces = []

    def apply_fn(params, z, t, cond):
        traces.append(1)
        return params["a"] * z + cond[:, None, None, :]

    run = samplers.compile_sampler(apply_fn, sampler="dpmpp_2m")
    grid = time_grids.sigma_grid(SCHED, 8, space="vp", dpm_spacing=True)
    params = {"a": jnp.float32(0.5)}
    z = _eps()
    for seed in range(3):
        cond = jnp.asarray(np.random.default_rng(seed).normal(size=(2, 3)), jnp.float32)
        run(params, z, grid, cond, -cond, jnp.float32(1.0 + seed), jax.random.key(seed))
    # One trace of the cond/uncond batch (the lax.scan body is traced once).
    assert len(traces) == 1
    run(
        params,
        z,
        time_grids.sigma_grid(SCHED, 9, space="vp", dpm_spacing=True),
        cond,
        -cond,
        jnp.float32(2.0),
        jax.random.key(0),
    )
    assert len(traces) == 2  # a new step count is a new program


def test_progress_callback_reports_every_step():
    seen = []
    grid = time_grids.ddim_grid(SCHED, 6)
    out = samplers.sample(
        _linear_model, _eps(), grid, cond=jnp.ones((2, 3)), callback=lambda i: seen.append(int(i))
    )
    jax.block_until_ready(out)
    jax.effects_barrier()
    assert sorted(seen) == list(range(6))


@pytest.mark.parametrize("sampler", ["ddim", "heun"])
def test_preview_sends_each_steps_x0_and_leaves_the_samples(sampler):
    """Every 2nd step's predicted x0 reaches the host once: the x0 the denoiser gives on the
    state entering that step (from the trajectory); the samples are those without previews."""
    make = (
        time_grids.ddim_grid
        if sampler == "ddim"
        else functools.partial(time_grids.sigma_grid, space="vp")
    )
    grid = make(SCHED, 6)
    cond = jnp.ones((2, 3))
    z = grid.init_sigma * _eps()
    seen = collections.defaultdict(list)
    run = functools.partial(samplers.sample, _linear_model, z, grid, sampler=sampler, cond=cond)
    plain, states = samplers.get_sampler(sampler)(
        samplers.make_denoiser(_linear_model, cond=cond), z, grid, trajectory=True
    )
    out = run(preview=lambda i, x0: seen[int(i)].append(np.asarray(x0)), preview_every=2)
    jax.effects_barrier()
    np.testing.assert_array_equal(np.asarray(out), np.asarray(plain))
    assert sorted(seen) == [0, 2, 4]
    assert all(len(v) == 1 for v in seen.values())  # heun's corrector does not report
    denoise = samplers.make_denoiser(_linear_model, cond=cond)
    for i in seen:
        z_i = z if i == 0 else states[i - 1]
        t, alpha, sigma = grid.t[i], grid.alpha[i], grid.sigma[i]
        x0 = denoise(z_i, i, t, alpha, sigma).x0
        np.testing.assert_allclose(seen[i][0], x0, rtol=1e-5, atol=1e-5)


def test_preview_every_must_be_positive():
    with pytest.raises(ValueError, match="preview_every must be at least 1, got 0"):
        samplers.with_preview(lambda *a: None, print, time_grids.ddim_grid(SCHED, 2), 0)


def test_per_row_keys_make_rows_independent_of_batch():
    """With one key per row, a row's sample does not depend on its neighbours."""
    grid = time_grids.ddpm_grid(SCHED, 5)
    keys = jax.random.split(jax.random.key(4), 2)
    z = _eps()
    cond = jnp.ones((2, 3))
    both = samplers.sample(_linear_model, z, grid, sampler="ddpm", cond=cond, key=keys)
    alone = samplers.sample(_linear_model, z[1:], grid, sampler="ddpm", cond=cond[1:], key=keys[1:])
    np.testing.assert_allclose(both[1:], alone, atol=1e-6)


def test_per_step_guidance_schedule():
    grid = time_grids.ddim_grid(SCHED, 4)
    z, cond = _eps(), jnp.ones((2, 3))
    run = functools.partial(
        samplers.sample, _linear_model, z, grid, cond=cond, uncond=jnp.zeros((2, 3))
    )
    const = run(guidance_scale=3.0)
    np.testing.assert_allclose(run(guidance_scale=jnp.full((4,), 3.0)), const, atol=1e-6)
    assert not np.allclose(run(guidance_scale=jnp.array([3.0, 3.0, 3.0, 1.0])), const)


# ----------------------------------------------------------------------------------------------
# Starting and stopping part-way
# ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("strength", [0.3, 0.75, 1.0])
def test_img2img_start_matches_diffusers(strength):
    n = 20
    ref = diffusers.DDIMScheduler(**SD, timestep_spacing="leading", steps_offset=1)
    ref.set_timesteps(n)
    init_timestep = min(int(n * strength), n)
    t_start = max(n - init_timestep, 0)
    start = time_grids.strength_start(n, strength)
    assert start == t_start
    grid = time_grids.slice_grid(time_grids.ddim_grid(SCHED, n, steps_offset=1), start)
    np.testing.assert_array_equal(grid.t, ref.timesteps[t_start:].numpy())
    x0, eps = _x0(), _eps()
    noised = ref.add_noise(
        torch.from_numpy(np.asarray(x0)),
        torch.from_numpy(np.asarray(eps)),
        ref.timesteps[t_start : t_start + 1],
    )
    np.testing.assert_allclose(grid.alpha[0] * x0 + grid.sigma[0] * eps, noised.numpy(), atol=1e-6)


def test_denoising_end_and_start_match_sdxl():
    n, frac = 25, 0.8
    ref = diffusers.EulerDiscreteScheduler(**SD, timestep_spacing="leading", steps_offset=1)
    ref.set_timesteps(n)
    grid = time_grids.sigma_grid(SCHED, n, spacing="leading", steps_offset=1)
    cutoff = int(round(1000 - frac * 1000))
    assert time_grids.denoising_end_stop(grid, frac) == len(
        [t for t in ref.timesteps if t >= cutoff]
    )
    assert time_grids.denoising_start_index(grid, frac) == n - int((ref.timesteps < cutoff).sum())


@pytest.mark.parametrize("sampler", ["ddim", "euler", "dpmpp_2m"])
def test_handoff_equals_one_run(sampler):
    """Base up to denoising_end, then the rest from denoising_start, is the whole run (the
    multistep solver restarts at first order, so for it only the first half is exact)."""
    space = "vp" if sampler == "dpmpp_2m" else "ve"
    grid = (
        time_grids.ddim_grid(SCHED, 12)
        if sampler == "ddim"
        else time_grids.sigma_grid(SCHED, 12, space=space, dpm_spacing=sampler == "dpmpp_2m")
    )
    stop = time_grids.denoising_end_stop(grid, 0.6)
    assert stop == time_grids.denoising_start_index(grid, 0.6)
    z, cond = grid.init_sigma * _eps(), jnp.ones((2, 3))
    run = functools.partial(
        samplers.sample,
        _linear_model,
        sampler=sampler,
        cond=cond,
        sampler_options=dict(trajectory=True),
    )
    _, whole = run(z, grid)
    mid, first = run(z, time_grids.slice_grid(grid, 0, stop))
    np.testing.assert_allclose(first, whole[:stop], atol=1e-5)
    final, _ = run(mid, time_grids.slice_grid(grid, stop))
    if sampler != "dpmpp_2m":
        np.testing.assert_allclose(final, whole[-1], atol=1e-5)


# ----------------------------------------------------------------------------------------------
# Bad input
# ----------------------------------------------------------------------------------------------


def test_unknown_names_raise():
    with pytest.raises(ValueError, match="'nope'"):
        samplers.get_sampler("nope")
    with pytest.raises(ValueError, match="'nope'"):
        schedules.DiscreteSchedule.from_config("nope")
    with pytest.raises(ValueError, match="'nope'"):
        schedules.LogSNRSchedule("nope")
    with pytest.raises(ValueError, match="'nope'"):
        time_grids.spaced_timesteps(10, "nope")
    with pytest.raises(ValueError, match="'nope'"):
        samplers.sample(_linear_model, _eps(), time_grids.ddim_grid(SCHED, 2), sampler="nope")
    with pytest.raises(ValueError, match="'nope'"):
        samplers.make_denoiser(_linear_model, cond=None, prediction="nope")


@pytest.mark.parametrize("steps", [0, -3, 2.5])
def test_bad_step_counts_raise(steps):
    for build in (
        lambda: time_grids.ddim_grid(SCHED, steps),
        lambda: time_grids.sigma_grid(SCHED, steps),
        lambda: time_grids.flow_grid(steps),
        lambda: time_grids.continuous_grid(schedules.LogSNRSchedule(), steps),
    ):
        with pytest.raises(ValueError, match=f"num_steps must be an integer >= 1, got {steps}"):
            build()
    with pytest.raises(ValueError, match="exceeds"):
        time_grids.ddpm_grid(SCHED, 1001)


@pytest.mark.parametrize("strength", [0.0, -0.1, 1.5])
def test_bad_strength_raises(strength):
    with pytest.raises(ValueError, match=f"strength must be in \\(0, 1\\], got {strength}"):
        time_grids.strength_start(10, strength)


def test_bad_denoising_fraction_raises():
    grid = time_grids.ddim_grid(SCHED, 10)
    with pytest.raises(ValueError, match="denoising_end must be in \\(0, 1\\), got 1.2"):
        time_grids.denoising_end_stop(grid, 1.2)
    with pytest.raises(ValueError, match="denoising_start must be in \\(0, 1\\), got 0.0"):
        time_grids.denoising_start_index(grid, 0.0)
    with pytest.raises(ValueError, match="cannot slice steps \\[5, 3\\)"):
        time_grids.slice_grid(grid, 5, 3)


def test_wrong_length_guidance_schedule_raises():
    grid = time_grids.ddim_grid(SCHED, 4)
    with pytest.raises(ValueError, match="one value per step \\(4\\), got shape \\(3,\\)"):
        samplers.sample(
            _linear_model,
            _eps(),
            grid,
            cond=jnp.ones((2, 3)),
            uncond=jnp.zeros((2, 3)),
            guidance_scale=jnp.ones(3),
        )


def test_stochastic_sampler_without_key_raises():
    with pytest.raises(ValueError, match="stochastic"):
        samplers.sample(
            _linear_model,
            _eps(),
            time_grids.ddpm_grid(SCHED, 3),
            sampler="ddpm",
            cond=jnp.ones((2, 3)),
        )


def test_guidance_without_uncond_raises():
    with pytest.raises(ValueError, match="without `uncond`"):
        samplers.make_denoiser(_linear_model, cond=None, guidance_scale=5.0)


def test_sharded_batch_gives_the_same_images():
    """A batch split over 8 devices samples the same images as on one device."""
    from jax.sharding import NamedSharding
    from jax.sharding import PartitionSpec as P

    assert jax.device_count() == 8
    mesh = jax.make_mesh((8,), ("data",))
    rows = NamedSharding(mesh, P("data"))

    def apply_fn(params, z, t, cond):
        return params * z + jnp.cos(t / 300.0)[:, None, None, None] + cond[:, None, None, :]

    run = samplers.compile_sampler(apply_fn, sampler="dpmpp_2m_sde")
    grid = time_grids.sigma_grid(SCHED, 6, space="vp", dpm_spacing=True)
    z = jax.random.normal(jax.random.key(0), (8, 4, 4, 3))
    cond = jax.random.normal(jax.random.key(1), (8, 3))
    keys = jax.random.split(jax.random.key(2), 8)
    args = (jnp.float32(0.3), z, grid, cond, jnp.zeros_like(cond), jnp.float32(3.0), keys)
    single = run(*args)
    sharded_args = list(args)
    for i in (1, 3, 4):
        sharded_args[i] = jax.device_put(args[i], rows)
    sharded_args[6] = jax.device_put(keys, rows)
    sharded = run(*sharded_args)
    assert len(sharded.sharding.device_set) == 8
    np.testing.assert_allclose(np.asarray(sharded), np.asarray(single), atol=1e-6)


@pytest.mark.parametrize("order", [2, 3])
@pytest.mark.parametrize(
    "grid",
    [
        time_grids.flow_grid(12, shift=3.0),
        time_grids.continuous_grid(schedules.LogSNRSchedule("cosine"), 12),
        time_grids.sigma_grid(SCHED, 20, space="vp", dpm_spacing=True, lower_order_final=False),
    ],
    ids=["flow", "continuous", "sigma"],
)
def test_dpm_solver_lands_clean_at_first_order(order, grid):
    """The step onto a clean state (sigma' = 0) has no h to extrapolate over: whatever the
    grid allows, it returns the last x0 prediction. The prediction here moves with t, so a
    higher-order term there would show."""
    target = jnp.asarray(_x0())

    def denoise(z, i, t, alpha, sigma):
        x0 = target * (1.0 + t / 1000.0)
        return samplers.Denoised(x0, (z - alpha * x0) / sigma, None)

    assert grid.sigma_next[-1] == 0 and grid.max_order[-1] == 1
    z = grid.init_sigma * jnp.asarray(_eps())
    grid = grid._replace(max_order=np.full(grid.num_steps, 3, np.int32))
    out = samplers.dpm_solver_pp(denoise, z, grid, order=order)
    np.testing.assert_allclose(out, target * (1.0 + grid.t[-1] / 1000.0), rtol=1e-6, atol=1e-6)
