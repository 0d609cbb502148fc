"""Samplers: each one `lax.scan` over the static steps of a `TimeGrid`.

Every sampler has the same contract (as in k-diffusion's `sampling.py`):

    sampler(denoise, z, grid, *, key=None, callback=None, **options) -> z_final

`denoise(z, step, t, alpha, sigma) -> Denoised(x0, eps, var_values)` wraps the network (see
`make_denoiser`); `z` starts at the grid's first level (pure noise: `grid.init_sigma * noise`).
The update rules are written for a state z = alpha x0 + sigma eps at any scaling, so the same
sampler runs on VP, VE and flow grids. Stochastic samplers draw step i's noise from
`step_noise(key, i, shape)`; `key` may be one key or one key per batch row, which makes an
image independent of the batch it is placed in.

Every sampler also takes the editing options of `editable`: image-to-image (`x_init`,
`strength`), masked sampling (`x_known`, `mask`) and RePaint's resampling (`repaint_jump`,
`repaint_resample`).
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from imagen_jax.diffusion import guidance as guidance_lib
from imagen_jax.diffusion import parameterization as param_lib
from imagen_jax.diffusion import time_grids
from imagen_jax.diffusion.time_grids import TimeGrid


class Denoised(NamedTuple):
    x0: jax.Array
    eps: jax.Array
    var_values: jax.Array | None  # learned-range variance outputs, else None


# ----------------------------------------------------------------------------------------------
# The network as a denoiser
# ----------------------------------------------------------------------------------------------


def make_denoiser(
    model_fn: Callable,
    *,
    cond,
    prediction: str = "eps",  # eps | x0 | v | flow
    model_space: str = "vp",  # vp | flow: the scaling the network was trained in
    uncond=None,
    guidance_scale=None,  # scalar or [N]; None disables guidance
    guidance_rescale: float = 0.0,
    learned_variance: bool = False,
    clip_x0: float | None = None,  # static clipping of x0 to [-c, c]
    dynamic_threshold: tuple[float, float] | None = None,  # (percentile, max_value)
) -> Callable:
    """Turns `model_fn(z_t, t, cond) -> prediction` into a sampler's `denoise`.

    The network sees its input scaled into its own space and a time of shape [B]. A clipped
    or thresholded x0 gives back a consistent eps, so every sampler uses the clipped x0.
    """
    param_lib.check_prediction(prediction)
    guided = guidance_scale is not None
    if guided and uncond is None:
        raise ValueError("guidance_scale was given without `uncond` (the null or negative cond)")

    def network(z_in, step, t_batch):
        if not guided:
            return model_fn(z_in, t_batch, cond)
        scale = jnp.asarray(guidance_scale, jnp.float32)
        w = scale[step] if scale.ndim else scale  # a per-step schedule is indexed by step
        guided_fn = guidance_lib.cfg_model(
            model_fn,
            uncond=uncond,
            guidance_scale=w,
            guidance_rescale=guidance_rescale,
            pred_channels=z_in.shape[-1] if learned_variance else None,
        )
        return guided_fn(z_in, t_batch, cond)

    def denoise(z, step, t, alpha, sigma):
        c = param_lib.network_scale(model_space, alpha=alpha, sigma=sigma)
        z_in, a_in, s_in = c * z, c * alpha, c * sigma
        t_batch = jnp.broadcast_to(jnp.asarray(t, jnp.float32), (z.shape[0],))
        out = network(z_in, step, t_batch)
        var_values = None
        if learned_variance:
            out, var_values = param_lib.split_variance(out, z.shape[-1])
        x0, eps = param_lib.to_x0_eps(prediction, out, z_t=z_in, alpha_t=a_in, sigma_t=s_in)
        if dynamic_threshold is not None or clip_x0 is not None:
            if dynamic_threshold is not None:
                percentile, max_value = dynamic_threshold
                x0 = guidance_lib.dynamic_threshold(x0, percentile=percentile, max_value=max_value)
            else:
                x0 = guidance_lib.static_clip(x0, clip_range=clip_x0)
            eps = param_lib.eps_from_x0(x0, z_t=z_in, alpha_t=a_in, sigma_t=s_in)
        return Denoised(x0, eps, var_values)

    return denoise


# ----------------------------------------------------------------------------------------------
# The scan driver
# ----------------------------------------------------------------------------------------------


def _as_key(key):
    if key is None:
        raise ValueError("this sampler is stochastic: pass `key`")
    if not jnp.issubdtype(key.dtype, jax.dtypes.prng_key):
        key = jax.random.wrap_key_data(key)
    return key


def step_noise(key, step, shape, dtype=jnp.float32):
    """Standard normal noise of step `step`. With one key per batch row ([B] typed keys or
    [B, 2] raw keys) each row's noise depends on its own key only."""
    key = _as_key(key)
    if key.ndim == 0:
        return jax.random.normal(jax.random.fold_in(key, step), shape, dtype)
    if key.shape[0] != shape[0]:
        raise ValueError(f"got {key.shape[0]} keys for a batch of {shape[0]}")
    keys = jax.vmap(jax.random.fold_in, in_axes=(0, None))(key, step)
    return jax.vmap(lambda k: jax.random.normal(k, shape[1:], dtype))(keys)


