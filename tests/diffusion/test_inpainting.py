"""Image-to-image, masked sampling (inpainting) and RePaint as options of every sampler.

The network is the exact denoiser of a Gaussian data distribution, x0 ~ N(mu, s^2) per
pixel: E[x0 | z] = mu + alpha s^2 (z - alpha mu) / (alpha^2 s^2 + sigma^2).
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from imagen_jax.diffusion import config, samplers, time_grids

SHAPE = (2, 6, 6, 3)
DATA_STD = 0.5
MU = jnp.asarray(np.random.default_rng(0).uniform(-0.5, 0.5, SHAPE[1:]), jnp.float32)
# Every sampler on a discrete schedule's own grid, and the ones that also run on VP
# (continuous) and flow grids there.
CASES = [(name, "scaled_linear") for name in samplers.SAMPLERS if name != "flow_euler"] + [
    ("flow_euler", "flow"),
    ("ddim", "flow"),
    ("dpmpp_2m", "flow"),
    ("ddim", "cosine"),
    ("unipc", "cosine"),
]
ON_OWN_GRID = CASES[: len(samplers.SAMPLERS)]  # every sampler once, on its usual grid
# A few of every kind (ancestral, ODE on VP / VE / flow, multistep, second order), where
# each case costs a compilation and the property does not depend on the update rule.
SOME = [
    ("ddpm", "scaled_linear"),
    ("euler", "scaled_linear"),
    ("heun", "scaled_linear"),
    ("dpmpp_2m_sde", "scaled_linear"),
    ("unipc", "scaled_linear"),
    ("flow_euler", "flow"),
]


def gaussian_denoiser(z, step, t, alpha, sigma):
    del step, t
    x0 = MU + alpha * DATA_STD**2 * (z - alpha * MU) / (alpha**2 * DATA_STD**2 + sigma**2)
    return samplers.Denoised(x0, (z - alpha * x0) / sigma, None)


@functools.cache
def _grid(sampler, schedule, steps=8):
    diffusion = config.diffusion_config(schedule=schedule, prediction="eps")
    sample = config.sample_config(sampler=sampler, steps=steps)
    return config.make_time_grid(config.make_schedule(diffusion), sample)


def _images(shape=SHAPE):
    rng = np.random.default_rng(1)
    x_known = jnp.asarray(rng.uniform(-1, 1, shape), jnp.float32)
    mask = np.zeros((*shape[:-1], 1), np.float32)
    mask[:, 1:4, 2:5] = 1.0  # regenerate a square, keep the rest
    noise = jnp.asarray(rng.normal(size=shape), jnp.float32)
    return x_known, jnp.asarray(mask), noise


def _keys(n=SHAPE[0], seed=0):
    return jax.random.split(jax.random.key(seed), n)


@functools.partial(jax.jit, static_argnames=("sampler", "options"))
def _run(z, grid, key, images, *, sampler, options=()):
    fn = samplers.get_sampler(sampler)
    return fn(gaussian_denoiser, z, grid, key=key, **images, **dict(options))


def _sample(sampler, schedule, images, key=None, *, z=None, **options):
    grid = _grid(sampler, schedule)
    if z is None:
        z = grid.init_sigma * _images()[2]
    key = _keys() if key is None else key
    out = _run(z, grid, key, images, sampler=sampler, options=tuple(sorted(options.items())))
    return np.asarray(out)


@pytest.mark.parametrize(
    "sampler,schedule,repaint",
    [(*case, {}) for case in CASES]
    + [(*case, dict(repaint_jump=3, repaint_resample=2)) for case in SOME]
    + [(*case, dict(known_region="clean")) for case in SOME],
)
def test_masked_sampling_keeps_the_known_region_exactly(sampler, schedule, repaint):
    x_known, mask, _ = _images()
    out = _sample(sampler, schedule, dict(x_known=x_known, mask=mask), **repaint)
    keep = np.broadcast_to(np.asarray(mask) == 0, SHAPE)
    np.testing.assert_array_equal(out[keep], np.asarray(x_known)[keep])
    assert np.all(np.isfinite(out))
    # The masked region is generated: near the data's mean, not the known image.
    assert np.abs(out - np.asarray(x_known))[~keep].mean() > 0.2
    np.testing.assert_allclose(
        out[~keep].mean(), np.broadcast_to(MU, SHAPE)[~keep].mean(), atol=0.2
    )


@pytest.mark.parametrize("sampler,schedule", SOME)
def test_strength_zero_is_the_init_and_one_is_plain_sampling(sampler, schedule):
    x_init, _, _ = _images()
    np.testing.assert_array_equal(
        _sample(sampler, schedule, dict(x_init=x_init), strength=0.0), np.asarray(x_init)
    )
    plain = _sample(sampler, schedule, {})
    np.testing.assert_array_equal(
        _sample(sampler, schedule, dict(x_init=x_init), strength=1.0), plain
    )


@pytest.mark.parametrize(
    "sampler,schedule",
    [("ddim", "scaled_linear"), ("euler", "scaled_linear"), ("flow_euler", "flow")],
)
def test_img2img_starts_from_the_init_at_the_first_kept_level(sampler, schedule):
    """VP, VE (init_sigma > 1) and flow grids: the last int(N s) steps, from alpha x + sigma eps
    with eps the noise of the pure-noise start."""
    grid = _grid(sampler, schedule)
    x_init, _, eps = _images()
    z = grid.init_sigma * eps
    sliced, start = samplers.img2img_start(grid, z, x_init, 0.4)
    k = time_grids.strength_start(grid.num_steps, 0.4)
    assert k == 5 and sliced.num_steps == 3
    np.testing.assert_array_equal(sliced.t, grid.t[k:])
    np.testing.assert_allclose(start, grid.alpha[k] * x_init + grid.sigma[k] * eps, atol=1e-6)
    assert samplers.img2img_start(grid, z, x_init, 0.1) == (None, x_init)  # int(8 * 0.1) = 0
    halfway = _sample(sampler, schedule, dict(x_init=x_init), strength=0.5)
    assert np.abs(halfway - _sample(sampler, schedule, {})).mean() > 1e-2
    assert np.abs(halfway - np.asarray(x_init)).mean() > 1e-2


@pytest.mark.parametrize("sampler", ["ddpm", "heun", "unipc"])
def test_an_image_does_not_depend_on_its_batch_placement(sampler):
    x_known, mask, noise = _images((3, *SHAPE[1:]))
    keys, order = _keys(3, seed=5), np.array([2, 0, 1])
    grid = _grid(sampler, "scaled_linear")
    run = functools.partial(
        _sample, sampler, "scaled_linear", repaint_jump=3, repaint_resample=2, strength=0.8
    )
    images = dict(x_known=x_known, mask=mask, x_init=x_known)
    out = run(images, keys, z=grid.init_sigma * noise)
    moved = run(
        {k: v[order] for k, v in images.items()}, keys[order], z=grid.init_sigma * noise[order]
    )
    np.testing.assert_allclose(moved, out[order], atol=1e-6)


@pytest.mark.parametrize("sampler,schedule", SOME)
def test_repaint_with_one_resample_is_plain_masked_sampling(sampler, schedule):
    x_known, mask, _ = _images()
    images = dict(x_known=x_known, mask=mask)
    plain = _sample(sampler, schedule, images)
    np.testing.assert_array_equal(
        _sample(sampler, schedule, images, repaint_jump=3, repaint_resample=1), plain
    )


def test_repaint_schedule():
    """Blocks of 3 from the end of 7 steps: [0, 1) once (no jump back to pure noise), then
    [1, 4) and [4, 7) twice each, each repeat after a jump back to the block's first level."""
    s = samplers.repaint_schedule(7, 3, 2)
    np.testing.assert_array_equal(s.step, [0, 1, 2, 3, 1, 1, 2, 3, 4, 5, 6, 4, 4, 5, 6])
    jump = np.zeros(15, bool)
    jump[[4, 11]] = True
    np.testing.assert_array_equal(s.jump, jump)
    np.testing.assert_array_equal(s.source[jump], [3, 6])
    np.testing.assert_array_equal(s.fresh, [0, 1, 2, 3, 4, 0, 1, 2, 3, 4, 5, 6, 0, 1, 2])
    plain = samplers.repaint_schedule(7, 3, 1)
    np.testing.assert_array_equal(plain.step, np.arange(7))
    np.testing.assert_array_equal(plain.fresh, np.arange(7))


