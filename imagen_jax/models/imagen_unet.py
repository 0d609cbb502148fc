"""The Imagen UNets: the text-conditioned base model and the Efficient U-Net of the
super-resolution stages (Saharia et al. 2022, "Photorealistic Text-to-Image Diffusion Models
with Deep Language Understanding", sec. 2.3-2.4 and appendix B).

The network only predicts: `model(z_t, t, cond) -> prediction` with
  z_t   [B, H, W, C] the noised image,
  t     [B] the network time (continuous t in [0, 1], scaled by `time_scale`, or a timestep),
  cond  a dict: "text" [B, L, Dt] frozen text-encoder tokens, "text_mask" [B, L];
        optional "drop_text" [B] bool (True: use the learned null text, for CFG dropout and
        the unconditional branch of guidance); for super-resolution stages "low_res"
        [B, h, w, C] (the noise-augmented low-resolution image) and "aug_t" [B] (its
        augmentation level, Imagen's noise-conditioning augmentation, sec. 2.4).

Text enters through cross-attention at the configured levels and through an attention-pooled
vector added to the time embedding. The Efficient U-Net (appendix B.1) puts more residual
blocks at low resolution, scales skip connections by 1/sqrt(2), downsamples before the blocks
of a level and upsamples after them.
"""

from __future__ import annotations

import dataclasses
import math

import jax
import jax.numpy as jnp
from flax import nnx

from imagen_jax.models import layout_head
from imagen_jax.models import unet_layers as layers
from imagen_jax.models.conv import Conv
from imagen_jax.models.norm import GroupNorm


@dataclasses.dataclass(frozen=True)
class UNetConfig:
    in_channels: int = 3
    out_channels: int = 3  # 2 * in_channels for a learned variance
    channels: int = 64
    channel_mult: tuple[int, ...] = (1, 2, 4)
    num_res_blocks: tuple[int, ...] | int = 2
    attn_levels: tuple[int, ...] = ()  # levels (0 = full resolution) with self-attention
    cross_attn_levels: tuple[int, ...] = ()  # levels with cross-attention to the text
    mid_attn: bool = True
    head_dim: int = 64
    ff_mult: int = 2
    groups: int = 32
    text_dim: int = 384  # the frozen encoder's width (all-MiniLM-L6-v2: 384, T5-XXL: 4096)
    null_text_len: int = 8  # learned null tokens standing in for dropped text
    dropout: float = 0.0
    efficient: bool = False  # Efficient U-Net ordering of down/up-sampling
    skip_scale: float = 1.0 / math.sqrt(2.0)
    time_scale: float = 1000.0  # multiplies t before the sinusoidal embedding
    low_res: bool = False  # a super-resolution stage: concatenate the upsampled low-res image
    # Learned 2-D positional embeddings in the attention blocks (layers.TransformerBlock),
    # zero at initialisation: without them nothing but the convolutions' zero padding tells
    # the network where a pixel is, and attention cannot tell "above" from "below".
    pos_emb: bool = False
    # Trainable transformer layers over the frozen text tokens (layers.TextRefiner), after
    # `text_proj`; each starts as the identity, so a stage grows them with its function kept.
    text_refiner: int = 0
    # > 0: a layout head (layout_head.LayoutHead) predicts the image pooled to this grid from the
    # text, and its prediction (gradient stopped) enters next to the input through a
    # zero-initialised convolution; the head is fitted by its own regression loss
    # (`train.aux_losses.layout`; `python -m imagen_jax.proj.shapes.layout_fit`).
    layout_grid: int = 0
    # What the layout head reads: "frozen", the encoder's tokens; "refined", the tokens after
    # `text_proj` and the token refiner (which needs `text_refiner` > 0), so that the head's
    # regression loss, a direct signal of where each named object is, trains the refiner too.
    layout_text: str = "frozen"
    # Self-attention layers over the tokens inside the layout head (layers.TextRefiner, each
    # the identity at first), before its queries read them: a head that reads the whole
    # sentence rather than each token alone, for wordings it was not fitted on.
    layout_depth: int = 0

    def blocks(self, level: int) -> int:
        n = self.num_res_blocks
        return n if isinstance(n, int) else n[level]


