"""The CLIP image tower (Radford et al. 2021, "Learning Transferable Visual Models From
Natural Language Supervision", sec. 2.4), as transformers' `CLIPVisionModel` and
`CLIPVisionModelWithProjection`, and its input preprocessing, as `CLIPImageProcessor`.

The tower is a pre-norm ViT: non-overlapping patches embedded by a bias-free convolution,
a learned class token, learned absolute positions, a layer norm before the encoder
(transformers spells it `pre_layrnorm`), the text tower's encoder layers without a mask
(`imagen_jax.text.clip.CLIPLayer`), a layer norm on the class token's final state, and
(WithProjection, or inside a CLIPModel) the bias-free `visual_projection`. Images are
NHWC: pixel_values [B, image_size, image_size, 3], float, already normalized. Position
embeddings are not interpolated: other image sizes are refused.

Preprocessing (`ImageProcessor`, numpy, on the host) follows `preprocessor_config.json`:
resize the shortest side to `size` with PIL's bicubic filter (the long side to
`int(size * long / short)`), center crop to `crop_size` (top-left corner at
`((H - h) // 2, (W - w) // 2)`), multiply by `rescale_factor` (1/255), normalize with
`image_mean` / `image_std`. The resize (`resize_bicubic`) is Pillow's 8-bit algorithm
written out in numpy, and it gives the installed Pillow's uint8 images bit for bit (12.3.0
is pinned, for Gradio; 13 is tested too). Where it can differ:

* Between Pillow versions: Pillow resizes in two separable passes, each rounded to uint8.
  The Resample.c of releases before 13 always runs the horizontal pass first; Pillow 13
  runs the vertical pass first when H - h > max(0, 2 (W - w)) (a rule found by
  measurement: it matched every one of ~1,500 random size pairs, boundaries included).
  `resize_bicubic` takes the order of the Pillow it finds installed. Where the two orders
  differ, so does the intermediate rounding: measured, up to 2 levels (of 255) on smooth
  images and up to 27 on pixel noise. A square image resized to a square never takes the
  vertical-first order, so CLIP's usual inputs do not depend on the Pillow version.
* From transformers' `CLIPImageProcessorPil` (its PIL backend): none, the pixel values
  are equal (tests/evaluation/test_clip_score.py).
* From transformers' `CLIPImageProcessor` (its torchvision backend, v5's default when
  torchvision is installed): torch's antialiased bicubic on uint8 is not Pillow's;
  measured, at most 2 levels of 255 per pixel (64..1024 px, square and not). OpenAI's
  own CLIP preprocessing resized PIL images, with PIL.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import math
import os
from collections.abc import Collection
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import PIL
from flax import nnx

from imagen_jax.text.clip import CLIPLayer, layer_key_map
from imagen_jax.text.layers import activation
from imagen_jax.weights import Checkpoint, CheckpointError, Source, load_into, read_config

MODEL_TYPES = ("clip_vision_model", "clip")
ARCHITECTURES = ("CLIPVisionModel", "CLIPVisionModelWithProjection", "CLIPModel")
_WITH_PROJECTION = ("CLIPVisionModelWithProjection", "CLIPModel")
PREPROCESSOR_FILE = "preprocessor_config.json"
# OpenAI CLIP's normalization (transformers' OPENAI_CLIP_MEAN / OPENAI_CLIP_STD).
OPENAI_CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
OPENAI_CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
PIL_BICUBIC = 3  # PIL.Image.Resampling.BICUBIC, as preprocessor_config.json's "resample"


@dataclasses.dataclass(frozen=True)
class CLIPVisionConfig:
    # Defaults: transformers' CLIPVisionConfig (ViT-B/32).
    hidden_size: int = 768
    intermediate_size: int = 3072
    num_hidden_layers: int = 12
    num_attention_heads: int = 12
    num_channels: int = 3
    image_size: int = 224
    patch_size: int = 32
    hidden_act: str = "quick_gelu"  # quick_gelu (OpenAI CLIP) | gelu (OpenCLIP)
    layer_norm_eps: float = 1e-5
    projection_dim: int | None = None  # set: visual_projection (WithProjection, CLIPModel)

    @classmethod
    def from_hf(cls, hf: dict) -> CLIPVisionConfig:
        """From a config.json of a CLIPVisionModel[WithProjection] or a full CLIPModel."""
        architectures = hf.get("architectures") or ()
        projection = any(a in _WITH_PROJECTION for a in architectures)
        if hf.get("model_type") == "clip":  # the model's projection_dim, not vision_config's
            hf = {
                **(hf.get("vision_config") or {}),
                "projection_dim": hf.get("projection_dim", 512),
            }
        fields = {f.name for f in dataclasses.fields(cls)}
        values = {k: v for k, v in hf.items() if k in fields}
        values["projection_dim"] = hf.get("projection_dim", 512) if projection else None
        config = cls(**values)
        activation(config.hidden_act)
        if config.image_size % config.patch_size:
            raise ValueError(
                f"image_size {config.image_size} is not a multiple of patch_size "
                f"{config.patch_size}"
            )
        return config

    @property
    def num_patches(self) -> int:
        return (self.image_size // self.patch_size) ** 2


class VisionOutput(NamedTuple):
    """last_hidden_state [B, 1 + N, D] (the last layer's output, class token first, no final
    norm); hidden_states: the embeddings after pre_layrnorm, then every layer's output;
    pooled [B, D]: post_layernorm of the class token, projected to [B, P] if the model has
    a visual_projection (transformers' `image_embeds` / `get_image_features`)."""

    last_hidden_state: jax.Array
    hidden_states: tuple[jax.Array, ...]
    pooled: jax.Array


class PatchEmbedding(nnx.Module):
    """The bias-free Conv2d with kernel = stride = patch_size, computed as one matmul over
    the non-overlapping patches; the weight keeps PyTorch's layout [D, C, p, p] so that the
    checkpoint tensor loads unchanged."""

    def __init__(self, channels: int, dim: int, patch: int, *, rngs, dtype, param_dtype):
        init = nnx.initializers.lecun_normal(in_axis=(1, 2, 3), out_axis=0)
        self.weight = nnx.Param(init(rngs.params(), (dim, channels, patch, patch), param_dtype))
        self.patch = patch
        self.dtype = dtype

    def __call__(self, x: jax.Array) -> jax.Array:  # [B, H, W, C] -> [B, N, D]
        b, h, w, c = x.shape
        p = self.patch
        gh, gw = h // p, w // p
        x = x[:, : gh * p, : gw * p].reshape(b, gh, p, gw, p, c).astype(self.dtype)
        out = jnp.einsum("byixjc,dcij->byxd", x, self.weight[...].astype(self.dtype))
        return out.reshape(b, gh * gw, -1)  # row-major over the grid, as torch's flatten(2)


class CLIPVisionEncoder(nnx.Module):
    """transformers' CLIPVisionModel, or CLIPVisionModelWithProjection if projection_dim."""

    def __init__(
        self,
        config: CLIPVisionConfig,
        *,
        rngs: nnx.Rngs,
        dtype=jnp.float32,
        param_dtype=jnp.float32,
    ):
        self.config = config
        kw = dict(rngs=rngs, dtype=dtype, param_dtype=param_dtype)
        d = config.hidden_size
        norm = functools.partial(
            nnx.LayerNorm, d, epsilon=config.layer_norm_eps, use_fast_variance=False, **kw
        )
        self.patch_embedding = PatchEmbedding(config.num_channels, d, config.patch_size, **kw)
        self.class_embedding = nnx.Param(
            nnx.initializers.normal(d**-0.5)(rngs.params(), (d,), param_dtype)
        )
        self.position_embedding = nnx.Embed(config.num_patches + 1, d, **kw)
        self.pre_layrnorm = norm()
        self.layers = nnx.List([CLIPLayer(config, **kw) for _ in range(config.num_hidden_layers)])
        self.post_layernorm = norm()
        self.visual_projection = (
            nnx.Linear(d, config.projection_dim, use_bias=False, **kw)
            if config.projection_dim
            else None
        )

    def __call__(self, pixel_values: jax.Array) -> VisionOutput:
        """pixel_values [B, image_size, image_size, C], preprocessed -> VisionOutput."""
        b, h, w, _ = pixel_values.shape
        size = self.config.image_size
        if (h, w) != (size, size):
            raise ValueError(f"input images are {h}x{w}; the model takes {size}x{size}")
        x = self.patch_embedding(pixel_values)  # [B, N, D]
        cls = jnp.broadcast_to(self.class_embedding[...].astype(x.dtype), (b, 1, x.shape[-1]))
        x = jnp.concatenate([cls, x], axis=1)  # [B, 1 + N, D]
        x = x + self.position_embedding(jnp.arange(x.shape[1]))
        x = self.pre_layrnorm(x)
        hidden = [x]
        for layer in self.layers:
            x = layer(x, None)
            hidden.append(x)
        pooled = self.post_layernorm(x[:, 0])  # [B, D]
        if self.visual_projection is not None:
            pooled = self.visual_projection(pooled)  # [B, projection_dim]
        return VisionOutput(x, tuple(hidden), pooled)


# ----------------------------------------------------------------------------------------------
# Weights
# ----------------------------------------------------------------------------------------------

# In a full CLIPModel checkpoint: the text tower and the logit scale; position_ids buffers.
UNUSED = (
    r"text_model\..*",
    r"text_projection\.weight",
    r"logit_scale",
    r"(vision_model\.)?embeddings\.position_ids",
)


def checkpoint_prefix(keys: Collection[str]) -> str:
    """CLIPModel, CLIPVisionModelWithProjection and CLIPVisionModel of transformers < 5 nest
    the tower under `vision_model.`; v5's CLIPVisionModel does not."""
    return "vision_model." if "vision_model.embeddings.class_embedding" in keys else ""


def hf_key_map(config: CLIPVisionConfig, prefix: str = "vision_model.") -> dict[tuple, Source]:
    """Our state paths -> transformers' CLIPVisionModel[WithProjection] tensor names."""
    v = prefix
    m = {
        ("patch_embedding", "weight"): Source.of(f"{v}embeddings.patch_embedding.weight"),
        ("class_embedding",): Source.of(f"{v}embeddings.class_embedding"),
        ("position_embedding", "embedding"): Source.of(f"{v}embeddings.position_embedding.weight"),
    }
    for n in ("pre_layrnorm", "post_layernorm"):
        m[(n, "scale")] = Source.of(f"{v}{n}.weight")
        m[(n, "bias")] = Source.of(f"{v}{n}.bias")
    if config.projection_dim:
        m[("visual_projection", "kernel")] = Source.of("visual_projection.weight", transpose=True)
    for i in range(config.num_hidden_layers):
        m.update(layer_key_map(f"{v}encoder.layers.{i}", ("layers", i)))
    return m


def load_vision_model(path: str | os.PathLike, *, dtype=jnp.float32) -> CLIPVisionEncoder:
    """The image tower of a Hugging Face-layout directory (CLIPVisionModel,
    CLIPVisionModelWithProjection, or a full CLIPModel whose text tower is skipped), loaded
    strictly (`imagen_jax.weights.load_into`)."""
    path = os.fspath(path)
    hf = read_config(path)
    architectures = list(hf.get("architectures") or [])
    bad_arch = architectures and not any(a in ARCHITECTURES for a in architectures)
    if hf.get("model_type") not in MODEL_TYPES or bad_arch:
        raise CheckpointError(
            f"{os.path.join(path, 'config.json')} is model_type {hf.get('model_type')!r}, "
            f"architectures {architectures}: not a CLIP image tower ({', '.join(ARCHITECTURES)})"
        )
    try:
        config = CLIPVisionConfig.from_hf(hf)
    except (TypeError, ValueError) as e:
        raise CheckpointError(f"{path}/config.json: {e}") from None
    checkpoint = Checkpoint(path)
    build = functools.partial(CLIPVisionEncoder, config, dtype=dtype, param_dtype=dtype)
    return load_into(
        nnx.eval_shape(lambda: build(rngs=nnx.Rngs(0))),
        hf_key_map(config, checkpoint_prefix(frozenset(checkpoint))),
        checkpoint,
        dtype=dtype,
        unused=UNUSED,
        what=f"CLIPVisionEncoder ({hf.get('model_type')})",
    )


# ----------------------------------------------------------------------------------------------
# Preprocessing
# ----------------------------------------------------------------------------------------------

_PRECISION_BITS = 32 - 8 - 2  # Pillow's fixed-point coefficients for 8-bit images


def _pil_bicubic(x: np.ndarray) -> np.ndarray:
    """Pillow's bicubic kernel (Keys, a = -0.5), support 2, in float64, its expressions kept."""
    a = -0.5
    x = np.abs(x)
    near = ((a + 2.0) * x - (a + 3.0)) * x * x + 1
    far = (((x - 5) * x + 8) * x - 4) * a
    return np.where(x < 1.0, near, np.where(x < 2.0, far, 0.0))


def _pil_coefficients(in_size: int, out_size: int) -> tuple[np.ndarray, np.ndarray]:
    """Pillow's `precompute_coeffs` + `normalize_coeffs_8bpc` for one axis.

    Returns source indices [out, K] and fixed-point weights [out, K] (int64, zero beyond
    each output's taps): the kernel is stretched by the scale when shrinking (antialiasing),
    cut at the image's edges and renormalized to sum 1, then rounded to 22 fractional bits.
    """
    scale = in_size / out_size
    filterscale = max(scale, 1.0)
    support = 2.0 * filterscale
    ksize = int(math.ceil(support)) * 2 + 1
    center = (np.arange(out_size) + 0.5) * scale  # [out]
    xmin = np.maximum((center - support + 0.5).astype(np.int64), 0)  # C's (int): truncation
    count = np.minimum((center + support + 0.5).astype(np.int64), in_size) - xmin
    taps = np.arange(ksize)
    w = _pil_bicubic((taps[None] + xmin[:, None] - center[:, None] + 0.5) * (1.0 / filterscale))
    w = np.where(taps[None] < count[:, None], w, 0.0)  # [out, K]
    total = w.sum(axis=1, keepdims=True)
    w = np.where(total != 0.0, w / np.where(total != 0.0, total, 1.0), w)
    fixed = w * (1 << _PRECISION_BITS)
    fixed = np.trunc(np.where(w < 0, fixed - 0.5, fixed + 0.5)).astype(np.int64)
    index = np.minimum(xmin[:, None] + taps[None], in_size - 1)
    return index, fixed


def _resample_axis(x: np.ndarray, size: int, axis: int) -> np.ndarray:
    """One of Pillow's passes: uint8 resized along `axis`, rounded and clipped to uint8.

    Int32 sums as Pillow's (they cannot overflow: |weights| sum to < 2 in 2^22 units, times
    255). The resized axis is put first so that each tap gathers whole rows.
    """
    index, weight = _pil_coefficients(x.shape[axis], size)
    rows = np.ascontiguousarray(np.moveaxis(x, axis, 0)).astype(np.int32)  # [in, ...]
    weight = weight.astype(np.int32).reshape(*weight.shape, *([1] * (rows.ndim - 1)))
    acc = np.full((size, *rows.shape[1:]), 1 << (_PRECISION_BITS - 1), np.int32)
    for k in range(index.shape[1]):  # one tap at a time: memory stays [size, ...]
        acc += rows[index[:, k]] * weight[:, k]
    out = np.clip(acc >> _PRECISION_BITS, 0, 255).astype(np.uint8)
    return np.moveaxis(out, 0, axis)


_PILLOW_13 = int(PIL.__version__.split(".")[0]) >= 13  # its pass order (module docstring)


def resize_bicubic(image: np.ndarray, height: int, width: int) -> np.ndarray:
    """uint8 [H, W, C] -> uint8 [height, width, C], as the installed Pillow's
    `Image.fromarray(image).resize((width, height), Image.BICUBIC)` (see the module
    docstring for the pass order, which Pillow 13 changed)."""
    image = np.asarray(image)
    if image.dtype != np.uint8 or image.ndim != 3:
        raise ValueError(f"expected a uint8 [H, W, C] image, got {image.dtype} {image.shape}")
    if height < 1 or width < 1:
        raise ValueError(f"cannot resize to {height}x{width}")
    h_in, w_in = image.shape[:2]
    x = image
    passes = [(width, 1), (height, 0)]  # horizontal first
    if _PILLOW_13 and h_in - height > max(0, 2 * (w_in - width)):  # Pillow 13's choice
        passes.reverse()
    for size, axis in passes:
        if size != x.shape[axis]:
            x = _resample_axis(x, size, axis)
    return x


def _pair(value, what: str) -> tuple[int, int]:
    if isinstance(value, int):
        return value, value
    if isinstance(value, dict) and "height" in value and "width" in value:
        return int(value["height"]), int(value["width"])
    raise ValueError(f"{what}: expected an int or {{'height', 'width'}}, got {value!r}")


@dataclasses.dataclass(frozen=True)
class ImageProcessor:
    """CLIPImageProcessor's steps in numpy: uint8 [H, W, 3] -> float32 [h, w, 3].

    shortest_edge: resize the shorter side to this (None: no shortest-edge resize);
    resize_to: or resize to exactly (height, width); crop: center crop (height, width) or
    None; rescale_factor, mean, std: None skips the step.
    """

    shortest_edge: int | None = 224
    resize_to: tuple[int, int] | None = None
    crop: tuple[int, int] | None = (224, 224)
    rescale_factor: float | None = 1 / 255
    mean: tuple[float, ...] | None = OPENAI_CLIP_MEAN
    std: tuple[float, ...] | None = OPENAI_CLIP_STD

    @classmethod
    def from_hf(cls, hf: dict) -> ImageProcessor:
        """From a preprocessor_config.json (dict sizes, and older int sizes, both read)."""
        shortest, resize_to = None, None
        if hf.get("do_resize", True):
            resample = hf.get("resample", PIL_BICUBIC)
            if resample != PIL_BICUBIC:
                raise ValueError(
                    f"resample {resample!r}: only bicubic ({PIL_BICUBIC}) is supported"
                )
            size = hf.get("size", 224)
            if isinstance(size, dict) and "shortest_edge" in size:
                if size.get("longest_edge"):
                    raise ValueError(f"size {size}: a longest_edge limit is not supported")
                shortest = int(size["shortest_edge"])
            elif isinstance(size, int):
                shortest = size
            else:
                resize_to = _pair(size, "size")
        crop = (
            _pair(hf.get("crop_size", 224), "crop_size") if hf.get("do_center_crop", True) else None
        )
        normalize = hf.get("do_normalize", True)
        return cls(
            shortest_edge=shortest,
            resize_to=resize_to,
            crop=crop,
            rescale_factor=float(hf.get("rescale_factor", 1 / 255))
            if hf.get("do_rescale", True)
            else None,
            mean=tuple(hf.get("image_mean", OPENAI_CLIP_MEAN)) if normalize else None,
            std=tuple(hf.get("image_std", OPENAI_CLIP_STD)) if normalize else None,
        )

    @classmethod
    def from_dir(cls, path: str | os.PathLike) -> ImageProcessor:
        file = os.path.join(path, PREPROCESSOR_FILE)
        if not os.path.isfile(file):
            raise FileNotFoundError(
                f"{os.fspath(path)} has no {PREPROCESSOR_FILE} (the image preprocessing: "
                "sizes, mean and std); it comes with every CLIP model on the Hugging Face hub"
            )
        with open(file) as f:
            try:
                return cls.from_hf(json.load(f))
            except (TypeError, ValueError) as e:
                raise ValueError(f"{file}: {e}") from None

    def output_size(self, height: int, width: int) -> tuple[int, int]:
        """The (height, width) of the output for an input of this size."""
        if self.crop is not None:
            return self.crop
        return self._resized_size(height, width)

    def _resized_size(self, height: int, width: int) -> tuple[int, int]:
        if self.resize_to is not None:
            return self.resize_to
        if self.shortest_edge is None:
            return height, width
        short, long = sorted((height, width))
        new_long = int(self.shortest_edge * long / short)  # transformers' rounding: down
        if height <= width:
            return self.shortest_edge, new_long
        return new_long, self.shortest_edge

    def resize_and_crop(self, image: np.ndarray) -> np.ndarray:
        """uint8 [H, W, 3] -> uint8, resized and center-cropped."""
        image = np.asarray(image)
        if image.dtype != np.uint8 or image.ndim != 3 or image.shape[-1] != 3:
            raise ValueError(f"expected a uint8 [H, W, 3] image, got {image.dtype} {image.shape}")
        h, w = self._resized_size(*image.shape[:2])
        if (h, w) != image.shape[:2]:
            image = resize_bicubic(image, h, w)
        if self.crop is not None:
            ch, cw = self.crop
            if ch > h or cw > w:
                raise ValueError(f"a {h}x{w} image is smaller than the {ch}x{cw} center crop")
            top, left = (h - ch) // 2, (w - cw) // 2
            image = image[top : top + ch, left : left + cw]
        return image

    def normalize(self, image: np.ndarray) -> np.ndarray:
        """uint8 [..., 3] -> float32: rescaled in float64 then cast, then (x - mean) / std in
        float32, in the order and dtypes of transformers' numpy path."""
        x = np.asarray(image)
        if self.rescale_factor is not None:
            x = (x.astype(np.float64) * self.rescale_factor).astype(np.float32)
        x = x.astype(np.float32)
        if self.mean is not None:
            x = (x - np.asarray(self.mean, np.float32)) / np.asarray(self.std, np.float32)
        return x

    def __call__(self, image: np.ndarray) -> np.ndarray:
        """uint8 [H, W, 3] -> float32 [h, w, 3], the model's pixel_values (NHWC)."""
        return self.normalize(self.resize_and_crop(image))
