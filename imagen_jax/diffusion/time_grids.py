"""Time grids: the static sequence of noise levels a sampler walks.

A `TimeGrid` is a pytree of per-step arrays built on the host. Step i evaluates the network at
time `t[i]` on a state z = alpha[i] x0 + sigma[i] eps and lands at (alpha_next[i],
sigma_next[i]). Samplers are written against (alpha, sigma) only, so one sampler serves a
variance-preserving state (alpha^2 + sigma^2 = 1), a variance-exploding one (alpha = 1, the
k-diffusion / diffusers "sigmas" view) and a rectified-flow one (alpha + sigma = 1).

The discrete builders reproduce the timesteps of the diffusers schedulers exactly (spacing
`leading` / `trailing` / `linspace`, `steps_offset`, Karras sigmas), so that a public checkpoint
sampled here sees the same timesteps it would see in diffusers. Where a diffusers scheduler
steps to a level that is not the next grid point (DDIM with `linspace` spacing lands on
t - T // N), the grid says so through its separate `alpha_next` / `sigma_next`.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import numpy as np

from imagen_jax.diffusion import schedules as sched_lib

SPACINGS = ("leading", "trailing", "linspace")


class TimeGrid(NamedTuple):
    t: np.ndarray  # [N] network time of step i
    alpha: np.ndarray  # [N] state of step i: z = alpha x0 + sigma eps
    sigma: np.ndarray  # [N]
    alpha_next: np.ndarray  # [N] where step i lands
    sigma_next: np.ndarray  # [N]
    t_next: np.ndarray  # [N] network time at the landing point (second-order correctors)
    max_order: np.ndarray  # [N] int32, highest multistep order allowed at step i
    init_sigma: np.ndarray  # [] noise scale of a pure-noise start (the prior's std)

    @property
    def num_steps(self) -> int:
        return int(np.shape(self.t)[0])


def _time_grid(t, alpha, sigma, alpha_next, sigma_next, t_next, max_order, init_sigma) -> TimeGrid:
    f32 = lambda a: np.asarray(a, np.float32)  # noqa: E731
    return TimeGrid(
        f32(t),
        f32(alpha),
        f32(sigma),
        f32(alpha_next),
        f32(sigma_next),
        f32(t_next),
        np.asarray(max_order, np.int32),
        f32(init_sigma),
    )


def check_num_steps(num_steps, limit: int | None = None) -> int:
    if not isinstance(num_steps, (int, np.integer)) or isinstance(num_steps, bool) or num_steps < 1:
        raise ValueError(f"num_steps must be an integer >= 1, got {num_steps!r}")
    if limit is not None and num_steps > limit:
        raise ValueError(f"num_steps={num_steps} exceeds the {limit} training timesteps")
    return int(num_steps)


def spaced_timesteps(
    num_steps: int,
    spacing: str = "leading",  # leading | trailing | linspace
    *,
    num_train_timesteps: int = 1000,
    steps_offset: int = 0,
) -> np.ndarray:
    """Descending timesteps (float64) as the diffusers schedulers space them
    (Lin et al. 2024, table 2, for the three spacings)."""
    n, big_t = check_num_steps(num_steps, num_train_timesteps), num_train_timesteps
    if spacing == "linspace":
        return np.linspace(0, big_t - 1, n)[::-1].copy()
    if spacing == "leading":
        return (np.arange(n) * (big_t // n))[::-1].astype(np.float64) + steps_offset
    if spacing == "trailing":
        return np.round(np.arange(big_t, 0, -big_t / n)) - 1.0
    raise ValueError(f"unknown timestep spacing {spacing!r}; expected one of {SPACINGS}")


def _vp_from_alphas_cumprod(ac):
    ac = np.asarray(ac, np.float32)
    return np.sqrt(ac), np.sqrt(1.0 - ac)


def ddpm_grid(
    schedule: sched_lib.DiscreteSchedule, num_steps: int, *, spacing="leading", steps_offset=0
) -> TimeGrid:
    """DDPMScheduler's grid: integer timesteps, each step lands on the next one, the last on
    alpha = 1."""
    t = np.round(
        spaced_timesteps(
            num_steps,
            spacing,
            steps_offset=steps_offset,
            num_train_timesteps=schedule.num_train_timesteps,
        )
    ).astype(int)
    ac = schedule.alphas_cumprod
    ac_next = np.concatenate([ac[t[1:]], [1.0]])
    alpha, sigma = _vp_from_alphas_cumprod(ac[t])
    alpha_next, sigma_next = _vp_from_alphas_cumprod(ac_next)
    t_next = np.concatenate([t[1:], [0]])
    return _time_grid(t, alpha, sigma, alpha_next, sigma_next, t_next, np.ones_like(t), 1.0)


def ddim_grid(
    schedule: sched_lib.DiscreteSchedule,
    num_steps: int,
    *,
    spacing="leading",
    steps_offset=0,
    set_alpha_to_one=True,
) -> TimeGrid:
    """DDIMScheduler's grid: step i lands on t_i - T // N (alpha = 1 past zero, or
    alphas_cumprod[0] when `set_alpha_to_one` is False)."""
    big_t = schedule.num_train_timesteps
    t = np.round(
        spaced_timesteps(num_steps, spacing, steps_offset=steps_offset, num_train_timesteps=big_t)
    ).astype(int)
    ac = schedule.alphas_cumprod
    prev = t - big_t // num_steps
    final = 1.0 if set_alpha_to_one else ac[0]
    ac_next = np.where(prev >= 0, ac[np.maximum(prev, 0)], final)
    alpha, sigma = _vp_from_alphas_cumprod(ac[t])
    alpha_next, sigma_next = _vp_from_alphas_cumprod(ac_next)
    return _time_grid(
        t, alpha, sigma, alpha_next, sigma_next, np.maximum(prev, 0), np.ones_like(t), 1.0
    )


def _sigma_space(sigmas, space):
    """State scales for VE sigmas: `ve` keeps alpha = 1, `vp` divides by sqrt(1 + sigma^2)."""
    sigmas = np.asarray(sigmas, np.float32)
    if space == "ve":
        return np.ones_like(sigmas), sigmas
    if space == "vp":
        alpha = 1.0 / np.sqrt(sigmas**2 + 1.0)
        return alpha, sigmas * alpha
    raise ValueError(f"unknown state space {space!r}; expected 've' or 'vp'")


def sigma_grid(
    schedule: sched_lib.DiscreteSchedule,
    num_steps: int,
    *,
    spacing: str = "linspace",  # leading | trailing | linspace
    steps_offset: int = 0,
    karras: bool = False,
    final_sigma: str = "zero",  # zero | sigma_min
    space: str = "ve",  # ve (Euler, Heun) | vp (DPM-Solver)
    dpm_spacing: bool = False,
    round_timesteps: bool = False,
    lower_order_final: bool = True,
    euler_at_final: bool = False,
) -> TimeGrid:
    """The grid of the sigma-based diffusers schedulers.

    Euler / Euler ancestral / Heun: `space='ve'`, timesteps spaced as DDIM's but not rounded
    for linspace. DPMSolverMultistep: `space='vp'`, `dpm_spacing=True` (N + 1 points, the
    last dropped), `round_timesteps=True` for Karras grids on non-cosine schedules, and the
    first-order rules for the final step (`lower_order_final`, `euler_at_final`).
    """
    big_t = schedule.num_train_timesteps
    n = check_num_steps(num_steps, big_t)
    kw = dict(num_train_timesteps=big_t, steps_offset=steps_offset)
    if dpm_spacing and spacing != "trailing":
        t = spaced_timesteps(n + 1, spacing, **kw)[:-1]
    else:
        t = spaced_timesteps(n, spacing, **kw)
    if dpm_spacing or spacing != "linspace":
        t = np.round(t)
    table = schedule.ve_sigmas.astype(np.float32)
    sigmas = np.interp(t, np.arange(big_t), table)
    if karras:  # DPM-Solver spans the whole table, the others the spaced levels
        lo, hi = (table[0], table[-1]) if dpm_spacing else (sigmas[-1], sigmas[0])
        sigmas = sched_lib.karras_sigmas(n, sigma_min=float(lo), sigma_max=float(hi))
        t = schedule.ve_sigma_to_t(sigmas)
        if round_timesteps:
            t = np.round(t)
    if final_sigma not in ("zero", "sigma_min"):
        raise ValueError(f"final_sigma must be 'zero' or 'sigma_min', got {final_sigma!r}")
    last = 0.0 if final_sigma == "zero" else float(table[0])
    sigmas = np.concatenate([sigmas, [last]]).astype(np.float32)
    alpha, sigma = _sigma_space(sigmas, space)
    max_order = np.full(n, 3)
    if lower_order_final and n < 15:  # diffusers' `lower_order_second`
        max_order[-2:] = 2
    if final_sigma == "zero" or euler_at_final or (lower_order_final and n < 15):
        max_order[-1] = 1
    if space == "ve":
        sigma_max = float(sigmas.max())
        init = sigma_max if spacing in ("linspace", "trailing") else (sigma_max**2 + 1) ** 0.5
    else:
        init = 1.0
    t_next = np.concatenate([t[1:], [0.0]])
    return _time_grid(t, alpha[:-1], sigma[:-1], alpha[1:], sigma[1:], t_next, max_order, init)


def flow_grid(
    num_steps: int, *, shift: float = 1.0, num_train_timesteps: int = 1000, dynamic: bool = False
) -> TimeGrid:
    """FlowMatchEulerDiscreteScheduler's grid: sigmas from 1 to the shifted 1/T, shifted
    (SD3 eq. 23), then 0; the network is told sigma * T. `dynamic=True` is the
    resolution-dependent shifting, with `shift = exp(mu)` (see `flow_dynamic_shift`)."""
    n = check_num_steps(num_steps)
    big_t = num_train_timesteps
    shift_fn = lambda s: sched_lib.flow_time_shift(s, shift=shift)  # noqa: E731
    sigma_min = 1.0 / big_t if dynamic else shift_fn(np.float32(1.0 / big_t))
    sigmas = np.linspace(big_t, float(sigma_min) * big_t, n) / big_t
    sigmas = shift_fn(sigmas).astype(np.float32)
    sigmas = np.concatenate([sigmas, [0.0]]).astype(np.float32)
    t = sigmas * big_t
    return _time_grid(
        t[:-1],
        1.0 - sigmas[:-1],
        sigmas[:-1],
        1.0 - sigmas[1:],
        sigmas[1:],
        t[1:],
        np.concatenate([np.full(n - 1, 3), [1]]),  # the clean landing is first order
        1.0,
    )


def continuous_grid(
    schedule: sched_lib.LogSNRSchedule,
    num_steps: int,
    *,
    spacing: str = "uniform",  # uniform (in t) | karras
    sigma_min: float = 0.002,  # karras only: the EDM range of VE sigmas, clipped to the
    sigma_max: float = 80.0,  # schedule's own range
    rho: float = 7.0,
) -> TimeGrid:
    """A VP grid on a continuous logSNR schedule, from t = 1 (or the Karras sigma_max) to a
    clean last point (alpha = 1, sigma = 0). The network is told t."""
    n = check_num_steps(num_steps)
    if spacing == "uniform":
        t = np.linspace(1.0, 0.0, n + 1)[:-1]
    elif spacing == "karras":
        lo, hi = (float(schedule.logsnr(x)) for x in (1.0, 0.0))
        sig = sched_lib.karras_sigmas(
            n,
            sigma_min=max(sigma_min, math.exp(-0.5 * hi)),
            sigma_max=min(sigma_max, math.exp(-0.5 * lo)),
            rho=rho,
        )
        t = np.clip(np.asarray(schedule.t_from_logsnr(-2.0 * np.log(sig))), 0.0, 1.0)
    else:
        raise ValueError(f"unknown continuous spacing {spacing!r}; expected 'uniform' or 'karras'")
    alpha, sigma = (np.asarray(a) for a in schedule.alpha_sigma(t))
    alpha = np.concatenate([alpha, [1.0]])
    sigma = np.concatenate([sigma, [0.0]])
    t_next = np.concatenate([t[1:], [0.0]])
    max_order = np.full(n, 3)
    max_order[-1] = 1
    return _time_grid(t, alpha[:-1], sigma[:-1], alpha[1:], sigma[1:], t_next, max_order, 1.0)


# ----------------------------------------------------------------------------------------------
# Starting and stopping part-way
# ----------------------------------------------------------------------------------------------


def slice_grid(grid: TimeGrid, start: int = 0, stop: int | None = None) -> TimeGrid:
    """Steps [start, stop) of a grid; each slice compiles to its own static step count."""
    n = grid.num_steps
    stop = n if stop is None else stop
    if not 0 <= start < stop <= n:
        raise ValueError(f"cannot slice steps [{start}, {stop}) from a grid of {n} steps")
    per_step = {k: v[start:stop] for k, v in grid._asdict().items() if k != "init_sigma"}
    return TimeGrid(**per_step, init_sigma=grid.init_sigma)


def strength_start(num_steps: int, strength: float) -> int:
    """First step of an image-to-image run (diffusers' `get_timesteps`): with strength s, the
    last int(N s) steps are run on the noised input."""
    if not 0.0 < strength <= 1.0:
        raise ValueError(f"strength must be in (0, 1], got {strength!r}")
    return max(num_steps - min(int(num_steps * strength), num_steps), 0)


def _cutoff(fraction: float, name: str, num_train_timesteps: float) -> float:
    """The time at a fraction of the way from noise to data: rounded to an integer timestep
    on a discrete (int) time scale, as diffusers does, exact on a continuous one."""
    if not 0.0 < fraction < 1.0:
        raise ValueError(f"{name} must be in (0, 1), got {fraction!r}")
    cutoff = num_train_timesteps - fraction * num_train_timesteps
    return round(cutoff) if isinstance(num_train_timesteps, int) else cutoff


def denoising_end_stop(grid: TimeGrid, denoising_end: float, *, num_train_timesteps=1000) -> int:
    """Stop index for SDXL's `denoising_end`: keep the steps at t >= round(T (1 - f))."""
    cutoff = _cutoff(denoising_end, "denoising_end", num_train_timesteps)
    return int(np.sum(np.asarray(grid.t) >= cutoff))


def denoising_start_index(
    grid: TimeGrid, denoising_start: float, *, num_train_timesteps=1000
) -> int:
    """Start index for SDXL's `denoising_start` (the refiner's half of a handoff): run the
    steps at t < round(T (1 - f))."""
    cutoff = _cutoff(denoising_start, "denoising_start", num_train_timesteps)
    return grid.num_steps - int(np.sum(np.asarray(grid.t) < cutoff))