# Sizes. The Imagen paper sizes follow imagen-pytorch's BaseUnet64 / SRUnet256 / SRUnet1024
# (`imagen_pytorch/imagen_pytorch.py`), which follow the paper's appendix F: the 2B-parameter
# 64x64 base (width 512, mults 1,2,3,4, 3 blocks, attention at 32, 16, 8) and the 600M
# Efficient U-Net for 64 -> 256 (width 128, mults 1,2,4,8, blocks 2,4,8,8, attention only at
# the lowest resolution). `python tools/unet_variants.py` prints parameter counts.
VARIANTS = {
    "runlocal": dict(
        channels=16,
        channel_mult=(1, 2),
        num_res_blocks=1,
        attn_levels=(1,),
        cross_attn_levels=(1,),
        head_dim=8,
        groups=4,
        null_text_len=2,
    ),
    "shapes_base": dict(  # the shipped default model's base stage (32 px)
        channels=32,
        channel_mult=(1, 2, 4),
        num_res_blocks=2,
        attn_levels=(1, 2),
        cross_attn_levels=(1, 2),
        head_dim=32,
    ),
    "shapes_sr": dict(  # the shipped default model's super-resolution stage (32 -> 64 px)
        channels=16,
        channel_mult=(1, 2, 4),
        num_res_blocks=(1, 2, 2),
        attn_levels=(),
        cross_attn_levels=(2,),
        head_dim=32,
        efficient=True,
        low_res=True,
    ),
    "imagen_base_2b": dict(
        channels=512,
        channel_mult=(1, 2, 3, 4),
        num_res_blocks=3,
        attn_levels=(1, 2, 3),
        cross_attn_levels=(1, 2, 3),
        head_dim=64,
        text_dim=4096,
    ),
    "imagen_sr256_600m": dict(
        channels=128,
        channel_mult=(1, 2, 4, 8),
        num_res_blocks=(2, 4, 8, 8),
        attn_levels=(3,),
        cross_attn_levels=(3,),
        head_dim=64,
        text_dim=4096,
        efficient=True,
        low_res=True,
    ),
    "imagen_sr1024_400m": dict(
        channels=128,
        channel_mult=(1, 2, 4, 8),
        num_res_blocks=(2, 4, 8, 8),
        attn_levels=(),
        cross_attn_levels=(3,),
        mid_attn=False,
        head_dim=64,
        text_dim=4096,
        efficient=True,
        low_res=True,
    ),
}


def make_config(variant: str, **overrides) -> UNetConfig:
    if variant not in VARIANTS:
        raise ValueError(f"unknown UNet variant {variant!r}; expected one of {tuple(VARIANTS)}")
    fields = {f.name for f in dataclasses.fields(UNetConfig)}
    unknown = sorted(set(overrides) - fields)
    if unknown:
        raise ValueError(f"unknown UNet config keys {unknown}; allowed: {sorted(fields)}")
    cfg = UNetConfig(**{**VARIANTS[variant], **overrides})
    if cfg.layout_text not in ("frozen", "refined"):
        raise ValueError(f"layout_text={cfg.layout_text!r}; expected 'frozen' or 'refined'")
    if cfg.layout_text == "refined" and not (cfg.layout_grid and cfg.text_refiner):
        raise ValueError(
            "layout_text='refined' reads the token refiner's output into the layout head: set "
            f"layout_grid and text_refiner above 0 (they are {cfg.layout_grid}, "
            f"{cfg.text_refiner})"
        )
    if cfg.layout_depth and not cfg.layout_grid:
        raise ValueError(
            f"layout_depth={cfg.layout_depth} adds layers to the layout head: set layout_grid "
            "above 0"
        )
    return cfg


class _Level(nnx.Module):
    """The residual blocks (and attention) of one resolution level."""

    def __init__(self, cfg: UNetConfig, in_chs, out_ch, emb_dim, *, attn, cross, rngs, kw):
        self.res = nnx.List(
            [
                layers.ResBlock(
                    c, out_ch, emb_dim, groups=cfg.groups, dropout=cfg.dropout, rngs=rngs, **kw
                )
                for c in in_chs
            ]
        )
        self.attn = nnx.List(
            [
                layers.TransformerBlock(
                    out_ch,
                    text_dim=cfg.text_dim,
                    self_attn=attn,
                    cross_attn=cross,
                    head_dim=cfg.head_dim,
                    ff_mult=cfg.ff_mult,
                    groups=cfg.groups,
                    pos_emb=cfg.pos_emb,
                    rngs=rngs,
                    **kw,
                )
                if (attn or cross)
                else None
                for _ in in_chs
            ]
        )


