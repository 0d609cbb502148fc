"""The KL-regularized autoencoder of latent diffusion (Rombach et al. 2022, "High-Resolution
Image Synthesis with Latent Diffusion Models", sec. 3), as diffusers'
`AutoencoderKL`: the VAE of Stable Diffusion 1.x/2.x, SDXL, SD3 and Flux.

Layout: activations are channels-last, images [B, H, W, C] in [-1, 1] and latents
[B, H/f, W/f, latent_channels] with f = 2 ** (len(block_out_channels) - 1); diffusers works
in [B, C, H, W]. Convolution kernels are Flax's [kh, kw, in, out]; the loader permutes
PyTorch's [out, in, kh, kw] into it.

The encoder is conv_in, down blocks (ResNet blocks, then a stride-2 convolution with
diffusers' asymmetric zero padding: one row and column after the input, none before), a
mid block (ResNet, single-head self-attention over the pixels, ResNet), GroupNorm, SiLU and
conv_out to the mean and log-variance of a diagonal Gaussian; the decoder mirrors it with
nearest-neighbour 2x upsampling and layers_per_block + 1 ResNet blocks per level.

`load_vae(path)` reads a diffusers directory (`config.json` +
`diffusion_pytorch_model.safetensors`) strictly; `save_vae(path, params, config)` writes one
(the inverse of `hf_key_map`), as the VAE trainer exports its weights. Tiled encoding and
decoding reproduce diffusers' `enable_tiling()`: overlapping tiles, each through the network
alone, blended linearly where they overlap.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import os
from collections.abc import Callable, Iterable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from absl import logging
from flax import nnx

from imagen_jax.models.attention import dot_product_attention
from imagen_jax.models.diffusers_loading import TORCH_CONV_TO_FLAX
from imagen_jax.models.norm import GroupNorm
from imagen_jax.weights import (
    Checkpoint,
    CheckpointError,
    Source,
    checkpoint_tensors,
    load_into,
    read_config,
)
from imagen_jax.weights.hf import DIFFUSERS_WEIGHTS_NAME

CLASS_NAME = "AutoencoderKL"
DOWN_BLOCK_TYPES = ("DownEncoderBlock2D",)
UP_BLOCK_TYPES = ("UpDecoderBlock2D",)
EPS = 1e-6  # every GroupNorm of diffusers' Encoder and Decoder
LOGVAR_RANGE = (-30.0, 20.0)  # diffusers' DiagonalGaussianDistribution clamps the log-variance

# Attention tensors of checkpoints saved before diffusers 0.14 (same shapes, old names); the
# current names come first.
_LEGACY_ATTENTION = {"to_q": "query", "to_k": "key", "to_v": "value", "to_out.0": "proj_attn"}


def _mish(x):
    return x * jnp.tanh(jax.nn.softplus(x))


# diffusers' `get_activation` names (torch's nn.GELU is the exact, erf form).
ACTIVATIONS: dict[str, Callable[[jax.Array], jax.Array]] = {
    "silu": jax.nn.silu,
    "swish": jax.nn.silu,
    "relu": jax.nn.relu,
    "gelu": functools.partial(jax.nn.gelu, approximate=False),
    "mish": _mish,
}


@dataclasses.dataclass(frozen=True)
class VAEConfig:
    # Defaults: diffusers' AutoencoderKL (a one-level toy); public VAEs set every field.
    in_channels: int = 3
    out_channels: int = 3
    down_block_types: tuple[str, ...] = ("DownEncoderBlock2D",)
    up_block_types: tuple[str, ...] = ("UpDecoderBlock2D",)
    block_out_channels: tuple[int, ...] = (64,)
    layers_per_block: int = 1
    act_fn: str = "silu"  # silu | swish | relu | gelu | mish (the ResNet blocks' activation)
    latent_channels: int = 4
    norm_num_groups: int = 32
    sample_size: int = 32  # also the default tile size (pixels) of tiled encode / decode
    scaling_factor: float = 0.18215
    shift_factor: float | None = None  # SD3 / Flux: latents are (z - shift) * scale
    latents_mean: tuple[float, ...] | None = None  # per channel, instead of shift_factor
    latents_std: tuple[float, ...] | None = None
    force_upcast: bool = True  # diffusers runs the VAE in float32 under float16 pipelines
    use_quant_conv: bool = True
    use_post_quant_conv: bool = True
    mid_block_add_attention: bool = True

    def __post_init__(self):
        for key, value, allowed in (
            ("down_block_types", self.down_block_types, DOWN_BLOCK_TYPES),
            ("up_block_types", self.up_block_types, UP_BLOCK_TYPES),
        ):
            bad = [t for t in value if t not in allowed]
            if bad:
                raise ValueError(
                    f"VAE config: {key} has unsupported block type(s) {bad}; supported: "
                    f"{', '.join(allowed)}"
                )
        if self.act_fn not in ACTIVATIONS:
            raise ValueError(
                f"VAE config: act_fn {self.act_fn!r} is not supported; supported: "
                f"{', '.join(ACTIVATIONS)}"
            )
        n = len(self.block_out_channels)
        if not (n == len(self.down_block_types) == len(self.up_block_types)) or n == 0:
            raise ValueError(
                f"VAE config: block_out_channels {self.block_out_channels}, down_block_types "
                f"{self.down_block_types} and up_block_types {self.up_block_types} must be "
                "non-empty and of the same length"
            )
        odd = [c for c in self.block_out_channels if c % self.norm_num_groups]
        if odd:
            raise ValueError(
                f"VAE config: norm_num_groups {self.norm_num_groups} does not divide "
                f"block_out_channels {odd}"
            )
        for key in ("latents_mean", "latents_std"):
            value = getattr(self, key)
            if value is not None and len(value) != self.latent_channels:
                raise ValueError(
                    f"VAE config: {key} has {len(value)} entries for "
                    f"{self.latent_channels} latent channels"
                )
        if (self.latents_mean is None) != (self.latents_std is None):
            raise ValueError("VAE config: latents_mean and latents_std go together")

    @classmethod
    def from_hf(cls, hf: dict) -> VAEConfig:
        """From the config.json of a diffusers AutoencoderKL (keys starting with `_` are
        diffusers' bookkeeping; other unknown keys are logged and ignored)."""
        fields = {f.name for f in dataclasses.fields(cls)}
        ignored = sorted(k for k in hf if k not in fields and not k.startswith("_"))
        if ignored:
            logging.warning("VAE config: ignoring keys %s", ", ".join(ignored))
        values = {k: v for k, v in hf.items() if k in fields}
        for key in ("down_block_types", "up_block_types", "block_out_channels"):
            if key in values:
                values[key] = tuple(values[key])
        for key in ("latents_mean", "latents_std"):
            if values.get(key) is not None:
                values[key] = tuple(float(v) for v in values[key])
        size = values.get("sample_size")
        if isinstance(size, (list, tuple)):  # diffusers tiles by its first entry
            values["sample_size"] = int(size[0])
        return cls(**values)

    @property
    def downsample_factor(self) -> int:
        """Pixels per latent along each side."""
        return 2 ** (len(self.block_out_channels) - 1)


class DiagonalGaussian(NamedTuple):
    """The encoder's posterior q(z | x) = N(mean, exp(logvar)), both [B, h, w, latent]."""

    mean: jax.Array
    logvar: jax.Array  # clamped to LOGVAR_RANGE, as diffusers does

    @property
    def std(self) -> jax.Array:
        return jnp.exp(0.5 * self.logvar)

    def sample(self, key: jax.Array) -> jax.Array:
        noise = jax.random.normal(key, self.mean.shape, jnp.float32).astype(self.mean.dtype)
        return self.mean + self.std * noise

    def mode(self) -> jax.Array:
        return self.mean

    def kl(self) -> jax.Array:
        """KL(q || N(0, I)) per example, summed over the latent, [B]."""
        var = jnp.exp(self.logvar)
        return 0.5 * jnp.sum(jnp.square(self.mean) + var - 1.0 - self.logvar, axis=(1, 2, 3))


# ----------------------------------------------------------------------------------------------
# The network
# ----------------------------------------------------------------------------------------------


def _kw(rngs, dtype, param_dtype, precision) -> dict[str, Any]:
    return dict(rngs=rngs, dtype=dtype, param_dtype=param_dtype, precision=precision)


def _conv(in_ch, out_ch, kernel=3, *, stride=1, padding=None, **kw) -> nnx.Conv:
    """PyTorch's Conv2d(kernel, stride, padding=kernel // 2) unless `padding` is given."""
    pad = kernel // 2
    return nnx.Conv(
        in_ch,
        out_ch,
        (kernel, kernel),
        strides=(stride, stride),
        padding=padding if padding is not None else ((pad, pad), (pad, pad)),
        **kw,
    )


def _norm(channels, groups, *, rngs, dtype, param_dtype, precision=None) -> GroupNorm:
    del precision
    return GroupNorm(
        channels,
        num_groups=groups,
        epsilon=EPS,
        use_fast_variance=False,  # torch's two-pass variance
        rngs=rngs,
        dtype=dtype,
        param_dtype=param_dtype,
    )


class ResnetBlock(nnx.Module):
    """diffusers' ResnetBlock2D without a time embedding (He et al. 2016, pre-activation)."""

    def __init__(self, in_ch, out_ch, *, groups, act_fn, **kw):
        self.norm1 = _norm(in_ch, groups, **kw)
        self.conv1 = _conv(in_ch, out_ch, **kw)
        self.norm2 = _norm(out_ch, groups, **kw)
        self.conv2 = _conv(out_ch, out_ch, **kw)
        self.conv_shortcut = _conv(in_ch, out_ch, 1, **kw) if in_ch != out_ch else None
        self.act = ACTIVATIONS[act_fn]

    def __call__(self, x):  # [B, H, W, Cin] -> [B, H, W, Cout]
        h = self.conv1(self.act(self.norm1(x)))
        h = self.conv2(self.act(self.norm2(h)))
        return h + (x if self.conv_shortcut is None else self.conv_shortcut(x))


class Downsample(nnx.Module):
    """A stride-2 3x3 convolution after zero padding of one row at the bottom and one column
    at the right (diffusers' Downsample2D with padding=0, from the original LDM code)."""

    def __init__(self, ch, **kw):
        self.conv = _conv(ch, ch, stride=2, padding=((0, 1), (0, 1)), **kw)

    def __call__(self, x):  # [B, H, W, C] -> [B, H/2, W/2, C]
        return self.conv(x)


class Upsample(nnx.Module):
    """Nearest-neighbour 2x upsampling, then a 3x3 convolution (diffusers' Upsample2D)."""

    def __init__(self, ch, **kw):
        self.conv = _conv(ch, ch, **kw)

    def __call__(self, x):  # [B, H, W, C] -> [B, 2H, 2W, C]
        return self.conv(jnp.repeat(jnp.repeat(x, 2, axis=1), 2, axis=2))


class SpatialAttention(nnx.Module):
    """Single-head self-attention over the pixels with a GroupNorm in front and a residual
    around it (diffusers' Attention as built by UNetMidBlock2D: heads = 1, dim_head = C)."""

    def __init__(self, ch, *, groups, **kw):
        self.group_norm = _norm(ch, groups, **kw)
        self.to_q, self.to_k, self.to_v, self.to_out = (nnx.Linear(ch, ch, **kw) for _ in range(4))

    def __call__(self, x):  # [B, H, W, C]
        b, hh, ww, c = x.shape
        h = self.group_norm(x).reshape(b, hh * ww, c)  # [B, T, C]
        q, k, v = self.to_q(h), self.to_k(h), self.to_v(h)
        out = dot_product_attention(*(t[:, :, None] for t in (q, k, v)))[:, :, 0]  # one head
        return x + self.to_out(out).reshape(b, hh, ww, c)


class MidBlock(nnx.Module):
    """ResNet, attention (unless mid_block_add_attention is False), ResNet: UNetMidBlock2D."""

    def __init__(self, ch, *, groups, act_fn, attention, **kw):
        block = functools.partial(ResnetBlock, ch, ch, groups=groups, act_fn=act_fn, **kw)
        self.resnets = nnx.List([block(), block()])
        self.attention = SpatialAttention(ch, groups=groups, **kw) if attention else None

    def __call__(self, x):
        x = self.resnets[0](x)
        if self.attention is not None:
            x = self.attention(x)
        return self.resnets[1](x)


class DownBlock(nnx.Module):
    """diffusers' DownEncoderBlock2D: ResNet blocks, then (unless last) a Downsample."""

    def __init__(self, in_ch, out_ch, *, layers, downsample, groups, act_fn, **kw):
        self.resnets = nnx.List(
            [
                ResnetBlock(in_ch if i == 0 else out_ch, out_ch, groups=groups, act_fn=act_fn, **kw)
                for i in range(layers)
            ]
        )
        self.downsample = Downsample(out_ch, **kw) if downsample else None

    def __call__(self, x):
        for resnet in self.resnets:
            x = resnet(x)
        return x if self.downsample is None else self.downsample(x)


class UpBlock(nnx.Module):
    """diffusers' UpDecoderBlock2D: ResNet blocks, then (unless last) an Upsample."""

    def __init__(self, in_ch, out_ch, *, layers, upsample, groups, act_fn, **kw):
        self.resnets = nnx.List(
            [
                ResnetBlock(in_ch if i == 0 else out_ch, out_ch, groups=groups, act_fn=act_fn, **kw)
                for i in range(layers)
            ]
        )
        self.upsample = Upsample(out_ch, **kw) if upsample else None

    def __call__(self, x):
        for resnet in self.resnets:
            x = resnet(x)
        return x if self.upsample is None else self.upsample(x)


class Encoder(nnx.Module):
    """Images [B, H, W, in] -> posterior moments [B, H/f, W/f, 2 * latent] (mean, logvar)."""

    def __init__(self, config: VAEConfig, **kw):
        ch, n = config.block_out_channels, len(config.block_out_channels)
        block_kw = dict(groups=config.norm_num_groups, act_fn=config.act_fn, **kw)
        self.conv_in = _conv(config.in_channels, ch[0], **kw)
        self.down_blocks = nnx.List(
            [
                DownBlock(
                    ch[max(i - 1, 0)],
                    ch[i],
                    layers=config.layers_per_block,
                    downsample=i < n - 1,
                    **block_kw,
                )
                for i in range(n)
            ]
        )
        self.mid_block = MidBlock(ch[-1], attention=config.mid_block_add_attention, **block_kw)
        self.conv_norm_out = _norm(ch[-1], config.norm_num_groups, **kw)
        self.conv_out = _conv(ch[-1], 2 * config.latent_channels, **kw)

    def __call__(self, x):
        x = self.conv_in(x)
        for block in self.down_blocks:
            x = block(x)
        x = self.mid_block(x)
        return self.conv_out(jax.nn.silu(self.conv_norm_out(x)))  # always SiLU, as diffusers


class Decoder(nnx.Module):
    """Latents [B, h, w, latent] -> images [B, h * f, w * f, out]."""

    def __init__(self, config: VAEConfig, **kw):
        ch = tuple(reversed(config.block_out_channels))
        block_kw = dict(groups=config.norm_num_groups, act_fn=config.act_fn, **kw)
        self.conv_in = _conv(config.latent_channels, ch[0], **kw)
        self.mid_block = MidBlock(ch[0], attention=config.mid_block_add_attention, **block_kw)
        self.up_blocks = nnx.List(
            [
                UpBlock(
                    ch[max(i - 1, 0)],
                    ch[i],
                    layers=config.layers_per_block + 1,
                    upsample=i < len(ch) - 1,
                    **block_kw,
                )
                for i in range(len(ch))
            ]
        )
        self.conv_norm_out = _norm(ch[-1], config.norm_num_groups, **kw)
        self.conv_out = _conv(ch[-1], config.out_channels, **kw)

    def __call__(self, z):
        x = self.mid_block(self.conv_in(z))
        for block in self.up_blocks:
            x = block(x)
        return self.conv_out(jax.nn.silu(self.conv_norm_out(x)))


class AutoencoderKL(nnx.Module):
    """diffusers' AutoencoderKL in Flax NNX, channels-last.

    Images are [B, H, W, in_channels] in [-1, 1]; latents [B, H/f, W/f, latent_channels].
    `encode` and `decode` work on the autoencoder's own latent z; `latents_from_images` and
    `images_from_latents` add the normalization that diffusion models are trained on.
    Nothing is jitted here: wrap calls in `nnx.jit` (tiled calls included: their tiles
    run under `lax.map`, one network copy per tile shape, so compiled programs stay small).
    """

    def __init__(
        self,
        config: VAEConfig,
        *,
        rngs: nnx.Rngs,
        dtype=jnp.float32,
        param_dtype=jnp.float32,
        precision: jax.lax.PrecisionLike = None,
    ):
        """`precision` goes to every convolution and matmul (None: the backend's default,
        which on GPUs may be TF32 for float32; `jax.lax.Precision.HIGHEST` avoids that)."""
        self.config = config
        kw = _kw(rngs, dtype, param_dtype, precision)
        self.encoder = Encoder(config, **kw)
        self.decoder = Decoder(config, **kw)
        moments, latent = 2 * config.latent_channels, config.latent_channels
        self.quant_conv = _conv(moments, moments, 1, **kw) if config.use_quant_conv else None
        self.post_quant_conv = (
            _conv(latent, latent, 1, **kw) if config.use_post_quant_conv else None
        )

    # -- the autoencoder's own latent ----------------------------------------------------------

    def encode(self, x: jax.Array, *, tiled: bool = False) -> DiagonalGaussian:
        """Images [B, H, W, C] -> the posterior over latents [B, H/f, W/f, latent].

        tiled: as diffusers with tiling enabled: tiles of config.sample_size pixels when the
          image is larger than one (see `tiled_encode`).
        """
        if tiled and max(x.shape[1:3]) > self.config.sample_size:
            return self.tiled_encode(x)
        return _gaussian(self._moments(x))

    def decode(self, z: jax.Array, *, tiled: bool = False) -> jax.Array:
        """Latents [B, h, w, latent] -> images [B, h * f, w * f, out] (unclipped, ~[-1, 1]).

        tiled: as diffusers with tiling enabled: tiles of config.sample_size pixels when the
          latent is larger than one tile (see `tiled_decode`).
        """
        tile = self.config.sample_size // self.config.downsample_factor
        if tiled and max(z.shape[1:3]) > tile:
            return self.tiled_decode(z)
        return self._decode_tile(z)

    def __call__(self, x: jax.Array, key: jax.Array | None = None) -> jax.Array:
        """Reconstruction: the posterior's mode (or a sample with `key`), decoded."""
        posterior = self.encode(x)
        return self.decode(posterior.mode() if key is None else posterior.sample(key))

    def _moments(self, x):  # [B, H, W, C] -> [B, H/f, W/f, 2 * latent]
        h = self.encoder(x)
        return h if self.quant_conv is None else self.quant_conv(h)

    def _decode_tile(self, z):
        if self.post_quant_conv is not None:
            z = self.post_quant_conv(z)
        return self.decoder(z)

    # -- tiles -------------------------------------------------------------------------------

    def tiled_encode(
        self, x: jax.Array, *, tile_sample_size: int | None = None, overlap: float = 0.25
    ) -> DiagonalGaussian:
        """Encodes overlapping tiles of `tile_sample_size` pixels (default config.sample_size)
        one at a time and blends their moments: diffusers' `_tiled_encode`. The result
        differs from `encode` near tile borders (each tile sees only itself)."""
        sample = tile_sample_size or self.config.sample_size
        moments = tiled_apply(
            x,
            self._split_apply(AutoencoderKL._moments),
            tile_in=sample,
            tile_out=sample // self.config.downsample_factor,
            overlap=overlap,
        )
        return _gaussian(moments)

    def tiled_decode(
        self, z: jax.Array, *, tile_sample_size: int | None = None, overlap: float = 0.25
    ) -> jax.Array:
        """Decodes overlapping latent tiles of tile_sample_size / f (pixels: default
        config.sample_size) one at a time and blends the images: diffusers' `tiled_decode`
        (the network's activations are those of one tile, whatever the image size)."""
        sample = tile_sample_size or self.config.sample_size
        return tiled_apply(
            z,
            self._split_apply(AutoencoderKL._decode_tile),
            tile_in=sample // self.config.downsample_factor,
            tile_out=sample,
            overlap=overlap,
        )

    def _split_apply(self, method):
        """`method` of this model as a function of arrays only, for use under `lax.map`."""
        graphdef, state = nnx.split(self)
        return lambda x: method(nnx.merge(graphdef, state), x)

    # -- the latent space that diffusion models see -----------------------------------------

    def latents_from_images(self, images: jax.Array, key: jax.Array | None = None, **kw):
        """Images [B, H, W, C] in [-1, 1] -> normalized latents: the posterior's mode (or a
        sample with `key`) z, as (z - shift) * scaling_factor / std (`latent_normalization`).
        Keyword arguments go to `encode` (tiled=...)."""
        posterior = self.encode(images, **kw)
        z = posterior.mode() if key is None else posterior.sample(key)
        shift, std = latent_normalization(self.config)
        return ((z - shift) * (self.config.scaling_factor / std)).astype(z.dtype)

    def images_from_latents(self, latents: jax.Array, **kw) -> jax.Array:
        """The inverse of `latents_from_images`, then `decode` (keyword arguments go to it)."""
        shift, std = latent_normalization(self.config)
        z = latents * (std / self.config.scaling_factor) + shift
        return self.decode(z.astype(latents.dtype), **kw)


def _gaussian(moments: jax.Array) -> DiagonalGaussian:
    mean, logvar = jnp.split(moments, 2, axis=-1)
    return DiagonalGaussian(mean, jnp.clip(logvar, *LOGVAR_RANGE))


def latent_normalization(config: VAEConfig) -> tuple[Any, Any]:
    """(shift, std) with latents = (z - shift) * scaling_factor / std, as diffusers'
    pipelines use: per-channel latents_mean / latents_std where the config has them (SDXL
    pipelines), else shift_factor (SD3, Flux) or 0, and std 1 (SD 1.x/2.x)."""
    if config.latents_mean is not None:
        return jnp.asarray(config.latents_mean), jnp.asarray(config.latents_std)
    return config.shift_factor or 0.0, 1.0


# ----------------------------------------------------------------------------------------------
# Tiling
# ----------------------------------------------------------------------------------------------


def tiled_apply(
    x: jax.Array,
    fn: Callable[[jax.Array], jax.Array],
    *,
    tile_in: int,
    tile_out: int,
    overlap: float = 0.25,
) -> jax.Array:
    """`fn` ([B, h, w, C] -> [B, h * s, w * s, C'], s = tile_out / tile_in) on overlapping
    tiles of x, blended: diffusers' tiling of AutoencoderKL, kept exactly.

    Tiles of `tile_in` start every int(tile_in * (1 - overlap)) along H and W (those at the
    end are cut by the border); each output tile is blended linearly over its first
    int(tile_out * overlap) rows and columns with the (already blended) tiles above and to its
    left, then cropped to tile_out minus that blend width, and the crops are concatenated.
    Tiles of one shape run one after the other under `lax.map`.
    """
    step = int(tile_in * (1 - overlap))
    if step < 1 or not 0 <= overlap < 1:
        raise ValueError(f"tile of {tile_in} with overlap {overlap} leaves no step between tiles")
    blend = int(tile_out * overlap)
    keep = tile_out - blend
    rows, cols = range(0, x.shape[1], step), range(0, x.shape[2], step)
    windows = {(i, j): x[:, i : i + tile_in, j : j + tile_in] for i in rows for j in cols}
    tiles = _apply_by_shape(windows, fn)
    out_rows = []
    for r, i in enumerate(rows):
        for c, j in enumerate(cols):
            tile = tiles[(i, j)]
            if r:
                tile = _blend(tiles[(rows[r - 1], j)], tile, blend, axis=1)
            if c:
                tile = _blend(tiles[(i, cols[c - 1])], tile, blend, axis=2)
            tiles[(i, j)] = tile
        out_rows.append(jnp.concatenate([tiles[(i, j)][:, :keep, :keep] for j in cols], axis=2))
    return jnp.concatenate(out_rows, axis=1)


def _apply_by_shape(windows: dict, fn) -> dict:
    """{key: fn(window)}, with windows of equal shape stacked and mapped sequentially."""
    groups: dict[tuple, list] = {}
    for key, window in windows.items():
        groups.setdefault(window.shape, []).append(key)
    out = {}
    for keys in groups.values():
        results = jax.lax.map(fn, jnp.stack([windows[k] for k in keys]))  # [n, B, h, w, C]
        out.update({k: results[n] for n, k in enumerate(keys)})
    return out


def _blend(a: jax.Array, b: jax.Array, extent: int, *, axis: int) -> jax.Array:
    """b with its first `extent` entries along `axis` faded in linearly from a's last ones
    (diffusers' blend_v for axis 1 (H), blend_h for axis 2 (W))."""
    extent = min(a.shape[axis], b.shape[axis], extent)
    if extent == 0:
        return b
    shape = [1] * b.ndim
    shape[axis] = extent
    w = (jnp.arange(extent, dtype=jnp.float32) / extent).reshape(shape)
    head_a = jax.lax.slice_in_dim(a, a.shape[axis] - extent, a.shape[axis], axis=axis)
    head_b = jax.lax.slice_in_dim(b, 0, extent, axis=axis)
    mixed = (head_a * (1 - w) + head_b * w).astype(b.dtype)
    rest = jax.lax.slice_in_dim(b, extent, b.shape[axis], axis=axis)
    return jnp.concatenate([mixed, rest], axis=axis)


# ----------------------------------------------------------------------------------------------
# Loading diffusers checkpoints
# ----------------------------------------------------------------------------------------------


def _conv_map(m, ours, hf):
    m[(*ours, "kernel")] = Source.of(f"{hf}.weight", permute=TORCH_CONV_TO_FLAX)
    m[(*ours, "bias")] = Source.of(f"{hf}.bias")


def _norm_map(m, ours, hf):
    m[(*ours, "scale")] = Source.of(f"{hf}.weight")
    m[(*ours, "bias")] = Source.of(f"{hf}.bias")


def _resnet_map(m, ours, hf, in_ch, out_ch):
    for n in ("norm1", "norm2"):
        _norm_map(m, (*ours, n), f"{hf}.{n}")
    for n in ("conv1", "conv2") + (("conv_shortcut",) if in_ch != out_ch else ()):
        _conv_map(m, (*ours, n), f"{hf}.{n}")


def _mid_map(m, ours, hf, ch, attention):
    for i in range(2):
        _resnet_map(m, (*ours, "resnets", i), f"{hf}.resnets.{i}", ch, ch)
    if not attention:
        return
    a, hf_a = (*ours, "attention"), f"{hf}.attentions.0"
    _norm_map(m, (*a, "group_norm"), f"{hf_a}.group_norm")
    for n, hf_n in (("to_q", "to_q"), ("to_k", "to_k"), ("to_v", "to_v"), ("to_out", "to_out.0")):
        new, old = f"{hf_a}.{hf_n}", f"{hf_a}.{_LEGACY_ATTENTION[hf_n]}"
        m[(*a, n, "kernel")] = Source.of(f"{new}.weight", f"{old}.weight", transpose=True)
        m[(*a, n, "bias")] = Source.of(f"{new}.bias", f"{old}.bias")


def hf_key_map(config: VAEConfig) -> dict[tuple, Source]:
    """Our state paths -> diffusers AutoencoderKL tensor names."""
    m: dict[tuple, Source] = {}
    ch, layers, attention = (
        config.block_out_channels,
        config.layers_per_block,
        config.mid_block_add_attention,
    )
    n = len(ch)
    _conv_map(m, ("encoder", "conv_in"), "encoder.conv_in")
    for i in range(n):
        ours, hf = ("encoder", "down_blocks", i), f"encoder.down_blocks.{i}"
        for j in range(layers):
            cin = ch[max(i - 1, 0)] if j == 0 else ch[i]
            _resnet_map(m, (*ours, "resnets", j), f"{hf}.resnets.{j}", cin, ch[i])
        if i < n - 1:
            _conv_map(m, (*ours, "downsample", "conv"), f"{hf}.downsamplers.0.conv")
    _mid_map(m, ("encoder", "mid_block"), "encoder.mid_block", ch[-1], attention)
    _norm_map(m, ("encoder", "conv_norm_out"), "encoder.conv_norm_out")
    _conv_map(m, ("encoder", "conv_out"), "encoder.conv_out")

    rev = tuple(reversed(ch))
    _conv_map(m, ("decoder", "conv_in"), "decoder.conv_in")
    _mid_map(m, ("decoder", "mid_block"), "decoder.mid_block", rev[0], attention)
    for i in range(n):
        ours, hf = ("decoder", "up_blocks", i), f"decoder.up_blocks.{i}"
        for j in range(layers + 1):
            cin = rev[max(i - 1, 0)] if j == 0 else rev[i]
            _resnet_map(m, (*ours, "resnets", j), f"{hf}.resnets.{j}", cin, rev[i])
        if i < n - 1:
            _conv_map(m, (*ours, "upsample", "conv"), f"{hf}.upsamplers.0.conv")
    _norm_map(m, ("decoder", "conv_norm_out"), "decoder.conv_norm_out")
    _conv_map(m, ("decoder", "conv_out"), "decoder.conv_out")

    if config.use_quant_conv:
        _conv_map(m, ("quant_conv",), "quant_conv")
    if config.use_post_quant_conv:
        _conv_map(m, ("post_quant_conv",), "post_quant_conv")
    return m


def weights_name(variant: str | None = None) -> str:
    """diffusers' weights file name: diffusion_pytorch_model[.variant].safetensors."""
    if variant is None:
        return DIFFUSERS_WEIGHTS_NAME
    return DIFFUSERS_WEIGHTS_NAME.replace(".safetensors", f".{variant}.safetensors")


def read_vae_config(path: str | os.PathLike) -> VAEConfig:
    """The VAEConfig of a diffusers AutoencoderKL directory, or CheckpointError saying why not."""
    path = os.fspath(path)
    if not os.path.isfile(os.path.join(path, "config.json")) and os.path.isfile(
        os.path.join(path, "vae", "config.json")
    ):
        raise CheckpointError(
            f"{path} holds a pipeline, not a VAE: pass its VAE folder {os.path.join(path, 'vae')}"
        )
    hf = read_config(path)
    name = hf.get("_class_name")
    if name != CLASS_NAME:
        raise CheckpointError(
            f"{os.path.join(path, 'config.json')} describes _class_name {name!r}, not "
            f"{CLASS_NAME!r}: this directory does not hold a diffusers AutoencoderKL"
        )
    try:
        return VAEConfig.from_hf(hf)
    except (TypeError, ValueError) as e:
        raise CheckpointError(f"{os.path.join(path, 'config.json')}: {e}") from e


def load_vae(
    path: str | os.PathLike,
    dtype=jnp.float32,
    *,
    variant: str | None = None,
    precision: jax.lax.PrecisionLike = None,
    allow_missing: Iterable[str] = (),
    allow_unexpected: Iterable[str] = (),
) -> tuple[AutoencoderKL, VAEConfig]:
    """Loads a diffusers AutoencoderKL directory (config.json + the safetensors weights).

    Args:
      path: the VAE's directory (a pipeline's `vae/` folder).
      dtype: the dtype of the parameters and of the computation (float32 or bfloat16;
        bfloat16 has float32's range, so SDXL's float16 overflow, which force_upcast works
        around in diffusers, does not arise).
      variant: reads diffusion_pytorch_model.{variant}.safetensors (e.g. "fp16").
      precision: of every convolution and matmul (see AutoencoderKL).
      allow_missing, allow_unexpected: regexes of tensor names to accept on purpose
        (see `imagen_jax.weights.load_into`).

    Returns:
      (model, config), every parameter of `dtype`.

    Raises:
      CheckpointError: not an AutoencoderKL directory, an unsupported config, an unreadable
        weights file, or tensors missing, unexpected or mis-shaped (all named at once).
    """
    config = read_vae_config(path)
    checkpoint = Checkpoint(path, weights_name(variant))
    make = functools.partial(
        AutoencoderKL, config, dtype=dtype, param_dtype=dtype, precision=precision
    )
    abstract = nnx.eval_shape(lambda: make(rngs=nnx.Rngs(0)))
    model = load_into(
        abstract,
        hf_key_map(config),
        checkpoint,
        dtype=dtype,
        allow_missing=allow_missing,
        allow_unexpected=allow_unexpected,
        init_missing=lambda: make(rngs=nnx.Rngs(0)),
        what=CLASS_NAME,
    )
    return model, config


# ----------------------------------------------------------------------------------------------
# Sizes for training, and writing diffusers checkpoints
# ----------------------------------------------------------------------------------------------

# Fields of VAEConfig per variant; the block types follow from len(block_out_channels).
# "sd" is the VAE of Stable Diffusion 1.x / 2.x (its config.json: f = 8, 4 latent channels).
VARIANTS = {
    "runlocal": dict(block_out_channels=(16, 32), layers_per_block=1, norm_num_groups=8),
    "shapes": dict(block_out_channels=(32, 64, 128), layers_per_block=2, norm_num_groups=32),
    "sd": dict(block_out_channels=(128, 256, 512, 512), layers_per_block=2, norm_num_groups=32),
}
DIFFUSERS_VERSION = "0.30.0"  # written into exported config.json files


def make_config(variant: str, **overrides) -> VAEConfig:
    """The VAEConfig of a `VARIANTS` entry with `overrides` (VAEConfig fields); the down and
    up block types are filled in to match block_out_channels unless given."""
    if variant not in VARIANTS:
        raise ValueError(f"unknown VAE variant {variant!r}; expected one of {tuple(VARIANTS)}")
    fields = {f.name for f in dataclasses.fields(VAEConfig)}
    unknown = sorted(set(overrides) - fields)
    if unknown:
        raise ValueError(f"unknown VAE config keys {unknown}; allowed: {sorted(fields)}")
    values = {**VARIANTS[variant], **overrides}
    for key, value in values.items():
        if isinstance(value, list):
            values[key] = tuple(value)
    n = len(values["block_out_channels"])
    values.setdefault("down_block_types", DOWN_BLOCK_TYPES * n)
    values.setdefault("up_block_types", UP_BLOCK_TYPES * n)
    return VAEConfig(**values)


def hf_config(config: VAEConfig) -> dict:
    """The config.json of a diffusers AutoencoderKL with `config`."""
    hf: dict[str, Any] = {"_class_name": CLASS_NAME, "_diffusers_version": DIFFUSERS_VERSION}
    for field in dataclasses.fields(config):
        value = getattr(config, field.name)
        hf[field.name] = list(value) if isinstance(value, tuple) else value
    return hf


def hf_tensors(params, config: VAEConfig) -> dict[str, np.ndarray]:
    """Our parameters (a model, or the nested dict of `nnx.to_pure_dict`) as diffusers'
    float32 tensors, by name: the inverse of `hf_key_map` (kernels back to PyTorch's
    layouts)."""
    return checkpoint_tensors(params, hf_key_map(config), what="VAE")


def save_vae(path: str | os.PathLike, params, config: VAEConfig) -> str:
    """Writes a diffusers AutoencoderKL directory (config.json and float32
    diffusion_pytorch_model.safetensors) that `load_vae` and diffusers'
    `AutoencoderKL.from_pretrained` read; returns the path."""
    from safetensors.numpy import save_file  # lazy: only writers need it

    path = os.fspath(path)
    tensors = hf_tensors(params, config)
    os.makedirs(path, exist_ok=True)
    with open(os.path.join(path, "config.json"), "w") as f:
        json.dump(hf_config(config), f, indent=2)
    save_file(tensors, os.path.join(path, weights_name()), metadata={"format": "pt"})
    return path