def test_repaint_keeps_the_data_distribution():
    """With the exact denoiser and nothing kept, a jump by the forward process and the steps
    back keep the distribution: the spread stays that of plain sampling (itself a little under
    the data's std, as 20 ancestral steps are)."""
    shape = (128, *SHAPE[1:])
    grid = _grid("ddpm", "scaled_linear", steps=20)
    noise = jnp.asarray(np.random.default_rng(3).normal(size=shape), jnp.float32)
    images = dict(x_known=jnp.zeros(shape), mask=jnp.ones((*shape[:-1], 1)))
    run = functools.partial(_run, noise, grid, _keys(shape[0]), images, sampler="ddpm")
    plain = np.asarray(run())
    resampled = np.asarray(run(options=(("repaint_jump", 4), ("repaint_resample", 4))))
    assert np.abs(resampled - plain).mean() > 0.1
    std = [(out - np.asarray(MU)).std() for out in (plain, resampled)]
    np.testing.assert_allclose(std[1], std[0], rtol=0.05)
    np.testing.assert_allclose(std, DATA_STD, rtol=0.2)
    np.testing.assert_allclose((resampled - np.asarray(MU)).mean(), 0.0, atol=0.02)


def test_compiled_once_per_setting():
    traces = []

    def model_fn(z, t, cond):
        traces.append(1)
        return 0.1 * z

    run = samplers.compile_sampler(
        lambda params, z, t, cond: model_fn(z, t, cond),
        sampler="dpmpp_2m",
        sampler_options=dict(repaint_jump=2, repaint_resample=2),
    )
    grid = _grid("dpmpp_2m", "scaled_linear")
    x_known, mask, noise = _images()
    for seed in range(3):
        out = run(None, noise, grid, None, key=_keys(seed=seed), x_known=x_known + seed, mask=mask)
        keep = np.broadcast_to(np.asarray(mask) == 0, SHAPE)
        np.testing.assert_array_equal(np.asarray(out)[keep], np.asarray(x_known + seed)[keep])
    assert len(traces) == 1