class Step(NamedTuple):
    """One step's slice of the grid, as the scan body sees it."""

    i: jax.Array
    t: jax.Array
    alpha: jax.Array
    sigma: jax.Array
    alpha_next: jax.Array
    sigma_next: jax.Array
    t_next: jax.Array
    max_order: jax.Array
    draw: jax.Array  # index of this step's noise draws (i, unless RePaint repeats steps)
    fresh: jax.Array  # steps since the (re)start: multistep solvers warm up from it


def _run(body, carry, grid: TimeGrid, callback, trajectory: bool, masking=None):
    """Scans `body(carry, step) -> carry` over the grid, the sample first in the carry.
    `callback(i)` reports progress from inside the compiled loop; with `trajectory` the
    sample after every scan entry is returned too, as [E, *shape] (E = N steps, or RePaint's
    entries). With `masking` (see `editable`) the kept region is put back after every step,
    and RePaint's schedule is scanned instead of the grid's steps when `masking.jump` is set."""
    n = grid.num_steps
    sample_of = lambda c: c[0] if isinstance(c, tuple) else c  # noqa: E731

    def with_sample(c, z):
        return (z, *c[1:]) if isinstance(c, tuple) else z

    def step(carry, st):
        carry = body(carry, st)
        if masking is not None:
            z = sample_of(carry)
            carry = with_sample(carry, _keep_known(masking, z, st.alpha_next, st.sigma_next, st))
        if callback is not None:
            jax.debug.callback(callback, st.i)
        return carry

    if masking is None or not masking.jump:
        i = jnp.arange(n)
        xs = Step(i, *(jnp.asarray(a) for a in grid[:-1]), draw=i, fresh=i)

        def scan_body(carry, st):
            carry = step(carry, st)
            return carry, (sample_of(carry) if trajectory else None)

    else:
        xs = _repaint_xs(grid, masking)

        def scan_body(carry, x):
            st, is_jump, alpha_from, sigma_from = x

            def jump(c):
                z = sample_of(c)
                return with_sample(c, _forward(masking, z, alpha_from, sigma_from, st))

            carry = jax.lax.cond(is_jump, jump, lambda c: step(c, st), carry)
            return carry, (sample_of(carry) if trajectory else None)

    carry, zs = jax.lax.scan(scan_body, carry, xs)
    return (sample_of(carry), zs) if trajectory else sample_of(carry)


def _repaint_xs(grid: TimeGrid, masking):
    """The scan's inputs of RePaint's schedule: (Step, is_jump, alpha_from, sigma_from) per
    entry; a jump leaves the level where its block's last step landed."""
    entries = repaint_schedule(grid.num_steps, masking.jump, masking.resample)
    at = lambda a, idx: jnp.asarray(a)[idx]  # noqa: E731
    st = Step(
        jnp.asarray(entries.step),
        *(at(a, entries.step) for a in grid[:-1]),
        draw=jnp.arange(len(entries.step)),
        fresh=jnp.asarray(entries.fresh),
    )
    source = entries.source
    return st, jnp.asarray(entries.jump), at(grid.alpha_next, source), at(grid.sigma_next, source)


def _ve(alpha, sigma):
    """The variance-exploding level sigma / alpha of a state."""
    return sigma / alpha


# ----------------------------------------------------------------------------------------------
# Editing: image-to-image, masked sampling (inpainting) and RePaint, as options of every sampler
# ----------------------------------------------------------------------------------------------

_EDIT_OPTIONS = (
    "x_init",
    "strength",
    "x_known",
    "mask",
    "repaint_jump",
    "repaint_resample",
    "known_region",
)
KNOWN_REGIONS = ("noised", "clean")
_KNOWN_STREAM, _JUMP_STREAM = 1 << 30, (1 << 30) + 1  # apart from the samplers' step indices


class Masking(NamedTuple):
    """What a masked run carries into its scan (built by `editable` from the options)."""

    x_known: jax.Array  # [B, ...] the known image, in the sampler's x0 space
    mask: jax.Array  # z's shape, or one channel: 1 = regenerate, 0 = keep
    known_key: jax.Array  # noise of the known region, `step_noise` of step draw
    jump_key: jax.Array  # noise of RePaint's jumps back up
    jump: int  # RePaint's jump length in steps; 0 = off
    resample: int  # how often each block of `jump` steps is run
    clean: bool = False  # the kept region is x_known itself at every level (not re-noised)


class RepaintSchedule(NamedTuple):
    """One scan entry per step or jump, host-built (see `repaint_schedule`)."""

    step: np.ndarray  # [E] grid step of a step entry; a jump's block start (its target level)
    jump: np.ndarray  # [E] bool: a jump back up, not a step
    source: np.ndarray  # [E] a jump leaves the level where this step landed
    fresh: np.ndarray  # [E] steps since the start or the last jump


def _stream(key, stream: int):
    """A key (one, or one per batch row) of its own noise stream."""
    key = _as_key(key)
    if key.ndim == 0:
        return jax.random.fold_in(key, stream)
    return jax.vmap(jax.random.fold_in, in_axes=(0, None))(key, stream)


def _blend(mask, z_free, z_kept):
    # mask * a + (1 - mask) * b is exact at both ends: b where mask = 0, a where mask = 1.
    return mask * z_free + (1.0 - mask) * z_kept


