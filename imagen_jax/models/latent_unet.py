"""A text-conditioned latent UNet for the trainer: our `SDUNet` (diffusers'
UNet2DConditionModel) behind the network contract of the training loop,
`model(z_t, t, cond) -> prediction`, with a learned null text for classifier-free guidance.

    cfg = make_config("shapes_latent", cross_attention_dim=384)
    model = LatentUNet(cfg, rngs=nnx.Rngs(0))
    out = model(z_t, timesteps, {"text": text, "text_mask": mask, "drop_text": drop})

Time: the network is told diffusers' timesteps (`time_input = "timesteps"`: 0..T-1 for a
discrete schedule, as Stable Diffusion's UNets are), not the unit time of `ImagenUNet`;
`training.step.model_fn` reads `time_input` and converts.

Text: cond["text"] [B, L, D] tokens (D = cross_attention_dim) with cond["text_mask"] [B, L]
go to the cross-attention as `encoder_hidden_states` and `encoder_attention_mask`. Where
cond["drop_text"] [B] is set, they are replaced by `null_text_len` learned tokens (a
parameter, 0.02-scaled normal at init), as ImagenUNet does: the "unconditional" input of
classifier-free guidance (Ho & Salimans 2022) is learned, not the encoding of "" that Stable
Diffusion uses.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
from flax import nnx

from imagen_jax.models import sd_unet

_SD_FIELDS = frozenset(f.name for f in dataclasses.fields(sd_unet.SDUNetConfig))


@dataclasses.dataclass(frozen=True)
class UNetWrapperConfig:
    """What the trainer asks of a network around an `SDUNet`: its text width (the
    encoder's: `encoder_hid_dim` where the UNet projects it, as IF does, else the
    cross-attention's), channels and levels."""

    unet: sd_unet.SDUNetConfig

    @property
    def text_dim(self) -> int:
        return self.unet.encoder_hid_dim or self.unet.cross_attention_dim

    @property
    def in_channels(self) -> int:
        return self.unet.in_channels

    @property
    def out_channels(self) -> int:
        return self.unet.out_channels

    @property
    def num_levels(self) -> int:
        return self.unet.num_blocks


@dataclasses.dataclass(frozen=True)
class LatentUNetConfig(UNetWrapperConfig):
    null_text_len: int = 8  # learned null tokens standing in for dropped text


# SDUNetConfig fields per variant: SD 1.x's block layout (cross-attention in all but the
# lowest-resolution level, a cross-attention mid block), scaled down.
VARIANTS = {
    "runlocal": dict(
        block_out_channels=(16, 32),
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        layers_per_block=1,
        norm_num_groups=8,
        attention_head_dim=2,  # heads (diffusers' naming for Transformer2DModel blocks)
        cross_attention_dim=32,
        null_text_len=2,
    ),
    "shapes_latent": dict(  # 18M parameters; 16x16x4 latents of 64 px shapes images
        block_out_channels=(64, 128, 256),
        down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
        layers_per_block=2,
        norm_num_groups=32,
        attention_head_dim=8,
        cross_attention_dim=384,  # all-MiniLM-L6-v2
        null_text_len=8,
    ),
}
VARIANT_FIELDS = tuple(sorted(_SD_FIELDS | {"null_text_len"}))


def make_config(variant: str, **overrides) -> LatentUNetConfig:
    """The config of a `VARIANTS` entry with `overrides` (SDUNetConfig fields or
    null_text_len)."""
    values, null_text_len = variant_values(
        VARIANTS, variant, overrides, VARIANT_FIELDS, what="latent UNet"
    )
    if not isinstance(values.get("cross_attention_dim"), int):
        raise ValueError(
            "the latent UNet needs one int cross_attention_dim (the text encoder's width), got "
            f"{values.get('cross_attention_dim')!r}"
        )
    return LatentUNetConfig(sd_unet.SDUNetConfig(**values), null_text_len=int(null_text_len))


def variant_values(variants, variant, overrides, allowed, *, what) -> tuple[dict, int]:
    """(the network config's fields, null_text_len) of `variants[variant]` with `overrides`,
    each key checked against `allowed`; the errors name the `what` network."""
    if variant not in variants:
        raise ValueError(f"unknown {what} variant {variant!r}; expected one of {tuple(variants)}")
    unknown = sorted(set(overrides) - set(allowed))
    if unknown:
        raise ValueError(f"unknown {what} config keys {unknown}; allowed: {allowed}")
    values = {**variants[variant], **overrides}
    return values, int(values.pop("null_text_len"))


def with_null_text(text, mask, drop, null):
    """text [B, L, D] and mask [B, L] with rows where drop [B] is set replaced by the null
    tokens null [1, N, D] (padded or cut to L; the mask marks the first N)."""
    b, length = mask.shape
    n = null.shape[1]
    null = jnp.broadcast_to(null.astype(text.dtype), (b, n, text.shape[-1]))
    null = jnp.pad(null, ((0, 0), (0, max(0, length - n)), (0, 0)))[:, :length]
    null_mask = jnp.arange(length)[None, :] < n
    text = jnp.where(drop[:, None, None], null, text)
    mask = jnp.where(drop[:, None], null_mask, mask)
    return text, mask


class LatentUNet(nnx.Module):
    """SDUNet + a learned null text, called as `model(z_t, timesteps, cond)`."""

    time_input = "timesteps"  # what `training.step.model_fn` tells it: diffusers' timesteps

    def __init__(
        self, cfg: LatentUNetConfig, *, rngs: nnx.Rngs, dtype=jnp.float32, param_dtype=jnp.float32
    ):
        self.cfg = cfg
        self.unet = sd_unet.SDUNet(cfg.unet, rngs=rngs, dtype=dtype, param_dtype=param_dtype)
        shape = (1, cfg.null_text_len, cfg.text_dim)
        self.null_text = nnx.Param(
            (jax.random.normal(rngs.params(), shape) * 0.02).astype(param_dtype)
        )

    def __call__(self, z_t, t, cond):
        """z_t [B, h, w, in_channels], t [B] timesteps -> [B, h, w, out_channels]."""
        text, mask = cond["text"], cond["text_mask"].astype(bool)  # [B, L, D], [B, L]
        if "drop_text" in cond:
            text, mask = with_null_text(
                text, mask, cond["drop_text"].astype(bool), self.null_text[...]
            )
        return self.unet(z_t, t, text, encoder_attention_mask=mask)


# ----------------------------------------------------------------------------------------------
# A public pipeline's UNet, trained further


@dataclasses.dataclass(frozen=True)
class PipelineUNetConfig(UNetWrapperConfig):
    """The UNet of a public pipeline (its unet/config.json), the length of its text
    encoder's token sequence (CLIP: 77) and the side of the training images (SDXL's
    default size / crop ids)."""

    text_len: int = 77
    resolution: int = 0
    low_res: bool = False  # IF stage II: the upscaled, noised input in the UNet's channels

    @property
    def size_crop(self) -> bool:
        """SDXL's micro-conditioning: the pooled text and 6 size / crop ids."""
        return self.unet.addition_embed_type == "text_time"

    @property
    def pooled_dim(self) -> int:
        """The width of the pooled text (SDXL: text_encoder_2's projection); 0 = none."""
        if not self.size_crop:
            return 0
        u = self.unet
        return u.projection_class_embeddings_input_dim - SIZE_CROP_IDS * u.addition_time_embed_dim


SIZE_CROP_IDS = 6  # original (h, w), crop (top, left), target (h, w)


class EmptyText(nnx.Variable):
    """The text encoder's tokens of the empty prompt: set from the encoder, never trained."""


class PipelineUNet(nnx.Module):
    """A public Stable Diffusion UNet (`sd_unet.SDUNet`, loaded from diffusers' weights) as
    the trainer calls a network, `model(z_t, timesteps, cond)`.

    As Stable Diffusion was trained and as diffusers' train_text_to_image drops captions
    (`--proportion_empty_prompts`), the "unconditional" text of classifier-free guidance is
    the encoding of "" (`empty_text`, [1, L, D], and for SDXL `empty_pooled` [1, P], set by
    the trainer from its encoder), and the cross-attention sees every token (the public
    UNets take no mask). SDXL's UNet also takes cond["text_pooled"] [B, P] and cond["size_crop"]
    [B, 6] (original size, crop corner, target size; without it, an uncropped image of
    `resolution`), as `added_cond` (text_embeds, time_ids). IF stage II's UNet (`low_res`)
    takes cond["low_res"] (the upscaled, noised input, concatenated to its channels) and
    cond["aug_timestep"] (its noise level, the class label)."""

    time_input = "timesteps"

    def __init__(
        self, cfg: PipelineUNetConfig, *, rngs, dtype=jnp.float32, param_dtype=jnp.float32
    ):
        self.cfg = cfg
        self.unet = sd_unet.SDUNet(cfg.unet, rngs=rngs, dtype=dtype, param_dtype=param_dtype)
        self.empty_text = EmptyText(jnp.zeros((1, cfg.text_len, cfg.text_dim), jnp.float32))
        if cfg.pooled_dim:
            self.empty_pooled = EmptyText(jnp.zeros((1, cfg.pooled_dim), jnp.float32))

    def __call__(self, z_t, t, cond):
        text = cond["text"]
        drop = cond["drop_text"].astype(bool) if "drop_text" in cond else None
        if drop is not None:
            empty = jnp.broadcast_to(self.empty_text[...].astype(text.dtype), text.shape)
            text = jnp.where(drop[:, None, None], empty, text)
        if self.cfg.low_res:  # IF stage II: told the input's noise level as its class label
            x = jnp.concatenate([z_t, cond["low_res"].astype(z_t.dtype)], axis=-1)
            return self.unet(x, t, text, class_labels=cond["aug_timestep"])
        if not self.cfg.size_crop:
            return self.unet(z_t, t, text)
        pooled = cond["text_pooled"]
        if drop is not None:
            empty = jnp.broadcast_to(self.empty_pooled[...].astype(pooled.dtype), pooled.shape)
            pooled = jnp.where(drop[:, None], empty, pooled)
        ids = cond.get("size_crop")
        if ids is None:
            r = self.cfg.resolution
            ids = jnp.broadcast_to(jnp.asarray([r, r, 0, 0, r, r], jnp.float32), (len(text), 6))
        return self.unet(z_t, t, text, added_cond=dict(text_embeds=pooled, time_ids=ids))
