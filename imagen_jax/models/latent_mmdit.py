"""A text-conditioned latent MMDiT for the trainer (SD3-style rectified flow): our
`SD3Transformer` behind the network contract of the training loop,
`model(z_t, t, cond) -> prediction`, with a learned null text for classifier-free guidance.

    cfg = make_config("shapes_mmdit", joint_attention_dim=384)
    model = LatentMMDiT(cfg, rngs=nnx.Rngs(0))
    out = model(z_t, timesteps, {"text": text, "text_mask": mask, "drop_text": drop})

Time: the network is told diffusers' timesteps (`time_input = "timesteps"`; with the flow
schedule, sigma * 1000 as SD3's transformer is).

Text: cond["text"] [B, L, D] tokens (D = joint_attention_dim) join the image patches in
every block's attention. The MMDiT has no attention mask (as SD3), so the padding tokens are
zeroed rather than left out. The pooled vector that modulates every block is the mean of
the real tokens (the text encoder's sentence embedding for all-MiniLM-L6-v2); with
pooled_projection_dim = D. Where cond["drop_text"] [B] is set, the tokens are replaced by
`null_text_len` learned tokens (`latent_unet.with_null_text`), and the pooled vector is
their mean: the "unconditional" input of classifier-free guidance is learned.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
from flax import nnx

from imagen_jax.models import sd3_transformer
from imagen_jax.models.latent_unet import EmptyText, variant_values, with_null_text

_SD3_FIELDS = frozenset(f.name for f in dataclasses.fields(sd3_transformer.SD3TransformerConfig))


@dataclasses.dataclass(frozen=True)
class MMDiTWrapperConfig:
    """What the trainer asks of a network around an `SD3Transformer`: its text width,
    channels and levels."""

    transformer: sd3_transformer.SD3TransformerConfig

    @property
    def text_dim(self) -> int:
        return self.transformer.joint_attention_dim

    @property
    def in_channels(self) -> int:
        return self.transformer.in_channels

    @property
    def out_channels(self) -> int:
        return self.transformer.output_channels

    @property
    def num_levels(self) -> int:
        """As for a UNet: the latent side must divide by 2 ** (num_levels - 1), the patch."""
        return self.transformer.patch_size.bit_length()


@dataclasses.dataclass(frozen=True)
class LatentMMDiTConfig(MMDiTWrapperConfig):
    null_text_len: int = 8  # learned null tokens standing in for dropped text
    # DiT's adaLN-Zero initialization (`sd3_transformer.adaln_zero_init`) for training
    # from scratch; False: diffusers' (every linear layer alike). Weights that are loaded
    # replace either, so exported stages do not record it.
    adaln_zero: bool = False


# SD3TransformerConfig fields per variant (SD 3.5's RMS query-key norm; the position table
# computed for each grid, no stored table).
VARIANTS = {
    "runlocal": dict(
        sample_size=8,
        patch_size=2,
        in_channels=4,
        out_channels=4,
        num_layers=2,
        attention_head_dim=8,
        num_attention_heads=2,
        joint_attention_dim=32,
        caption_projection_dim=16,
        pooled_projection_dim=32,
        pos_embed_max_size=None,
        qk_norm="rms_norm",
        null_text_len=2,
    ),
    # 16x16x4 latents of 64 px shapes images: 64 patches of 2x2; 3.6 M parameters, 128
    # wide (7 MB in float16, what the repository's budget for shipped weights leaves).
    "shapes_mmdit": dict(
        sample_size=16,
        patch_size=2,
        in_channels=4,
        out_channels=4,
        num_layers=6,
        attention_head_dim=32,
        num_attention_heads=4,
        joint_attention_dim=384,  # all-MiniLM-L6-v2
        caption_projection_dim=128,
        pooled_projection_dim=384,
        pos_embed_max_size=None,
        qk_norm="rms_norm",
        null_text_len=8,
        adaln_zero=True,
    ),
}
_WRAPPER_FIELDS = {"null_text_len", "adaln_zero"}
VARIANT_FIELDS = tuple(sorted(_SD3_FIELDS | _WRAPPER_FIELDS))


def make_config(variant: str, **overrides) -> LatentMMDiTConfig:
    """The config of a `VARIANTS` entry with `overrides` (SD3TransformerConfig fields or
    null_text_len). The pooled vector is the mean text token, so pooled_projection_dim
    must equal joint_attention_dim."""
    values, null_text_len = variant_values(
        VARIANTS, variant, overrides, VARIANT_FIELDS, what="latent MMDiT"
    )
    adaln_zero = bool(values.pop("adaln_zero", False))
    if "joint_attention_dim" in overrides and "pooled_projection_dim" not in overrides:
        values["pooled_projection_dim"] = values["joint_attention_dim"]
    if values["pooled_projection_dim"] != values["joint_attention_dim"]:
        raise ValueError(
            f"model.pooled_projection_dim={values['pooled_projection_dim']} must equal "
            f"model.joint_attention_dim={values['joint_attention_dim']}: the pooled vector "
            "is the mean text token"
        )
    return LatentMMDiTConfig(
        sd3_transformer.SD3TransformerConfig(**values),
        null_text_len=int(null_text_len),
        adaln_zero=adaln_zero,
    )


class LatentMMDiT(nnx.Module):
    """SD3Transformer + a learned null text, called as `model(z_t, timesteps, cond)`."""

    time_input = "timesteps"  # what `training.step.model_fn` tells it: diffusers' timesteps

    def __init__(
        self,
        cfg: LatentMMDiTConfig,
        *,
        rngs: nnx.Rngs,
        dtype=jnp.float32,
        param_dtype=jnp.float32,
    ):
        self.cfg = cfg
        self.transformer = sd3_transformer.SD3Transformer(
            cfg.transformer, rngs=rngs, dtype=dtype, param_dtype=param_dtype
        )
        if cfg.adaln_zero:
            sd3_transformer.adaln_zero_init(self.transformer)
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
        keep = mask[..., None].astype(text.dtype)
        text = text * keep
        pooled = text.sum(axis=1) / jnp.maximum(keep.sum(axis=1), 1.0)
        return self.transformer(z_t, t, text, pooled)


# ----------------------------------------------------------------------------------------------
# A public SD 3 pipeline's transformer, trained further


@dataclasses.dataclass(frozen=True)
class PipelineMMDiTConfig(MMDiTWrapperConfig):
    """The transformer of a public SD 3 pipeline (its transformer/config.json) and the length
    of its joint text sequence (77 CLIP tokens + the T5's)."""

    text_len: int = 77 + 77

    @property
    def pooled_dim(self) -> int:
        return self.transformer.pooled_projection_dim


class PipelineMMDiT(nnx.Module):
    """A public SD 3 transformer (`sd3_transformer.SD3Transformer`, loaded from diffusers'
    weights) as the trainer calls a network, `model(z_t, timesteps, cond)`: cond["text"]
    [B, L, D] joint tokens and cond["text_pooled"] [B, P]; where cond["drop_text"] is set,
    the encodings of "" (`empty_text` [1, L, D], `empty_pooled` [1, P], set by the trainer
    from its encoder), as diffusers' SD 3 scripts drop captions and the pipeline guides."""

    time_input = "timesteps"

    def __init__(
        self, cfg: PipelineMMDiTConfig, *, rngs, dtype=jnp.float32, param_dtype=jnp.float32
    ):
        self.cfg = cfg
        self.transformer = sd3_transformer.SD3Transformer(
            cfg.transformer, rngs=rngs, dtype=dtype, param_dtype=param_dtype
        )
        self.empty_text = EmptyText(jnp.zeros((1, cfg.text_len, cfg.text_dim), jnp.float32))
        self.empty_pooled = EmptyText(jnp.zeros((1, cfg.pooled_dim), jnp.float32))

    def __call__(self, z_t, t, cond):
        text, pooled = cond["text"], cond["text_pooled"]
        if "drop_text" in cond:
            drop = cond["drop_text"].astype(bool)
            empty = jnp.broadcast_to(self.empty_text[...].astype(text.dtype), text.shape)
            text = jnp.where(drop[:, None, None], empty, text)
            empty = jnp.broadcast_to(self.empty_pooled[...].astype(pooled.dtype), pooled.shape)
            pooled = jnp.where(drop[:, None], empty, pooled)
        return self.transformer(z_t, t, text, pooled)