def _keep_known(masking: Masking, z, alpha, sigma, st: Step):
    """z with its kept region replaced by the known image at level (alpha, sigma), noised by
    step `st.draw`'s known-region noise: alpha x_known + sigma noise (`masking.clean`:
    x_known itself)."""
    if masking.clean:
        return _blend(masking.mask, z, masking.x_known)
    noise = step_noise(masking.known_key, st.draw, z.shape, z.dtype)
    return _blend(masking.mask, z, alpha * masking.x_known + sigma * noise)


def _forward(masking: Masking, z, alpha_from, sigma_from, st: Step):
    """The forward process q(z_to | z_from) from level (alpha_from, sigma_from) up to the
    step's own level (st.alpha, st.sigma): z_to = r z + sqrt(sigma_to^2 - r^2 sigma_from^2)
    noise with r = alpha_to / alpha_from (VP, VE and flow states alike)."""
    ratio = st.alpha / alpha_from
    std = jnp.sqrt(jnp.maximum(st.sigma**2 - (ratio * sigma_from) ** 2, 0.0))
    return ratio * z + std * step_noise(masking.jump_key, st.draw, z.shape, z.dtype)


def repaint_schedule(num_steps: int, jump: int, resample: int) -> RepaintSchedule:
    """RePaint's resampling schedule (Lugmayr et al. 2022, sec. 4.2 and their code's
    `get_schedule_jump` with jump_length = `jump`, jump_n_sample = `resample`) on a grid.

    The steps are cut into blocks of `jump` from the grid's end (the last block lands on the
    grid's last level; the first may be shorter). Each block is run `resample` times: after
    a run, the state is noised back up to the block's first level by the forward process
    (one jump of `jump` steps, as the paper's `jump_length` single forward steps compose)
    and the block is run again. As in the paper, no jump goes back to the first level (the
    pure-noise start), so the first block runs once. `resample=1` is plain masked sampling.
    """
    ends = list(range(num_steps, 0, -jump))[::-1]
    step, is_jump, source, fresh, since = [], [], [], [], 0
    for end in ends:
        start = max(end - jump, 0)
        runs = resample if start > 0 else 1
        for r in range(runs):
            for k in range(start, end):
                step.append(k), is_jump.append(False), source.append(k), fresh.append(since)
                since += 1
            if r < runs - 1:
                step.append(start), is_jump.append(True), source.append(end - 1)
                fresh.append(since)
                since = 0
    return RepaintSchedule(
        np.asarray(step, np.int32),
        np.asarray(is_jump, bool),
        np.asarray(source, np.int32),
        np.asarray(fresh, np.int32),
    )


def _shape(a) -> tuple:
    return tuple(np.shape(a))


def check_editing(
    shape,
    *,
    x_init=None,
    strength=1.0,
    x_known=None,
    mask=None,
    repaint_jump=0,
    repaint_resample=1,
    known_region="noised",
) -> None:
    """Raises one ValueError naming the first bad editing option for samples of `shape`.
    The mask's values are checked where they are concrete (not under jit)."""
    shape = tuple(shape)
    number = isinstance(strength, (int, float, np.number)) and not isinstance(strength, bool)
    if not number or not 0.0 <= strength <= 1.0:
        raise ValueError(f"strength must be a number in [0, 1], got {strength!r}")
    if strength != 1.0 and x_init is None:
        raise ValueError(f"strength={strength!r} needs x_init, the image to start from")
    if x_init is not None and _shape(x_init) != shape:
        raise ValueError(f"x_init has shape {_shape(x_init)}; the samples have {shape}")
    if (x_known is None) != (mask is None):
        given = "x_known" if mask is None else "mask"
        raise ValueError(f"masked sampling needs both x_known and mask; got only {given}")
    for name, value, low in (
        ("repaint_jump", repaint_jump, 0),
        ("repaint_resample", repaint_resample, 1),
    ):
        if not isinstance(value, (int, np.integer)) or isinstance(value, bool) or value < low:
            raise ValueError(f"{name} must be an integer >= {low}, got {value!r}")
    if repaint_resample > 1 and not repaint_jump:
        raise ValueError(f"repaint_resample={repaint_resample} needs repaint_jump >= 1")
    if known_region not in KNOWN_REGIONS:
        raise ValueError(f"known_region={known_region!r}; expected one of {KNOWN_REGIONS}")
    if x_known is None:
        if known_region != "noised":
            raise ValueError(f"known_region={known_region!r} needs x_known and mask")
        if repaint_jump:
            raise ValueError(f"repaint_jump={repaint_jump} needs x_known and mask")
        return
    if _shape(x_known) != shape:
        raise ValueError(f"x_known has shape {_shape(x_known)}; the samples have {shape}")
    if _shape(mask) not in (shape, (*shape[:-1], 1)):
        raise ValueError(f"mask has shape {_shape(mask)}; expected {shape} or {(*shape[:-1], 1)}")
    if not isinstance(mask, jax.core.Tracer):
        values = np.asarray(mask, np.float32)
        if not np.all((values >= 0.0) & (values <= 1.0)):  # NaN fails too
            raise ValueError(
                f"mask values must be in [0, 1], got min {values.min()} max {values.max()}"
            )


