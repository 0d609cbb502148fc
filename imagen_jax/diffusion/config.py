"""The `diffusion` and `sample` config groups, and what they build.

Every experiment config holds a `diffusion` group (the noise schedule and what the network
predicts, fixed at training time) and a `sample` group (sampler settings, free at sampling
time). `make_schedule` and `make_sampling` turn them into the objects of this package, so
that the trainer, sample.py and the evaluators read them the same way.
"""

from __future__ import annotations

import dataclasses
import math

import ml_collections

from imagen_jax.diffusion import schedules, time_grids
from imagen_jax.diffusion.samplers import SAMPLERS

DISCRETE = ("linear", "scaled_linear", "squaredcos_cap_v2")
CONTINUOUS = ("cosine", "shifted_cosine", "linear_logsnr")
FLOW = ("flow",)


def diffusion_config(**overrides) -> ml_collections.ConfigDict:
    """Defaults of the `diffusion` group; `overrides` replace them (unknown keys raise)."""
    cfg = ml_collections.ConfigDict(
        dict(
            schedule="cosine",  # linear | scaled_linear | squaredcos_cap_v2 (1000 discrete
            #                     steps) | cosine | shifted_cosine | linear_logsnr | flow
            num_train_timesteps=1000,  # discrete schedules and flow's network time scale
            beta_start=0.0001,
            beta_end=0.02,
            zero_terminal_snr=False,
            logsnr_min=-20.0,
            logsnr_max=20.0,
            resolution=64,  # shifted_cosine: shift by 2 log(base_resolution / resolution)
            base_resolution=64,
            flow_shift=1.0,
            prediction="eps",  # eps | x0 | v | flow
            model_space="vp",  # vp | flow
            variance="fixed_small",  # fixed_small | fixed_large | learned_range
        )
    )
    _update(cfg, overrides)
    return cfg


def sample_config(**overrides) -> ml_collections.ConfigDict:
    """Defaults of the `sample` group; `overrides` replace them (unknown keys raise)."""
    cfg = ml_collections.ConfigDict(
        dict(
            sampler="ddim",  # ddpm | ddim | euler | euler_ancestral | heun | dpmpp_2m |
            #                  dpmpp_2m_sde | dpmpp_3m | unipc | flow_euler
            steps=50,
            spacing="trailing",  # leading | trailing | linspace (discrete schedules)
            steps_offset=0,
            set_alpha_to_one=True,  # ddim: the last step lands on alpha = 1 (else on
            #                         alphas_cumprod[0], as Stable Diffusion's DDIM configs)
            karras=False,  # Karras et al. 2022 sigmas (sigma-based samplers)
            eta=0.0,  # ddim: 0 deterministic, 1 ancestral; euler_ancestral: noise amount
            guidance_scale=5.0,  # 1 = conditional only
            guidance_rescale=0.0,
            dynamic_threshold=0.0,  # Imagen's percentile, e.g. 0.995; 0 = off
            threshold_max=1.0,
            clip_x0=0.0,  # static clipping range of x0; 0 = off
            strength=1.0,  # image-to-image: the fraction of the steps run
            denoising_start=0.0,  # SDXL handoff: run only the steps after this fraction
            denoising_end=1.0,  # and stop after this one
            layout_scale=1.0,  # a UNet with a layout head (model.layout_grid): the gain on
            #                    the head's prediction that the network reads
        )
    )
    _update(cfg, overrides)
    check_sample(cfg)
    return cfg


_SAMPLE_RANGES = {  # key: (lowest, highest, whether the lowest itself is allowed)
    "guidance_scale": (0.0, math.inf, True),
    "guidance_rescale": (0.0, 1.0, True),
    "eta": (0.0, math.inf, True),
    "dynamic_threshold": (0.0, 1.0, True),
    "threshold_max": (0.0, math.inf, False),
    "clip_x0": (0.0, math.inf, True),
    "strength": (0.0, 1.0, False),
    "denoising_start": (0.0, 1.0, True),
    "denoising_end": (0.0, 1.0, False),
    "layout_scale": (0.0, math.inf, True),
}


def check_sample(sample) -> None:
    """Raises ValueError naming the key and value of a `sample` group setting out of its
    range (a negative guidance scale, zero steps, an unknown sampler, ...)."""
    steps = sample.steps
    if not isinstance(steps, int) or isinstance(steps, bool) or steps < 1:
        raise ValueError(f"sample.steps must be an integer >= 1, got {steps!r}")
    if sample.sampler not in SAMPLERS:
        raise ValueError(
            f"unknown sample.sampler {sample.sampler!r}; expected one of {tuple(SAMPLERS)}"
        )
    for key, (low, high, closed) in _SAMPLE_RANGES.items():
        value = sample[key]
        ok = isinstance(value, (int, float)) and not isinstance(value, bool)
        ok = ok and (low <= value if closed else low < value) and value <= high
        if not ok:
            bracket = "[" if closed else "("
            raise ValueError(
                f"sample.{key}={value!r}: expected a number in {bracket}{low}, {high}]"
            )


def _update(cfg, overrides):
    unknown = sorted(set(overrides) - set(cfg.keys()))
    if unknown:
        raise KeyError(f"unknown config keys {unknown}; allowed: {sorted(cfg.keys())}")
    cfg.update(overrides)