@pytest.mark.parametrize(
    "options,message",
    [
        (dict(strength=1.5), r"strength must be a number in \[0, 1\], got 1.5"),
        (dict(strength=-0.1), r"strength must be a number in \[0, 1\], got -0.1"),
        (dict(strength=0.5, x_init=None), "strength=0.5 needs x_init"),
        (dict(mask=jnp.ones((2, 6, 5, 1))), r"mask has shape \(2, 6, 5, 1\); expected"),
        (dict(mask=jnp.full((2, 6, 6, 1), 1.5)), r"mask values must be in \[0, 1\], got min 1.5"),
        (
            dict(mask=jnp.full((2, 6, 6, 1), jnp.nan)),
            "mask values must be in .*got min nan max nan",
        ),
        (dict(mask=None), "needs both x_known and mask; got only x_known"),
        (dict(x_known=jnp.ones((2, 6, 6, 1))), r"x_known has shape \(2, 6, 6, 1\)"),
        (dict(x_init=jnp.ones((1, 6, 6, 3))), r"x_init has shape \(1, 6, 6, 3\)"),
        (dict(repaint_jump=-1), "repaint_jump must be an integer >= 0, got -1"),
        (dict(repaint_jump=2, repaint_resample=0), "repaint_resample must be an integer >= 1"),
        (dict(repaint_resample=3), "repaint_resample=3 needs repaint_jump >= 1"),
        (dict(x_known=None, mask=None, repaint_jump=2), "repaint_jump=2 needs x_known and mask"),
        (dict(key=None), "masked sampling draws the known region's noise: pass `key`"),
        (dict(known_region="blurred"), "known_region='blurred'; expected one of"),
        (dict(x_known=None, mask=None, known_region="clean"), "'clean' needs x_known and mask"),
    ],
)
def test_bad_input_is_named(options, message):
    x_known, mask, noise = _images()
    kwargs = dict(x_known=x_known, mask=mask, x_init=x_known, key=_keys())
    kwargs.update(options)
    with pytest.raises(ValueError, match=message):
        samplers.ddim(gaussian_denoiser, noise, _grid("ddim", "scaled_linear"), **kwargs)


def test_preview_of_an_img2img_run_reports_its_steps():
    seen = []
    grid = _grid("ddim", "scaled_linear")
    x_init, _, noise = _images()
    samplers.sample(
        lambda z, t, c: 0.1 * z,
        noise,
        grid,
        sampler="ddim",
        preview=lambda i, x0: seen.append(int(i)),
        sampler_options=dict(x_init=x_init, strength=0.5),
    )
    assert seen == [0, 1, 2, 3]