def img2img_start(grid: TimeGrid, z, x_init, strength: float):
    """(grid, z) of an image-to-image run (SDEdit, Meng et al. 2022): the last int(N s)
    steps of the grid (`time_grids.strength_start`, diffusers' `get_timesteps`), from x_init
    noised to the first kept level, alpha x_init + sigma noise, where noise = z / init_sigma
    is the noise of the pure-noise start z. Strength 1 is plain sampling from z (x_init
    unused); a strength that keeps no step gives (None, x_init)."""
    if x_init is None or strength == 1.0:
        return grid, z
    n = grid.num_steps
    start = time_grids.strength_start(n, strength) if strength > 0 else n
    if start == n:
        return None, x_init
    sliced = time_grids.slice_grid(grid, start)
    noise = z / grid.init_sigma
    return sliced, sliced.alpha[0] * x_init + sliced.sigma[0] * noise


def editable(sampler: Callable) -> Callable:
    """Gives a sampler the editing options (all keyword, all off by default):

    - `x_init`, `strength` (in [0, 1]): image-to-image (`img2img_start`); `z` stays the
      pure-noise start, and its noise noises `x_init`.
    - `x_known`, `mask` (z's shape or one channel; 1 = regenerate, 0 = keep): masked
      sampling (inpainting). After every step (and at Heun's intermediate point) the kept
      region is replaced by the known image at the level reached, alpha' x_known + sigma'
      noise, the noise drawn from `key` (one key or one per batch row, as `step_noise`, in
      a stream of its own); on a grid that ends clean (alpha' = 1, sigma' = 0) the kept
      region ends equal to x_known exactly. Needs `key`, also for deterministic samplers.
    - `repaint_jump`, `repaint_resample`: RePaint's resampling (`repaint_schedule`), as one
      `lax.scan` over the schedule's entries.
    - `known_region`: "noised" (above) or "clean": the kept region is x_known itself from
      the start and after every step, the network seeing it clean beside the noisy rest
      (diffusers' DeepFloyd IF inpainting pipelines do this).

    Multistep solvers (dpmpp_*, unipc) keep a history that stays consistent with the states
    visited: every history entry is the network's output at the state after the replacement
    (as diffusers' inpainting pipelines do; the updates are elementwise, so the kept
    region's entries never reach the generated region), UniPC's corrector puts the known
    region back into the state it refines, and after a RePaint jump the history restarts
    (first order, no corrector; `Step.fresh`), as it belongs to a lower noise level.

    Strength, jump, resample and the known region are static (a new value compiles a new
    program); the images and the mask are traced. The sampler receives the sliced grid and
    `masking` (a `Masking`, or None), which it passes to `_run`."""

    @functools.wraps(sampler)
    def run(
        denoise,
        z,
        grid: TimeGrid,
        *,
        key=None,
        x_init=None,
        strength=1.0,
        x_known=None,
        mask=None,
        repaint_jump: int = 0,
        repaint_resample: int = 1,
        known_region: str = "noised",
        **options,
    ):
        check_editing(
            z.shape,
            x_init=x_init,
            strength=strength,
            x_known=x_known,
            mask=mask,
            repaint_jump=repaint_jump,
            repaint_resample=repaint_resample,
            known_region=known_region,
        )
        masking = None
        if x_known is not None:
            if key is None:
                raise ValueError("masked sampling draws the known region's noise: pass `key`")
            masking = Masking(
                jnp.asarray(x_known, z.dtype),
                jnp.asarray(mask, z.dtype),
                _stream(key, _KNOWN_STREAM),
                _stream(key, _JUMP_STREAM),
                int(repaint_jump),
                int(repaint_resample),
                known_region == "clean",
            )
        grid, z = img2img_start(grid, z, x_init, strength)
        if masking is not None and masking.clean:
            z = _blend(masking.mask, z, masking.x_known)
        if grid is None:  # no step left to run
            if masking is not None:
                z = _blend(masking.mask, z, masking.x_known)
            return (z, z[None][:0]) if options.get("trajectory") else z
        return sampler(denoise, z, grid, key=key, masking=masking, **options)

    return run


# ----------------------------------------------------------------------------------------------
# Samplers
# ----------------------------------------------------------------------------------------------


@editable
def ddim(
    denoise,
    z,
    grid: TimeGrid,
    *,
    key=None,
    eta: float = 0.0,
    callback=None,
    trajectory=False,
    masking=None,
):
    """DDIM (Song et al. 2021, eq. 12): z_next = alpha' x0 + sqrt(sigma'^2 - s^2) eps + s noise
    with s = eta * sqrt(sigma'^2 (1 - SNR / SNR')); eta = 0 is deterministic, eta = 1 ancestral."""

    def body(z, st):
        d = denoise(z, st.i, st.t, st.alpha, st.sigma)
        snr_ratio = (st.alpha * st.sigma_next) ** 2 / (st.sigma * st.alpha_next) ** 2
        std = eta * jnp.sqrt(jnp.maximum(st.sigma_next**2 * (1.0 - snr_ratio), 0.0))
        direction = jnp.sqrt(jnp.maximum(st.sigma_next**2 - std**2, 0.0))
        z_next = st.alpha_next * d.x0 + direction * d.eps
        if eta:
            z_next = z_next + std * step_noise(key, st.draw, z.shape, z.dtype)
        return z_next

    return _run(body, z, grid, callback, trajectory, masking)


