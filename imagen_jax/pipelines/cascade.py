"""The cascade pipeline: encode the prompts once, sample the base stage, then each
super-resolution stage on the previous stage's output, each stage one compiled program.

Every row's randomness comes from its own key (`jobs.image_key(seed, item, stage)`): the
initial noise, the sampler's per-step noise and the super-resolution augmentation noise.
An image is therefore the same whatever batch it is placed in.

The networks are fully convolutional and their attention takes any number of positions, so a
cascade samples any height x width whose every stage size is a multiple of that stage's UNet
downsampling factor (`stage_sizes`); by default each stage samples its trained square
resolution.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.experimental import multihost_utils
from jax.sharding import NamedSharding, PartitionSpec

from imagen_jax.diffusion import config as diffusion_config
from imagen_jax.diffusion import losses, samplers
from imagen_jax.pipelines import jobs
from imagen_jax.pipelines.stages import Stage
from imagen_jax.training.sampling import to_uint8
from imagen_jax.training.step import unit_time

_NOISE, _AUG = 0, 1  # fold_in tags of a row key: initial noise, augmentation noise


class _CompiledStage:
    def __init__(self, stage: Stage):
        self.stage = stage
        stage.model.eval()  # no dropout at sampling time
        self.schedule = diffusion_config.make_schedule(stage.diffusion)
        self.sampling = diffusion_config.make_sampling(stage.diffusion, stage.sample)
        graphdef, params, rest = nnx.split(stage.model, nnx.Param, ...)
        self.state = (params, rest)
        schedule = self.schedule

        def apply_fn(state, z, t, cond):
            model = nnx.merge(graphdef, *state)
            return model(z, unit_time(t, schedule=schedule), cond)

        self.run = samplers.compile_sampler(
            apply_fn,
            sampler=self.sampling.sampler,
            sampler_options=self.sampling.sampler_options,
            **self.sampling.denoiser_options,
        )
        self._augment = jax.jit(functools.partial(_augment, schedule=schedule))

    def __call__(self, keys, cond, uncond, guidance_scale, size, low_res=None):
        """keys [B] -> samples [B, H, W, C] at size (H, W) (low_res: the previous stage's)."""
        b = keys.shape[0]
        if low_res is not None:
            aug_t = jnp.full((b,), self.stage.aug_level, jnp.float32)
            cond = dict(cond, low_res=self._augment(low_res, aug_t, keys), aug_t=aug_t)
            uncond = dict(uncond, low_res=cond["low_res"], aug_t=aug_t)
        grid = self.sampling.grid
        z = grid.init_sigma * _row_normal(keys, (*size, self.stage.unet.in_channels))
        return self.run(self.state, z, grid, cond, uncond, jnp.float32(guidance_scale), keys)


def _augment(low_res, aug_t, keys, *, schedule):
    """Noise-conditioning augmentation at sampling time (as `training.step.make_cond` does
    in training), each row's noise from its own key."""
    _, alpha_t, sigma_t = losses.time_from_unit(aug_t, schedule=schedule)
    eps = jax.vmap(lambda k: jax.random.normal(k, low_res.shape[1:]))(_row_noise_key(keys, _AUG))
    return losses.add_noise(x0=low_res, eps=eps, alpha_t=alpha_t, sigma_t=sigma_t)


def _row_noise_key(keys, tag):
    return jax.vmap(lambda k: jax.random.fold_in(k, tag))(keys)


@functools.partial(jax.jit, static_argnums=1)
def _row_normal(keys, shape):
    """Each row's initial noise, from its own key."""
    return jax.vmap(lambda k: jax.random.normal(k, shape))(_row_noise_key(keys, _NOISE))


def _to_host(x: jax.Array) -> np.ndarray:
    """All rows of a batch on this host (gathered from the other processes when the mesh
    spans several)."""
    if x.is_fully_addressable:
        return np.asarray(x)
    return np.asarray(multihost_utils.process_allgather(x, tiled=True))


def downsampling_factor(unet) -> int:
    """How many times a UNet halves its input's height and width: sizes it samples must be
    multiples of it."""
    return 2 ** (len(unet.channel_mult) - 1)


def stage_sizes(
    stages: Sequence[Stage], height: int | None = None, width: int | None = None
) -> list[tuple[int, int]]:
    """(H, W) each stage samples at for final images of height x width (None: the last
    stage's trained resolution). A super-resolution stage scales its input by
    resolution / low_resolution; every stage's size must be a whole number of pixels and a
    multiple of its UNet's downsampling factor."""
    for name, value in (("height", height), ("width", width)):
        if value is not None and (isinstance(value, bool) or value < 1):
            raise ValueError(f"{name} must be a positive number of pixels, got {value!r}")
    last = stages[-1].resolution
    final = (height or last, width or last)
    misfit = f"images of {final[0]}x{final[1]} (height x width) do not fit this cascade"
    sizes = [final]
    for stage in reversed(stages[1:]):  # each stage's input is the size the one before made
        h, w = sizes[0]
        up, down = stage.resolution, stage.low_resolution
        step = up // math.gcd(up, down)
        if h % step or w % step:
            raise ValueError(
                f"{misfit}: stage {stage.path} scales {down} -> {up} px, so its output "
                f"{h}x{w} must be a multiple of {step} in both sides"
            )
        sizes.insert(0, (h * down // up, w * down // up))
    for stage, (h, w) in zip(stages, sizes, strict=True):
        factor = downsampling_factor(stage.unet)
        if h % factor or w % factor:
            raise ValueError(
                f"{misfit}: stage {stage.path} would sample {h}x{w}, not a multiple of its "
                f"UNet's downsampling factor {factor} in both sides"
            )
    return sizes


class Cascade:
    """`cascade(items, seed) -> [uint8 [B, H_s, W_s, 3] per stage]` for one batch of work
    items (all sharing a guidance scale); (H_s, W_s) = `self.sizes[s]`."""

    def __init__(self, stages: Sequence[Stage], encoder, *, mesh=None, size=None):
        """mesh: a device mesh whose first axis splits the batch (None: one device).
        size: (height, width) of the final images (None: each stage's trained resolution)."""
        if not stages:
            raise ValueError("a cascade needs at least one stage")
        for prev, nxt in zip(stages, stages[1:], strict=False):
            if not nxt.unet.low_res or nxt.low_resolution != prev.resolution:
                raise ValueError(
                    f"stage {nxt.path} (low_resolution={nxt.low_resolution}) cannot follow "
                    f"{prev.path} (resolution {prev.resolution})"
                )
        if stages[0].unet.low_res:
            raise ValueError(f"the first stage {stages[0].path} is a super-resolution stage")
        self.sizes = stage_sizes(stages, *(size or (None, None)))
        self.stages = [_CompiledStage(s) for s in stages]
        self.encoder = encoder
        self.mesh = mesh

    def set_state(self, index: int, state) -> None:
        """Replaces stage `index`'s weights by `state` = (params, rest) of the same structure
        and shapes (the trainer's periodic evaluation samples its current EMA weights this
        way); the compiled programs are reused."""
        self.stages[index].state = state

    def set_size(self, height: int | None = None, width: int | None = None) -> None:
        """Final images of height x width from now on (None: the last stage's trained
        resolution); each new size compiles each stage once more."""
        self.sizes = stage_sizes([s.stage for s in self.stages], height, width)

    def _conds(self, items):
        text = self.encoder.encode([it.entry.prompt for it in items])
        negatives = [it.entry.negative_prompt for it in items]
        has_negative = np.array([bool(n.strip()) for n in negatives])
        mask = np.asarray(text[1], bool)
        # A prompt with no tokens ("") is the null text, as in training.
        cond = dict(
            text=jnp.asarray(text[0]),
            text_mask=jnp.asarray(mask),
            drop_text=jnp.asarray(~mask.any(-1)),
        )
        if has_negative.any():  # a negative prompt replaces the null text of its row
            neg = self.encoder.encode(negatives)
            pick = has_negative[:, None, None]
            neg_mask = np.where(pick[..., 0], np.asarray(neg[1], bool), mask)
            uncond = dict(
                text=jnp.asarray(np.where(pick, neg[0], text[0])),
                text_mask=jnp.asarray(neg_mask),
                drop_text=jnp.asarray(~has_negative | ~neg_mask.any(-1)),
            )
        else:
            uncond = dict(cond, drop_text=jnp.ones(len(items), bool))
        return cond, uncond

    def _place(self, tree):
        """Rows split over the mesh's first axis (a no-op without a mesh)."""
        if self.mesh is None:
            return tree
        rows = NamedSharding(self.mesh, PartitionSpec(self.mesh.axis_names[0]))
        return jax.device_put(tree, rows)

    def __call__(self, items: Sequence[jobs.WorkItem], seed: int) -> list[np.ndarray]:
        if self.mesh is not None and len(items) % self.mesh.devices.shape[0]:
            raise ValueError(
                f"a batch of {len(items)} does not split over {self.mesh.devices.shape[0]} devices"
            )
        cond, uncond = self._place(self._conds(items))
        outputs, low = [], None
        for index, (stage, size) in enumerate(zip(self.stages, self.sizes, strict=True)):
            keys = self._place(jnp.stack([jobs.image_key(seed, it, index) for it in items]))
            scale = items[0].entry.guidance_scale
            scale = stage.stage.sample.guidance_scale if scale is None else scale
            x = stage(keys, cond, uncond, scale, size, low_res=low)
            low = jnp.clip(x, -1.0, 1.0)
            outputs.append(to_uint8(_to_host(low)))
        return outputs
