"""The cascade pipeline: encode the prompts once, sample the base stage, then each
super-resolution stage on the previous stage's output, each stage one compiled program.

Every row's randomness comes from its own key (`jobs.image_key(seed, item, stage)`): the
initial noise, the sampler's per-step noise and the super-resolution augmentation noise.
An image is therefore the same whatever batch it is placed in.

Stages are our own (`stages.Stage`) by default. A stage of another kind (DeepFloyd IF's, in
`pipelines.deepfloyd`) runs through the same code by supplying, as attributes:
  - `network()` -> (apply_fn(state, z_t, t, cond), state): its network as the sampler calls it;
  - `low_res_conditioning(low_res, aug_keys, size)` -> dict: what a super-resolution stage adds
    to both cond and uncond from the previous stage's images (`aug_keys`: one key per row for
    its noise; `size`: this stage's (H, W)), traced under jit;
  - `super_resolution`, `channels` (of the sampled image), `downsampling_factor`;
  - `encoder`: its own text encoder, or None for the cascade's;
  - `vae` (a latent stage, `stages.LatentStage`): an AutoencoderKL; the stage then samples
    latents of its size / the VAE's factor (`channels`: the latents') and the VAE decodes
    them (`latent.decode_latents`) inside the stage, so what it hands on is an image;
    `downsampling_factor` then counts in image pixels, and `downsampling_note` says why.
The three kinds of a row's noise come from three keys folded from the row key (tags
`_NOISE`, `_AUG`, `STEP_NOISE_TAG`; the sampler folds the step index into the last), so the
initial noise, the augmentation noise and every step's noise are independent.
The cascade's `conditioning(encoder, items) -> (cond, uncond)` turns prompts into the
networks' text conditioning (default: `imagen_conditioning`).

The networks are fully convolutional and their attention takes any number of positions, so a
cascade samples any height x width whose every stage size is a multiple of that stage's UNet
downsampling factor (`stage_sizes`); by default each stage samples its trained square
resolution.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Sequence
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.experimental import multihost_utils
from jax.sharding import NamedSharding, PartitionSpec

from imagen_jax.diffusion import config as diffusion_config
from imagen_jax.diffusion import samplers
from imagen_jax.diffusion.adapter import augment_low_res, model_fn
from imagen_jax.images import resize_batch, to_uint8
from imagen_jax.pipelines import jobs
from imagen_jax.pipelines.latent import decode_latents, encode_images
from imagen_jax.stages import Stage

_NOISE, _AUG = 0, 1  # fold_in tags of a row key: initial noise, augmentation noise
STEP_NOISE_TAG = 2  # the fold_in tag of a row key for the sampler's step noise


def _imagen_network(model, schedule):
    """Our UNet as the sampler calls it: told the unit time, conditioned on a dict."""
    graphdef, params, rest = nnx.split(model, nnx.Param, ...)

    def apply_fn(state, z, t, cond):
        return model_fn(nnx.merge(graphdef, *state), schedule=schedule)(z, t, cond)

    return apply_fn, (params, rest)


def _imagen_low_res(low_res, aug_keys, size, *, aug_level, schedule):
    """Our super-resolution conditioning: the previous stage's images noised at the stage's
    augmentation level (the UNet resizes them itself), and that level."""
    del size
    aug_t = jnp.full((low_res.shape[0],), aug_level, jnp.float32)
    return dict(low_res=augment_low_res(low_res, aug_t, aug_keys, schedule=schedule), aug_t=aug_t)


class Edit(NamedTuple):
    """Image-to-image and inpainting of a batch (`Cascade.sample`): each stage gets `image`
    and `mask` resized to its size. The base stage starts from `image` with `strength`
    (`samplers.img2img_start`), the later stages with `sr_strength` (1: from noise); with a
    mask, every stage keeps the region where it is 0 (`samplers.editable`), with RePaint's
    resampling when `repaint_jump` is set. A latent
    stage edits in its latent space: the image resized to its size and encoded by its VAE
    (the posterior's mode), the mask resized to the latents' size; its kept region is then
    the VAE's reconstruction of the image, not the image itself."""

    image: np.ndarray  # [B, H, W, 3] in [-1, 1], any size
    mask: np.ndarray | None = None  # [B, H, W] or [B, H, W, 1] in [0, 1]: 1 = regenerate
    strength: float = 1.0  # the base stage's: the fraction of its steps run
    repaint_jump: int = 0  # 0: no resampling
    repaint_resample: int = 1
    known_region: str = "noised"  # or "clean" (`samplers.editable`; DeepFloyd IF's way)
    sr_strength: float = 1.0  # the later stages' (DeepFloyd IF's editing pipelines: 0.8)


def _channel(mask) -> np.ndarray:
    """A mask [B, H, W] or [B, H, W, 1] as [B, H, W, 1] float32."""
    mask = np.asarray(mask, np.float32)
    return mask if mask.ndim == 4 else mask[..., None]


def _check_edit(edit: Edit, batch: int) -> None:
    image = np.shape(edit.image)
    if len(image) != 4 or image[0] != batch or image[-1] != 3:
        raise ValueError(f"edit image has shape {image}; expected ({batch}, H, W, 3)")
    if edit.mask is not None and np.shape(edit.mask) not in (image[:-1], (*image[:-1], 1)):
        raise ValueError(
            f"edit mask has shape {np.shape(edit.mask)}; expected {image[:-1]} (the image's)"
        )


class _CompiledStage:
    def __init__(self, stage: Stage, on_step=None, on_preview=None, preview_every: int = 1):
        self.stage = stage
        stage.model.eval()  # no dropout at sampling time
        self.schedule = diffusion_config.make_schedule(stage.diffusion)
        self.sampling = diffusion_config.make_sampling(stage.diffusion, stage.sample)
        schedule = self.schedule
        network = getattr(stage, "network", None)
        apply_fn, self.state = network() if network else _imagen_network(stage.model, schedule)
        self._compile = functools.partial(
            samplers.compile_sampler,
            apply_fn,
            sampler=self.sampling.sampler,
            callback=on_step,
            preview=on_preview,
            preview_every=preview_every,
            **self.sampling.denoiser_options,
        )
        self.run = self._compile(sampler_options=self.sampling.sampler_options)
        self._edit_runs = {}  # static editing options -> its compiled program
        low_res_fn = getattr(stage, "low_res_conditioning", None) or functools.partial(
            _imagen_low_res, aug_level=getattr(stage, "aug_level", 0.0), schedule=schedule
        )
        self._low_res = jax.jit(
            lambda low_res, keys, size: low_res_fn(low_res, _row_noise_key(keys, _AUG), size),
            static_argnums=2,
        )
        self.channels = getattr(stage, "channels", None) or stage.unet.in_channels
        vae = getattr(stage, "vae", None)
        self.vae_factor = 1 if vae is None else vae.config.downsample_factor
        self.vae = None if vae is None else nnx.split(vae)  # (graph, state)

    def _edit_run(self, options: dict):
        """The program with these static editing options, compiled once per setting."""
        key = tuple(sorted(options.items()))
        if key not in self._edit_runs:
            merged = dict(self.sampling.sampler_options, **options)
            self._edit_runs[key] = self._compile(sampler_options=merged)
        return self._edit_runs[key]

    def __call__(self, keys, cond, uncond, guidance_scale, size, low_res=None, edit=None):
        """keys [B] -> samples [B, H, W, C] at size (H, W) (low_res: the previous stage's);
        a latent stage's are its latents decoded by its VAE. edit: (static options, traced
        images) of `samplers.editable` for this stage, or None."""
        if low_res is not None:
            extra = self._low_res(low_res, keys, tuple(size))
            cond, uncond = dict(cond, **extra), dict(uncond, **extra)
        grid = self.sampling.grid
        h, w = (side // self.vae_factor for side in size)
        z = grid.init_sigma * _row_normal(keys, (h, w, self.channels))
        step_keys = _row_noise_key(keys, STEP_NOISE_TAG)
        run, images = self.run, {}
        if edit is not None:
            options, images = edit
            samplers.check_editing(z.shape, **options, **images)
            run = self._edit_run(options)
        x = run(self.state, z, grid, cond, uncond, jnp.float32(guidance_scale), step_keys, **images)
        return x if self.vae is None else decode_latents(*self.vae, x)


def _row_noise_key(keys, tag):
    return jax.vmap(lambda k: jax.random.fold_in(k, tag))(keys)


def row_noise_keys(keys, tag: str | int):
    """The per-row keys a cascade stage draws one kind of noise from: tag "initial",
    "augmentation", "steps" (the sampler folds in the step index), or an int tag."""
    tags = {"initial": _NOISE, "augmentation": _AUG, "steps": STEP_NOISE_TAG}
    return _row_noise_key(keys, tags.get(tag, tag))


@functools.partial(jax.jit, static_argnums=1)
def _row_normal(keys, shape):
    """Each row's initial noise, from its own key."""
    return jax.vmap(lambda k: jax.random.normal(k, shape))(_row_noise_key(keys, _NOISE))


def _global_rows(x, rows: NamedSharding) -> jax.Array:
    """A host value that every process holds whole -> a global array split by rows."""
    if jnp.issubdtype(x.dtype, jax.dtypes.prng_key):
        return jax.random.wrap_key_data(_global_rows(jax.random.key_data(x), rows))
    host = np.asarray(x)
    return jax.make_array_from_callback(host.shape, rows, lambda index: host[index])


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


def _stage_factor(stage) -> tuple[int, str]:
    """(the factor a stage's sides must be multiples of, what it is)."""
    factor = getattr(stage, "downsampling_factor", None)
    if factor is None:
        return downsampling_factor(stage.unet), "its UNet's downsampling factor"
    return factor, getattr(stage, "downsampling_note", "its UNet's downsampling factor")


def _super_resolution(stage) -> bool:
    sr = getattr(stage, "super_resolution", None)
    return bool(stage.unet.low_res) if sr is None else bool(sr)


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
        factor, what = _stage_factor(stage)
        if h % factor or w % factor:
            raise ValueError(
                f"{misfit}: stage {stage.path} would sample {h}x{w}, not a multiple of "
                f"{factor} ({what}) in both sides"
            )
    return sizes


def imagen_conditioning(encoder, items: Sequence[jobs.WorkItem]):
    """(cond, uncond) of our UNets for a batch of work items: the text embeddings and mask;
    an empty prompt, and the uncond of a row without a negative prompt, is the null text
    (`drop_text`), as in training."""
    text = encoder.encode([it.entry.prompt for it in items])
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
        neg = encoder.encode(negatives)
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


class Cascade:
    """`cascade(items, seed) -> [uint8 [B, H_s, W_s, 3] per stage]` for one batch of work
    items (all sharing a guidance scale); (H_s, W_s) = `self.sizes[s]`. `cascade.sample`
    gives the same images as floats in [-1, 1]."""

    def __init__(
        self,
        stages: Sequence[Stage],
        encoder,
        *,
        mesh=None,
        size=None,
        conditioning=None,
        on_step=None,
        on_preview=None,
        preview_every: int | Sequence[int] = 1,
    ):
        """mesh: a device mesh whose first axis splits the batch (None: one device).
        size: (height, width) of the final images (None: each stage's trained resolution).
        conditioning: `conditioning(encoder, items) -> (cond, uncond)` (None:
        `imagen_conditioning`); it runs once per distinct text encoder (a stage's own
        `encoder`, else `encoder`). on_step: `on_step(stage_index, step_index)`, called on
        the host from inside each stage's compiled loop after every step (progress
        reports; None: none compiled in). on_preview: `on_preview(stage_index, step_index,
        x0)`, the same for the predicted clean images [B, H, W, C] of every
        `preview_every`-th step (one number, or one per stage; `samplers.with_preview`)."""
        if not stages:
            raise ValueError("a cascade needs at least one stage")
        for prev, nxt in zip(stages, stages[1:], strict=False):
            if not _super_resolution(nxt) or nxt.low_resolution != prev.resolution:
                raise ValueError(
                    f"stage {nxt.path} (low_resolution={nxt.low_resolution}) cannot follow "
                    f"{prev.path} (resolution {prev.resolution})"
                )
        if _super_resolution(stages[0]):
            raise ValueError(f"the first stage {stages[0].path} is a super-resolution stage")
        self.sizes = stage_sizes(stages, *(size or (None, None)))
        if isinstance(preview_every, int):
            preview_every = [preview_every] * len(stages)
        self.stages = [
            _CompiledStage(
                s,
                None if on_step is None else functools.partial(on_step, k),
                None if on_preview is None else functools.partial(on_preview, k),
                every,
            )
            for k, (s, every) in enumerate(zip(stages, preview_every, strict=True))
        ]
        self.encoder = encoder
        self.conditioning = conditioning or imagen_conditioning
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
        return self.conditioning(self.encoder, items)

    def _place(self, tree):
        """Rows split over the mesh's first axis (a no-op without a mesh)."""
        if self.mesh is None:
            return tree
        rows = NamedSharding(self.mesh, PartitionSpec(self.mesh.axis_names[0]))
        if rows.is_fully_addressable:
            return jax.device_put(tree, rows)
        return jax.tree.map(lambda x: _global_rows(x, rows), tree)  # a multi-host mesh

    def _stage_conds(self, items):
        """(cond, uncond) per stage, each text encoder run once."""
        by_encoder, out = {}, []
        for stage in self.stages:
            encoder = getattr(stage.stage, "encoder", None) or self.encoder
            if id(encoder) not in by_encoder:
                by_encoder[id(encoder)] = self._place(self.conditioning(encoder, items))
            out.append(by_encoder[id(encoder)])
        return out

    def _stage_edit(self, edit: Edit, index: int, size):
        """(static options, traced images) of `edit` for stage `index` at size (H, W)."""
        stage = self.stages[index]
        options, images = {}, {}
        image = resize_batch(edit.image, size)
        if stage.vae is not None:  # the sampler's space: the image's latents (the VAE's mode)
            image = encode_images(*stage.vae, image)
            size = image.shape[1:3]
        strength = edit.strength if index == 0 else edit.sr_strength
        if strength != 1.0:
            options["strength"], images["x_init"] = strength, image
        if edit.mask is not None:
            mask = resize_batch(_channel(edit.mask), size)
            images.update(x_known=image, mask=jnp.clip(mask, 0.0, 1.0))
            if edit.repaint_jump:
                options["repaint_jump"] = edit.repaint_jump
                options["repaint_resample"] = edit.repaint_resample
            if edit.known_region != "noised":
                options["known_region"] = edit.known_region
        if not images:
            return None
        return options, self._place(images)

    def sample(
        self, items: Sequence[jobs.WorkItem], seed: int, on_stage=None, edit: Edit | None = None
    ) -> list[np.ndarray]:
        """Every stage's images of a batch, float32 [B, H_s, W_s, C] in [-1, 1] on the host
        (each stage's output is clipped to [-1, 1], and so conditions the next stage).
        on_stage: `on_stage(stage_index, images)` as each stage's images are done.
        edit: image-to-image / inpainting of the batch (`Edit`), or None."""
        if self.mesh is not None and len(items) % self.mesh.devices.shape[0]:
            raise ValueError(
                f"a batch of {len(items)} does not split over {self.mesh.devices.shape[0]} devices"
            )
        if edit is not None:
            _check_edit(edit, len(items))
            samplers.check_editing(  # the later stages' strength
                np.shape(edit.image), x_init=edit.image, strength=edit.sr_strength
            )
            samplers.check_editing(
                np.shape(edit.image),
                x_init=edit.image,
                strength=edit.strength,
                repaint_jump=edit.repaint_jump,
                repaint_resample=edit.repaint_resample,
                **(
                    {}
                    if edit.mask is None
                    else dict(
                        x_known=edit.image,
                        mask=_channel(edit.mask),
                        known_region=edit.known_region,
                    )
                ),
            )
        conds = self._stage_conds(items)
        outputs, low = [], None
        for index, (stage, size) in enumerate(zip(self.stages, self.sizes, strict=True)):
            keys = self._place(jnp.stack([jobs.image_key(seed, it, index) for it in items]))
            scale = items[0].entry.guidance_scale
            scale = stage.stage.sample.guidance_scale if scale is None else scale
            cond, uncond = conds[index]
            stage_edit = None if edit is None else self._stage_edit(edit, index, size)
            x = stage(keys, cond, uncond, scale, size, low_res=low, edit=stage_edit)
            low = jnp.clip(x, -1.0, 1.0)
            outputs.append(_to_host(low))
            if on_stage is not None:
                on_stage(index, outputs[-1])
        return outputs

    def __call__(
        self, items: Sequence[jobs.WorkItem], seed: int, edit: Edit | None = None
    ) -> list[np.ndarray]:
        return [to_uint8(x) for x in self.sample(items, seed, edit=edit)]