@editable
def ddpm(
    denoise,
    z,
    grid: TimeGrid,
    *,
    key=None,
    variance: str = "fixed_small",
    callback=None,
    trajectory=False,
    masking=None,
):
    """Ancestral sampling from the posterior q(z_next | z, x0) (Ho et al. 2020, eq. 6-7), with
    the variance fixed_small (beta-tilde), fixed_large (beta) or learned_range (Nichol &
    Dhariwal 2021). As in diffusers, no noise is added on a step evaluated at t = 0."""

    def body(z, st):
        d = denoise(z, st.i, st.t, st.alpha, st.sigma)
        coef_z, coef_x0, var_large, var_small = param_lib.posterior(
            alpha=st.alpha, sigma=st.sigma, alpha_next=st.alpha_next, sigma_next=st.sigma_next
        )
        mean = coef_z * z + coef_x0 * d.x0
        log_var = param_lib.posterior_log_variance(
            variance, var_small=var_small, var_large=var_large, var_values=d.var_values
        )
        noise = step_noise(key, st.draw, z.shape, z.dtype)
        return mean + jnp.where(st.t > 0, jnp.exp(0.5 * log_var), 0.0) * noise

    return _run(body, z, grid, callback, trajectory, masking)


@editable
def euler(denoise, z, grid: TimeGrid, *, key=None, callback=None, trajectory=False, masking=None):
    """Euler's method on the probability-flow ODE in the VE variable x = z / alpha
    (Karras et al. 2022, alg. 1 without churn)."""

    def body(z, st):
        d = denoise(z, st.i, st.t, st.alpha, st.sigma)
        dsigma = _ve(st.alpha_next, st.sigma_next) - _ve(st.alpha, st.sigma)
        return st.alpha_next * (z / st.alpha + dsigma * d.eps)

    return _run(body, z, grid, callback, trajectory, masking)


@editable
def euler_ancestral(
    denoise,
    z,
    grid: TimeGrid,
    *,
    key=None,
    eta: float = 1.0,
    callback=None,
    trajectory=False,
    masking=None,
):
    """Euler ancestral (k-diffusion `sample_euler_ancestral`): an Euler step down to
    sigma_down, then fresh noise of std sigma_up, with sigma_down^2 + sigma_up^2 = sigma'^2."""

    def body(z, st):
        d = denoise(z, st.i, st.t, st.alpha, st.sigma)
        s_from, s_to = _ve(st.alpha, st.sigma), _ve(st.alpha_next, st.sigma_next)
        s_up = eta * jnp.sqrt(s_to**2 * (s_from**2 - s_to**2) / s_from**2)
        s_up = jnp.minimum(s_up, s_to)
        s_down = jnp.sqrt(s_to**2 - s_up**2)
        x = z / st.alpha + (s_down - s_from) * d.eps
        x = x + s_up * step_noise(key, st.draw, z.shape, z.dtype)
        return st.alpha_next * x

    return _run(body, z, grid, callback, trajectory, masking)


@editable
def heun(denoise, z, grid: TimeGrid, *, key=None, callback=None, trajectory=False, masking=None):
    """Heun's second-order method (Karras et al. 2022, alg. 1 without churn): an Euler step,
    then the trapezoidal correction, except on a step that lands on sigma = 0."""

    def body(z, st):
        d = denoise(z, st.i, st.t, st.alpha, st.sigma)
        s_from, s_to = _ve(st.alpha, st.sigma), _ve(st.alpha_next, st.sigma_next)
        x = z / st.alpha
        x_euler = x + (s_to - s_from) * d.eps

        def correct(_):
            z_euler = st.alpha_next * x_euler
            if masking is not None:  # the network sees the known region at this level
                z_euler = _keep_known(masking, z_euler, st.alpha_next, st.sigma_next, st)
            d2 = denoise(z_euler, st.i, st.t_next, st.alpha_next, st.sigma_next)
            return x + (s_to - s_from) * 0.5 * (d.eps + d2.eps)

        x_next = jax.lax.cond(st.sigma_next > 0, correct, lambda _: x_euler, None)
        return st.alpha_next * x_next

    return _run(body, z, grid, callback, trajectory, masking)