def make_schedule(cfg: ml_collections.ConfigDict):
    """The schedule of a `diffusion` group."""
    if cfg.schedule in DISCRETE:
        return schedules.DiscreteSchedule.from_config(
            cfg.schedule,
            num_train_timesteps=cfg.num_train_timesteps,
            beta_start=cfg.beta_start,
            beta_end=cfg.beta_end,
            zero_terminal_snr=cfg.zero_terminal_snr,
        )
    if cfg.schedule in CONTINUOUS:
        bounds = dict(logsnr_min=cfg.logsnr_min, logsnr_max=cfg.logsnr_max)
        if cfg.schedule == "shifted_cosine":
            return schedules.LogSNRSchedule.shifted_cosine(
                resolution=cfg.resolution, base_resolution=cfg.base_resolution, **bounds
            )
        name = "linear" if cfg.schedule == "linear_logsnr" else "cosine"
        return schedules.LogSNRSchedule(name, **bounds)
    if cfg.schedule in FLOW:
        return schedules.FlowSchedule(
            shift=cfg.flow_shift, num_train_timesteps=cfg.num_train_timesteps
        )
    raise ValueError(
        f"unknown diffusion.schedule {cfg.schedule!r}; expected one of "
        f"{DISCRETE + CONTINUOUS + FLOW}"
    )


@dataclasses.dataclass(frozen=True)
class Sampling:
    """Everything `samplers.sample` / `samplers.compile_sampler` need besides the network."""

    grid: time_grids.TimeGrid
    sampler: str
    sampler_options: dict
    denoiser_options: dict
    guidance_scale: float


def make_time_grid(schedule, sample: ml_collections.ConfigDict) -> time_grids.TimeGrid:
    """The full grid for a schedule and a sampler (before any part-way slicing)."""
    name, n = sample.sampler, sample.steps
    if name not in SAMPLERS:
        raise ValueError(f"unknown sample.sampler {name!r}; expected one of {tuple(SAMPLERS)}")
    if isinstance(schedule, schedules.FlowSchedule):
        if name not in ("flow_euler", "ddim", "dpmpp_2m", "dpmpp_2m_sde", "dpmpp_3m"):
            raise ValueError(
                f"sampler {name!r} cannot start from pure noise (alpha = 0) of a flow "
                "schedule; use flow_euler, ddim, dpmpp_2m or dpmpp_3m"
            )
        return time_grids.flow_grid(
            n, shift=schedule.shift, num_train_timesteps=schedule.num_train_timesteps
        )
    if name == "flow_euler":
        raise ValueError("sampler 'flow_euler' needs diffusion.schedule='flow'")
    if isinstance(schedule, schedules.LogSNRSchedule):
        return time_grids.continuous_grid(
            schedule, n, spacing="karras" if sample.karras else "uniform"
        )
    spacing = dict(spacing=sample.spacing, steps_offset=sample.steps_offset)
    if name == "ddpm":
        return time_grids.ddpm_grid(schedule, n, **spacing)
    if name == "ddim":
        return time_grids.ddim_grid(
            schedule, n, set_alpha_to_one=sample.set_alpha_to_one, **spacing
        )
    dpm = name.startswith("dpmpp") or name == "unipc"  # the multistep solvers' grid
    return time_grids.sigma_grid(
        schedule,
        n,
        karras=sample.karras,
        space="vp" if dpm else "ve",
        dpm_spacing=dpm,
        round_timesteps=dpm,
        **spacing,
    )


def part_way(
    grid: time_grids.TimeGrid, sample: ml_collections.ConfigDict, num_train_timesteps=1000
):
    """Slices a grid for img2img `strength` and SDXL's `denoising_start` / `denoising_end`."""
    start, stop = 0, grid.num_steps
    if sample.strength != 1.0:
        start = time_grids.strength_start(grid.num_steps, sample.strength)
    if sample.denoising_start:
        start = time_grids.denoising_start_index(
            grid, sample.denoising_start, num_train_timesteps=num_train_timesteps
        )
    if sample.denoising_end != 1.0:
        stop = time_grids.denoising_end_stop(
            grid, sample.denoising_end, num_train_timesteps=num_train_timesteps
        )
    return (
        grid if (start, stop) == (0, grid.num_steps) else time_grids.slice_grid(grid, start, stop)
    )


def make_sampling(
    diffusion: ml_collections.ConfigDict, sample: ml_collections.ConfigDict
) -> Sampling:
    check_sample(sample)
    schedule = make_schedule(diffusion)
    big_t = 1.0 if isinstance(schedule, schedules.LogSNRSchedule) else diffusion.num_train_timesteps
    grid = part_way(make_time_grid(schedule, sample), sample, num_train_timesteps=big_t)
    sampler_options = {}
    if sample.sampler in ("ddim", "euler_ancestral"):
        sampler_options["eta"] = sample.eta
    if sample.sampler == "ddpm":
        sampler_options["variance"] = diffusion.variance
    denoiser_options = dict(
        prediction=diffusion.prediction,
        model_space=diffusion.model_space,
        learned_variance=diffusion.variance == "learned_range",
        guidance_rescale=sample.guidance_rescale,
        clip_x0=sample.clip_x0 or None,
        dynamic_threshold=(
            (sample.dynamic_threshold, sample.threshold_max) if sample.dynamic_threshold else None
        ),
    )
    return Sampling(
        grid, sample.sampler, sampler_options, denoiser_options, float(sample.guidance_scale)
    )
