"""The diffusion math: schedules, parameterizations, losses, samplers and guidance.

Pure functions over jnp arrays; no Flax. A network reaches this package only as a function
`model_fn(z_t, t, cond) -> prediction`.
"""

from imagen_jax.diffusion.guidance import cfg_model, dynamic_threshold, static_clip
from imagen_jax.diffusion.losses import diffusion_loss, sample_time
from imagen_jax.diffusion.parameterization import target, to_x0_eps
from imagen_jax.diffusion.samplers import (
    SAMPLERS,
    check_editing,
    compile_sampler,
    get_sampler,
    img2img_start,
    make_denoiser,
    repaint_schedule,
    sample,
    step_noise,
)
from imagen_jax.diffusion.schedules import (
    DiscreteSchedule,
    FlowSchedule,
    LogSNRSchedule,
    karras_sigmas,
)
from imagen_jax.diffusion.time_grids import (
    TimeGrid,
    continuous_grid,
    ddim_grid,
    ddpm_grid,
    denoising_end_stop,
    denoising_start_index,
    flow_grid,
    sigma_grid,
    slice_grid,
    strength_start,
)

__all__ = [
    "SAMPLERS",
    "DiscreteSchedule",
    "FlowSchedule",
    "TimeGrid",
    "LogSNRSchedule",
    "cfg_model",
    "check_editing",
    "compile_sampler",
    "continuous_grid",
    "ddim_grid",
    "ddpm_grid",
    "denoising_end_stop",
    "denoising_start_index",
    "diffusion_loss",
    "dynamic_threshold",
    "flow_grid",
    "get_sampler",
    "img2img_start",
    "karras_sigmas",
    "make_denoiser",
    "repaint_schedule",
    "sample",
    "sample_time",
    "sigma_grid",
    "slice_grid",
    "static_clip",
    "step_noise",
    "strength_start",
    "target",
    "to_x0_eps",
]