def _dpm_solver_pp(
    denoise,
    z,
    grid: TimeGrid,
    *,
    order: int = 2,
    key=None,
    sde: bool = False,
    solver_type="midpoint",
    callback=None,
    trajectory=False,
    masking=None,
):
    """Multistep DPM-Solver++ (Lu et al. 2022, "DPM-Solver++", alg. 2 and its third-order
    form, as diffusers' DPMSolverMultistepScheduler) in the data prediction: step i uses
    order min(i + 1, `order`, grid.max_order[i]), so it warms up from first order, and a
    step that lands on a clean state (sigma' = 0) is always first order. `sde=True` is
    SDE-DPM-Solver++(2M) (same paper, appendix; second order at most). solver_type, of the
    second-order update: midpoint (the paper's, diffusers' default) | heun."""
    if solver_type not in ("midpoint", "heun"):
        raise ValueError(f"unknown DPM-Solver solver_type {solver_type!r}")
    if order not in (1, 2, 3) or (sde and order > 2):
        raise ValueError(f"DPM-Solver++ order {order}: expected 1, 2 or 3 (at most 2 with sde)")

    def body(carry, st):
        z, x0_prev, x0_prev2, h_prev, h_prev2 = carry
        d = denoise(z, st.i, st.t, st.alpha, st.sigma)
        landing = st.sigma_next > 0
        # exp(-h) with h = lambda' - lambda, lambda = log(alpha / sigma); 0 when landing clean.
        exp_neg_h = (st.sigma_next * st.alpha) / (st.sigma * st.alpha_next)
        h = jnp.where(landing, -jnp.log(jnp.where(landing, exp_neg_h, 1.0)), 1.0)
        r0 = h_prev / h
        d1 = (d.x0 - x0_prev) / r0
        step_order = jnp.minimum(jnp.minimum(st.fresh + 1, st.max_order), order)
        step_order = jnp.where(landing, step_order, 1)
        if sde:
            exp_neg_2h = exp_neg_h**2
            z_next = (st.sigma_next / st.sigma) * exp_neg_h * z
            z_next = z_next + st.alpha_next * (1.0 - exp_neg_2h) * d.x0
            if solver_type == "midpoint":
                second = 0.5 * st.alpha_next * (1.0 - exp_neg_2h) * d1
            else:
                second = st.alpha_next * ((1.0 - exp_neg_2h) / (-2.0 * h) + 1.0) * d1
            noise = step_noise(key, st.draw, z.shape, z.dtype)
            z_next = z_next + st.sigma_next * jnp.sqrt(1.0 - exp_neg_2h) * noise
        else:
            z_next = (st.sigma_next / st.sigma) * z - st.alpha_next * (exp_neg_h - 1.0) * d.x0
            if solver_type == "midpoint":
                second = -0.5 * st.alpha_next * (exp_neg_h - 1.0) * d1
            else:
                second = st.alpha_next * ((exp_neg_h - 1.0) / h + 1.0) * d1
        z_next = z_next + jnp.where(step_order == 2, second, 0.0)
        if order == 3:  # the first and second differences of the last three x0 (ODE only)
            r1 = h_prev2 / h
            d1_1 = (x0_prev - x0_prev2) / r1
            d2 = (d1 - d1_1) / (r0 + r1)
            third = st.alpha_next * ((exp_neg_h - 1.0) / h + 1.0) * (d1 + r0 * d2)
            third = third - st.alpha_next * ((exp_neg_h - 1.0 + h) / h**2 - 0.5) * d2
            z_next = z_next + jnp.where(step_order == 3, third, 0.0)
        return z_next, d.x0, x0_prev, h, h_prev

    one = jnp.ones((), z.dtype)
    zeros = jnp.zeros_like(z)
    carry = (z, zeros, zeros, one, one)  # (z, the previous two x0, the previous two h)
    return _run(body, carry, grid, callback, trajectory, masking)


dpm_solver_pp = editable(_dpm_solver_pp)


@editable
def dpmpp_2m(
    denoise,
    z,
    grid: TimeGrid,
    *,
    key=None,
    solver_type="midpoint",
    callback=None,
    trajectory=False,
    masking=None,
):
    """DPM-Solver++(2M): `dpm_solver_pp` of order 2."""
    del key
    return _dpm_solver_pp(
        denoise,
        z,
        grid,
        solver_type=solver_type,
        callback=callback,
        trajectory=trajectory,
        masking=masking,
    )


@editable
def dpmpp_2m_sde(
    denoise,
    z,
    grid: TimeGrid,
    *,
    key=None,
    solver_type="midpoint",
    callback=None,
    trajectory=False,
    masking=None,
):
    """SDE-DPM-Solver++(2M): `dpm_solver_pp` of order 2 with `sde=True`."""
    return _dpm_solver_pp(
        denoise,
        z,
        grid,
        key=key,
        sde=True,
        solver_type=solver_type,
        callback=callback,
        trajectory=trajectory,
        masking=masking,
    )


@editable
def dpmpp_3m(
    denoise,
    z,
    grid: TimeGrid,
    *,
    key=None,
    solver_type="midpoint",
    callback=None,
    trajectory=False,
    masking=None,
):
    """DPM-Solver++(3M): `dpm_solver_pp` of order 3 (diffusers' `solver_order=3`)."""
    del key
    return _dpm_solver_pp(
        denoise,
        z,
        grid,
        order=3,
        solver_type=solver_type,
        callback=callback,
        trajectory=trajectory,
        masking=masking,
    )


def _unipc_rhos(rks, b, p: int, *, corrector: bool):
    """UniPC's coefficients of the differences for order p (static): the predictor solves
    the first p - 1 rows of R rhos = b (0.5 at p = 2), the corrector all p (0.5 at p = 1).
    rks: [p - 1] ratios of the earlier steps' lambda offsets to h; b: [>= p]."""
    if corrector and p == 1:
        return jnp.full((1,), 0.5, b.dtype)
    if not corrector and p == 2:
        return jnp.full((1,), 0.5, b.dtype)
    size = p if corrector else p - 1
    r = jnp.concatenate([rks[: p - 1], jnp.ones((1,), rks.dtype)])[:size]
    matrix = jnp.stack([r**k for k in range(size)])
    return jnp.linalg.solve(matrix, b[:size])


