"""The diffusion/sample config groups build every schedule and sampler combination."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from imagen_jax.diffusion import config, samplers

NOT_FLOW = [
    "ddpm",
    "ddim",
    "euler",
    "euler_ancestral",
    "heun",
    "dpmpp_2m",
    "dpmpp_2m_sde",
    "dpmpp_3m",
    "unipc",
]
SAMPLERS_BY_SCHEDULE = {
    "scaled_linear": NOT_FLOW,
    "cosine": NOT_FLOW,
    "flow": ["flow_euler", "ddim", "dpmpp_2m", "dpmpp_2m_sde", "dpmpp_3m"],
}
CASES = [(s, n) for s, names in SAMPLERS_BY_SCHEDULE.items() for n in names]


def _x0_model(z, t, cond):
    """Predicts a fixed image whatever the noise; every sampler must then end on it."""
    del t
    return jnp.broadcast_to(cond[:, None, None, :], z.shape)


@pytest.mark.parametrize("schedule,sampler", CASES)
def test_every_combination_samples_to_the_predicted_image(schedule, sampler):
    diffusion = config.diffusion_config(
        schedule=schedule, prediction="x0", beta_start=0.00085, beta_end=0.012
    )
    # 5 divides 1000: DDIM's last step (t - T // N) then lands on alpha = 1.
    sample = config.sample_config(sampler=sampler, steps=5, karras=sampler == "heun")
    s = config.make_sampling(diffusion, sample)
    cond = jnp.asarray([[0.5, -0.25, 0.1], [0.0, 0.3, -0.7]])
    z = s.grid.init_sigma * jax.random.normal(jax.random.key(0), (2, 4, 4, 3))
    out = samplers.sample(
        _x0_model,
        z,
        s.grid,
        sampler=s.sampler,
        cond=cond,
        uncond=cond,
        guidance_scale=s.guidance_scale,
        key=jax.random.key(1),
        sampler_options=s.sampler_options,
        **s.denoiser_options,
    )
    np.testing.assert_allclose(out, np.broadcast_to(cond[:, None, None, :], out.shape), atol=1e-4)


@pytest.mark.parametrize("schedule", ["scaled_linear", "cosine"])
def test_part_way_slices(schedule):
    diffusion = config.diffusion_config(schedule=schedule)
    full = config.make_sampling(diffusion, config.sample_config(steps=20)).grid
    img2img = config.make_sampling(diffusion, config.sample_config(steps=20, strength=0.5)).grid
    assert img2img.num_steps == 10
    np.testing.assert_array_equal(img2img.t, full.t[10:])
    base = config.make_sampling(diffusion, config.sample_config(steps=20, denoising_end=0.75))
    refiner = config.make_sampling(diffusion, config.sample_config(steps=20, denoising_start=0.75))
    assert base.grid.num_steps + refiner.grid.num_steps == 20
    np.testing.assert_array_equal(np.concatenate([base.grid.t, refiner.grid.t]), full.t)


def test_bad_values_raise():
    with pytest.raises(KeyError, match="unknown config keys \\['samplr'\\]"):
        config.sample_config(samplr="ddim")
    with pytest.raises(ValueError, match="unknown diffusion.schedule 'cosin'"):
        config.make_schedule(config.diffusion_config(schedule="cosin"))
    with pytest.raises(ValueError, match="unknown sample.sampler 'dpm'"):
        config.sample_config(sampler="dpm")
    with pytest.raises(ValueError, match="needs diffusion.schedule='flow'"):
        config.make_sampling(config.diffusion_config(), config.sample_config(sampler="flow_euler"))
    with pytest.raises(ValueError, match="cannot start from pure noise"):
        config.make_sampling(
            config.diffusion_config(schedule="flow"), config.sample_config(sampler="heun")
        )
    with pytest.raises(ValueError, match="sample.steps must be an integer >= 1, got 0"):
        config.sample_config(steps=0)
    sample = config.sample_config()
    sample.steps = 0  # changed after the group was made: make_sampling checks again
    with pytest.raises(ValueError, match="sample.steps must be an integer >= 1, got 0"):
        config.make_sampling(config.diffusion_config(), sample)
    with pytest.raises(ValueError, match=r"sample.guidance_scale=-1.0: expected a number in \[0"):
        config.sample_config(guidance_scale=-1.0)
    with pytest.raises(ValueError, match=r"sample.strength=0.0: expected a number in \(0"):
        config.sample_config(strength=0.0)
