"""Schedules against diffusers' tables and against their closed forms."""

import math

import diffusers
import jax.numpy as jnp
import numpy as np
import pytest
import torch

from imagen_jax.diffusion import schedules, time_grids


@pytest.mark.parametrize(
    "name,kw",
    [
        ("linear", {}),
        ("scaled_linear", dict(beta_start=0.00085, beta_end=0.012)),
        ("squaredcos_cap_v2", {}),
    ],
)
@pytest.mark.parametrize("zero_snr", [False, True])
def test_beta_schedules_match_diffusers(name, kw, zero_snr):
    ref = diffusers.EulerDiscreteScheduler(
        beta_schedule=name, rescale_betas_zero_snr=zero_snr, **kw
    )
    ours = schedules.DiscreteSchedule.from_config(name, zero_terminal_snr=zero_snr, **kw)
    np.testing.assert_allclose(
        ours.alphas_cumprod, ref.alphas_cumprod.numpy(), rtol=2e-6, atol=1e-7
    )
    # sigma = sqrt((1 - ac) / ac): where ac is near 1, a last-bit float32 difference in ac
    # (torch vs numpy, and torch's kernels differ between CPUs) is a large relative change
    # of sigma. Compared as sigma^2 with an absolute slack of a few float32 ulps of 1.
    np.testing.assert_allclose(
        ours.ve_sigmas**2, ref.sigmas.numpy()[:-1][::-1] ** 2, rtol=3e-4, atol=5e-7
    )


def test_karras_sigmas_match_diffusers():
    ref = diffusers.EulerDiscreteScheduler(use_karras_sigmas=True)
    expected = ref._convert_to_karras(torch.tensor([14.6, 0.03]), 12)
    got = schedules.karras_sigmas(12, sigma_min=0.03, sigma_max=14.6)
    np.testing.assert_allclose(got, expected, rtol=1e-6)
    assert got[0] == pytest.approx(14.6) and got[-1] == pytest.approx(0.03)


@pytest.mark.parametrize("name", ["cosine", "shifted_cosine", "linear"])
def test_logsnr_schedule_closed_forms(name):
    sched = (
        schedules.LogSNRSchedule.shifted_cosine(resolution=256)
        if name == "shifted_cosine"
        else schedules.LogSNRSchedule(name)
    )
    t = jnp.linspace(0.02, 0.98, 49)
    logsnr = sched.logsnr(t)
    assert np.all(np.diff(np.asarray(logsnr)) < 0)  # noise increases with t
    np.testing.assert_allclose(sched.t_from_logsnr(logsnr), t, atol=2e-5)
    alpha, sigma = sched.alpha_sigma(t)
    np.testing.assert_allclose(alpha**2 + sigma**2, 1.0, atol=1e-6)
    np.testing.assert_allclose(jnp.log(alpha**2 / sigma**2), logsnr, rtol=1e-4, atol=1e-4)
    if name == "linear":  # imagen-pytorch's beta_linear_log_snr
        expected = -np.log(np.expm1(1e-4 + 10 * np.asarray(t, np.float64) ** 2))
        np.testing.assert_allclose(logsnr, expected, rtol=1e-5)
    if name == "cosine":  # alpha = cos(pi t / 2), up to the clipping of logsnr to [-20, 20]
        np.testing.assert_allclose(alpha, np.cos(np.pi * np.asarray(t) / 2), atol=1e-4)
    if name == "shifted_cosine":  # simple diffusion: shifted by 2 log(64 / 256)
        base = schedules.LogSNRSchedule("cosine").logsnr(t)
        np.testing.assert_allclose(logsnr - base, 2 * math.log(64 / 256), atol=1e-5)


def test_logsnr_is_clipped_to_its_range():
    sched = schedules.LogSNRSchedule("cosine", logsnr_min=-15.0, logsnr_max=15.0)
    np.testing.assert_allclose(sched.logsnr(jnp.array([0.0, 1.0])), [15.0, -15.0], atol=1e-3)


@pytest.mark.parametrize("shift", [1.0, 3.0])
def test_flow_shift_matches_diffusers(shift):
    ref = diffusers.FlowMatchEulerDiscreteScheduler(shift=shift)
    t = np.linspace(1.0, 0.001, 1000).astype(np.float32)
    np.testing.assert_allclose(
        schedules.flow_time_shift(t, shift=shift), ref.sigmas.numpy(), rtol=1e-5
    )


def test_dynamic_flow_shift_matches_diffusers():
    from diffusers.pipelines.flux.pipeline_flux import calculate_shift

    mu = schedules.flow_dynamic_shift(1024)
    assert mu == pytest.approx(calculate_shift(1024))
    ref = diffusers.FlowMatchEulerDiscreteScheduler(use_dynamic_shifting=True)
    ref.set_timesteps(20, mu=mu)
    grid = time_grids.flow_grid(20, shift=math.exp(mu), dynamic=True)
    np.testing.assert_allclose(grid.sigma, ref.sigmas.numpy()[:-1], rtol=1e-5)
    np.testing.assert_allclose(grid.t, ref.timesteps.numpy(), rtol=1e-5)


@pytest.mark.parametrize("spacing", ["uniform", "karras"])
def test_continuous_grid_runs_from_noise_to_clean(spacing):
    sched = schedules.LogSNRSchedule("cosine")
    grid = time_grids.continuous_grid(sched, 16, spacing=spacing)
    assert grid.sigma_next[-1] == 0.0 and grid.alpha_next[-1] == 1.0
    np.testing.assert_array_equal(grid.alpha[1:], grid.alpha_next[:-1])
    assert np.all(np.diff(grid.sigma) < 0)
    if spacing == "uniform":
        assert grid.t[0] == pytest.approx(1.0, abs=1e-5)
    else:  # EDM's sigma_max = 80
        assert grid.sigma[0] / grid.alpha[0] == pytest.approx(80.0, rel=1e-3)