@editable
def unipc(
    denoise,
    z,
    grid: TimeGrid,
    *,
    key=None,
    order: int = 2,
    solver_type: str = "bh2",
    corrector: bool = True,
    lower_order_final: bool = True,
    callback=None,
    trajectory=False,
    masking=None,
):
    """UniPC (Zhao et al. 2023) in the data prediction, as diffusers' UniPCMultistepScheduler
    (`predict_x0=True`): the UniP-p predictor, and the UniC corrector that refines each new
    state with the network's output there before stepping on (no extra evaluation; the
    final state is not corrected). Step i has order min(`order`, i + 1, N - i) with
    `lower_order_final` (min(`order`, i + 1) without), first order onto a clean state; the
    corrector of step i has the order of the predictor that made its state. solver_type:
    bh2 (B(h) = e^h - 1, diffusers' default) | bh1 (B(h) = h)."""
    del key
    if solver_type not in ("bh1", "bh2"):
        raise ValueError(f"unknown UniPC solver_type {solver_type!r}; expected bh1 or bh2")
    if order not in (1, 2, 3):
        raise ValueError(f"UniPC order {order}: expected 1, 2 or 3")
    n = grid.num_steps
    k = order  # history length: x0 and lambda of the last k states

    def lam(alpha, sigma):
        return jnp.log(alpha) - jnp.log(sigma)

    def phis(h):
        """(h_phi_1, B(h), b[k]) of a step of log-SNR length h."""
        hh = -h
        h_phi_1 = jnp.expm1(hh)
        b_h = hh if solver_type == "bh1" else jnp.expm1(hh)
        h_phi_k, factorial, b = h_phi_1 / hh - 1.0, 1.0, []
        for i in range(1, k + 1):
            b.append(h_phi_k * factorial / b_h)
            factorial *= i + 1
            h_phi_k = h_phi_k / hh - 1.0 / factorial
        return h_phi_1, b_h, jnp.stack(b)

    def update(x, scale_x, alpha_t, h, x0s, lams, p, *, new_x0=None):
        """The UniP (new_x0 None) or UniC update of order p (traced, 1..k) from state x
        (history entry 0) to the point of log-SNR offset h. The orders differ only in
        scalar coefficients, so p picks those and the image is combined once."""
        corrector = new_x0 is not None
        h_phi_1, b_h, b = phis(h)
        base = scale_x * x - alpha_t * h_phi_1 * x0s[0]
        rks = jnp.stack([(lams[j] - lams[0]) / h for j in range(1, k)]) if k > 1 else None
        table = []  # per order: coefficients of the k - 1 differences, then of the new x0's
        for q in range(1, k + 1):
            coef = jnp.zeros((k,), b.dtype)
            if corrector or q > 1:
                rhos = _unipc_rhos(rks, b, q, corrector=corrector)
                coef = coef.at[: q - 1].set(rhos[: q - 1])
                if corrector:
                    coef = coef.at[k - 1].set(rhos[-1])
            table.append(coef)
        coef = jnp.stack(table)[jnp.clip(p, 1, k) - 1]
        res = sum(
            (coef[j - 1] * (x0s[j] - x0s[0]) / rks[j - 1] for j in range(1, k)),
            jnp.zeros_like(x),
        )
        if corrector:
            return base - alpha_t * b_h * (res + coef[k - 1] * (new_x0 - x0s[0]))
        # First order has no differences (and at a clean landing, h = inf makes them NaN).
        return jnp.where(p > 1, base - alpha_t * b_h * res, base)

    def body(carry, st):
        z, last_z, x0s, lams, prev_order, alpha_prev, sigma_prev = carry
        d = denoise(z, st.i, st.t, st.alpha, st.sigma)
        lam_now = lam(st.alpha, st.sigma)
        if corrector:  # refines z, which the previous step's predictor made from last_z
            h = lam_now - lams[0]
            corrected = update(
                last_z, st.sigma / sigma_prev, st.alpha, h, x0s, lams, prev_order, new_x0=d.x0
            )
            if masking is not None:  # the kept region stays the known image at this level
                corrected = _blend(masking.mask, corrected, z)
            z = jnp.where(st.fresh > 0, corrected, z)
        x0s = jnp.concatenate([d.x0[None], x0s[:-1]])
        lams = jnp.concatenate([lam_now[None], lams[:-1]])
        p = jnp.minimum(order, st.fresh + 1)
        if lower_order_final:
            p = jnp.minimum(p, n - st.i)
        landing = st.sigma_next > 0
        p = jnp.where(landing, p, 1)
        h = lam(st.alpha_next, jnp.where(landing, st.sigma_next, 1.0)) - lam_now
        h = jnp.where(landing, h, jnp.inf)
        z_next = update(z, st.sigma_next / st.sigma, st.alpha_next, h, x0s, lams, p)
        return z_next, z, x0s, lams, p, st.alpha, st.sigma

    x0s = jnp.zeros((k, *z.shape), z.dtype)
    # Distinct stand-in lambdas for the empty history, so that unused candidates stay finite.
    lams = -jnp.arange(1, k + 1, dtype=z.dtype) * 1e3
    one = jnp.ones((), z.dtype)
    carry = (z, z, x0s, lams, jnp.ones((), jnp.int32), one, one)
    return _run(body, carry, grid, callback, trajectory, masking)