class ImagenUNet(nnx.Module):
    def __init__(self, cfg: UNetConfig, *, rngs: nnx.Rngs, dtype=None, param_dtype=jnp.float32):
        kw = dict(dtype=dtype, param_dtype=param_dtype)
        self.cfg = cfg
        ch, emb_dim = cfg.channels, 4 * cfg.channels
        self.time_in = nnx.Linear(ch, emb_dim, rngs=rngs, **kw)
        self.time_out = nnx.Linear(emb_dim, emb_dim, rngs=rngs, **kw)
        self.aug_in = nnx.Linear(ch, emb_dim, rngs=rngs, **kw) if cfg.low_res else None
        self.text_proj = nnx.Linear(cfg.text_dim, cfg.text_dim, rngs=rngs, **kw)
        self.text_refiner = (
            layers.TextRefiner(
                cfg.text_dim,
                cfg.text_refiner,
                head_dim=cfg.head_dim,
                ff_mult=cfg.ff_mult,
                rngs=rngs,
                **kw,
            )
            if cfg.text_refiner
            else None
        )
        self.null_text = nnx.Param(
            jax.random.normal(rngs.params(), (1, cfg.null_text_len, cfg.text_dim)) * 0.02
        )
        self.text_pool = layers.AttentionPool(
            cfg.text_dim, emb_dim, head_dim=cfg.head_dim, rngs=rngs, **kw
        )
        in_ch = cfg.in_channels * (2 if cfg.low_res else 1)
        self.conv_in = Conv(in_ch, ch, (3, 3), rngs=rngs, **kw)
        grid = cfg.layout_grid
        self.layout_scale = 1.0  # the gain on the head's prediction (a sampling setting)
        self.layout = (
            layout_head.LayoutHead(
                cfg.text_dim, grid, cfg.in_channels, depth=cfg.layout_depth, rngs=rngs, **kw
            )
            if grid
            else None
        )
        self.layout_in = (
            Conv(cfg.in_channels, ch, (3, 3), kernel_init=layers.zeros_init, rngs=rngs, **kw)
            if grid
            else None
        )

        widths = [ch * m for m in cfg.channel_mult]
        self.down, self.downsample = nnx.List(), nnx.List()
        skips, prev = [ch], ch
        for i, w in enumerate(widths):
            n = cfg.blocks(i)
            if i > 0:  # resample between levels: before the blocks (efficient) or after
                self.downsample.append(layers.Downsample(prev, prev, rngs=rngs, **kw))
                if not cfg.efficient:
                    skips.append(prev)
            else:
                self.downsample.append(None)
            self.down.append(
                _Level(
                    cfg,
                    [prev] + [w] * (n - 1),
                    w,
                    emb_dim,
                    attn=i in cfg.attn_levels,
                    cross=i in cfg.cross_attn_levels,
                    rngs=rngs,
                    kw=kw,
                )
            )
            skips += [w] * n
            prev = w
        self.mid1 = layers.ResBlock(prev, prev, emb_dim, groups=cfg.groups, rngs=rngs, **kw)
        self.mid_attn = layers.TransformerBlock(
            prev,
            text_dim=cfg.text_dim,
            self_attn=cfg.mid_attn,
            head_dim=cfg.head_dim,
            groups=cfg.groups,
            pos_emb=cfg.pos_emb,
            rngs=rngs,
            **kw,
        )
        self.mid2 = layers.ResBlock(prev, prev, emb_dim, groups=cfg.groups, rngs=rngs, **kw)

        self.up, self.upsample = nnx.List(), nnx.List()
        for i in reversed(range(len(widths))):
            w = widths[i]
            n = cfg.blocks(i) + (0 if cfg.efficient else 1)
            if i == 0 and cfg.efficient:
                n += 1  # the conv_in skip
            in_chs = []
            for _ in range(n):
                in_chs.append(prev + skips.pop())
                prev = w
            self.up.append(
                _Level(
                    cfg,
                    in_chs,
                    w,
                    emb_dim,
                    attn=i in cfg.attn_levels,
                    cross=i in cfg.cross_attn_levels,
                    rngs=rngs,
                    kw=kw,
                )
            )
            self.upsample.append(layers.Upsample(w, w, rngs=rngs, **kw) if i > 0 else None)
        assert not skips, skips
        self.norm_out = GroupNorm(
            prev, num_groups=layers.group_count(prev, cfg.groups), rngs=rngs, **kw
        )
        self.conv_out = Conv(
            prev, cfg.out_channels, (3, 3), kernel_init=layers.zeros_init, rngs=rngs, **kw
        )

    # ------------------------------------------------------------------------------------------

    def _text(self, cond):
        """Projected (and refined) text tokens and mask, the learned null text where `drop_text`
        is set."""
        text = self.text_proj(cond["text"])  # [B, L, Dt]
        mask = cond["text_mask"].astype(bool)
        if self.text_refiner is not None:
            text = self.text_refiner(text, mask)
        if "drop_text" not in cond:
            return text, mask
        drop = cond["drop_text"].astype(bool)
        b, length = mask.shape
        null = jnp.broadcast_to(
            self.null_text[...].astype(text.dtype), (b, self.cfg.null_text_len, text.shape[-1])
        )
        null = jnp.pad(null, ((0, 0), (0, max(0, length - null.shape[1])), (0, 0)))[:, :length]
        null_mask = jnp.arange(length)[None, :] < self.cfg.null_text_len
        text = jnp.where(drop[:, None, None], null, text)
        mask = jnp.where(drop[:, None], null_mask, mask)
        return text, mask

    def _embedding(self, t, cond, text, mask):
        ch = self.cfg.channels
        emb = layers.timestep_embedding(t * self.cfg.time_scale, ch)
        emb = self.time_out(jax.nn.silu(self.time_in(emb)))
        if self.aug_in is not None:
            aug = layers.timestep_embedding(cond["aug_t"] * self.cfg.time_scale, ch)
            emb = emb + self.aug_in(aug)
        return emb + self.text_pool(text, mask)

    def _input(self, z_t, cond):
        if not self.cfg.low_res:
            return z_t
        b, h, w, c = z_t.shape
        low = jax.image.resize(cond["low_res"].astype(z_t.dtype), (b, h, w, c), "bilinear")
        return jnp.concatenate([z_t, low], axis=-1)

    def layout_prediction(self, text, mask):
        """The layout head's prediction [B, G, G, C] from the caption's frozen tokens [B, L, D]
        (read as they are or refined, `cfg.layout_text`)."""
        mask = mask.astype(bool)
        if self.cfg.layout_text == "refined":
            text = self.text_refiner(self.text_proj(text), mask)
        return self.layout(text, mask)

    def _layout_hint(self, z_t, cond):
        """The layout head's prediction from the text (zero where the text is dropped),
        gradient stopped, times `layout_scale`, upsampled to the image, through
        `layout_in`."""
        pred = jax.lax.stop_gradient(self.layout_prediction(cond["text"], cond["text_mask"]))
        pred = pred * self.layout_scale
        if "drop_text" in cond:
            pred = jnp.where(cond["drop_text"].astype(bool)[:, None, None, None], 0.0, pred)
        b, h, w, _ = z_t.shape
        pred = jax.image.resize(pred.astype(z_t.dtype), (b, h, w, pred.shape[-1]), "bilinear")
        return self.layout_in(pred)

    def __call__(self, z_t, t, cond):
        cfg = self.cfg
        text, mask = self._text(cond)
        emb = self._embedding(t, cond, text, mask)
        h = self.conv_in(self._input(z_t, cond))  # [B, H, W, C]
        if self.layout is not None:
            h = h + self._layout_hint(z_t, cond)
        skips = [h]
        for level, down in zip(self.down, self.downsample, strict=True):
            if down is not None:
                h = down(h)
                if not cfg.efficient:
                    skips.append(h)
            for res, attn in zip(level.res, level.attn, strict=True):
                h = res(h, emb)
                if attn is not None:
                    h = attn(h, text, mask)
                skips.append(h)
        h = self.mid2(self.mid_attn(self.mid1(h, emb), text, mask), emb)
        for level, up in zip(self.up, self.upsample, strict=True):
            for res, attn in zip(level.res, level.attn, strict=True):
                h = res(jnp.concatenate([h, skips.pop() * cfg.skip_scale], axis=-1), emb)
                if attn is not None:
                    h = attn(h, text, mask)
            if up is not None:
                h = up(h)
        assert not skips
        return self.conv_out(jax.nn.silu(self.norm_out(h)))


def count_params(cfg: UNetConfig) -> int:
    """Parameter count, from shapes only (nothing is allocated)."""
    model = nnx.eval_shape(lambda: ImagenUNet(cfg, rngs=nnx.Rngs(0)))
    return sum(x.size for x in jax.tree.leaves(nnx.state(model, nnx.Param)))