@editable
def flow_euler(
    denoise, z, grid: TimeGrid, *, key=None, callback=None, trajectory=False, masking=None
):
    """Euler on the rectified-flow ODE dz/dsigma = v = eps - x0 (SD3's sampler), for flow grids
    (alpha = 1 - sigma, where alpha reaches 0 and the VE form of `euler` is undefined)."""

    def body(z, st):
        d = denoise(z, st.i, st.t, st.alpha, st.sigma)
        return z + (st.sigma_next - st.sigma) * (d.eps - d.x0)

    return _run(body, z, grid, callback, trajectory, masking)


SAMPLERS = {
    "ddpm": ddpm,
    "ddim": ddim,
    "euler": euler,
    "euler_ancestral": euler_ancestral,
    "heun": heun,
    "dpmpp_2m": dpmpp_2m,
    "dpmpp_2m_sde": dpmpp_2m_sde,
    "dpmpp_3m": dpmpp_3m,
    "unipc": unipc,
    "flow_euler": flow_euler,
}
STOCHASTIC = ("ddpm", "euler_ancestral", "dpmpp_2m_sde")


def with_preview(denoise, preview: Callable, grid: TimeGrid, every: int = 1):
    """`denoise` that also sends its x0 of every `every`-th step of `grid` to `preview(i, x0)`
    on the host (a progress preview: the predicted clean sample, [B, ...] as the sampler sees
    it). Only the evaluation at the step's own time reports (not a second-order corrector's
    at the next time). The samples are unchanged."""
    if every < 1:
        raise ValueError(f"preview_every must be at least 1, got {every}")
    times = jnp.asarray(grid.t)

    def denoise_and_report(z, step, t, alpha, sigma):
        d = denoise(z, step, t, alpha, sigma)
        jax.lax.cond(
            (step % every == 0) & (t == times[step]),
            lambda x0: jax.debug.callback(preview, step, x0),
            lambda x0: None,
            d.x0,
        )
        return d

    return denoise_and_report


def get_sampler(name: str) -> Callable:
    if name not in SAMPLERS:
        raise ValueError(f"unknown sampler {name!r}; expected one of {tuple(SAMPLERS)}")
    return SAMPLERS[name]


def sample(
    model_fn: Callable,
    z: jax.Array,
    grid: TimeGrid,
    *,
    sampler: str = "ddim",
    cond=None,
    key=None,
    callback=None,
    preview=None,
    preview_every: int = 1,
    sampler_options: dict | None = None,
    **denoiser_options,
) -> jax.Array:
    """Runs `sampler` with the network `model_fn(z_t, t, cond)`; `denoiser_options` go to
    `make_denoiser` (prediction, model_space, uncond, guidance_scale, ...). `preview(i, x0)`
    receives on the host the predicted clean sample of every `preview_every`-th step
    (see `with_preview`)."""
    fn = get_sampler(sampler)
    scale = denoiser_options.get("guidance_scale")
    if scale is not None:
        denoiser_options["guidance_scale"] = guidance_lib.check_guidance_schedule(
            scale, grid.num_steps
        )
    denoise = make_denoiser(model_fn, cond=cond, **denoiser_options)
    options = dict(sampler_options or {})
    if preview is not None:
        check_editing(z.shape, **{k: v for k, v in options.items() if k in _EDIT_OPTIONS})
        # An image-to-image run walks the end of the grid, and so does its preview.
        walked, _ = img2img_start(grid, z, options.get("x_init"), options.get("strength", 1.0))
        denoise = with_preview(denoise, preview, walked or grid, preview_every)
    if sampler in STOCHASTIC or options.get("eta") or options.get("x_known") is not None:
        options["key"] = key
    return fn(denoise, z, grid, callback=callback, **options)


def compile_sampler(
    apply_fn: Callable,
    *,
    sampler: str = "ddim",
    callback=None,
    preview=None,
    preview_every: int = 1,
    sampler_options: dict | None = None,
    **denoiser_options,
) -> Callable:
    """One jitted program `run(params, z, grid, cond, uncond, guidance_scale, key, x_init,
    x_known, mask)` for a network `apply_fn(params, z_t, t, cond)`. Prompts, guidance, noise
    and the editing images are traced arguments: a new prompt or image never recompiles; a
    new shape, step count or static editing option (strength, repaint_*) in
    `sampler_options` does."""
    get_sampler(sampler)

    @jax.jit
    def run(
        params,
        z,
        grid,
        cond,
        uncond=None,
        guidance_scale=None,
        key=None,
        x_init=None,
        x_known=None,
        mask=None,
    ):
        images = dict(x_init=x_init, x_known=x_known, mask=mask)
        options = dict(sampler_options or {}, **{k: v for k, v in images.items() if v is not None})
        return sample(
            functools.partial(apply_fn, params),
            z,
            grid,
            sampler=sampler,
            cond=cond,
            key=key,
            callback=callback,
            preview=preview,
            preview_every=preview_every,
            sampler_options=options,
            uncond=uncond,
            guidance_scale=guidance_scale,
            **denoiser_options,
        )

    return run
