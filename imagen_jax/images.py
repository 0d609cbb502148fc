"""Image conversions between the pixel range of files (uint8 [0, 255]) and of the
networks (float [-1, 1]), a padded grid of images for a PNG, and CLIP's input
preprocessing (`ImageProcessor`, as transformers' `CLIPImageProcessor`), which the CLIP
image tower and GIT (`imagen_jax.models.vit`, `imagen_jax.models.git`) take.

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
import json
import math
import os

import jax
import jax.numpy as jnp
import numpy as np
import PIL
import PIL.Image

PREPROCESSOR_FILE = "preprocessor_config.json"
# OpenAI CLIP's normalization (transformers' OPENAI_CLIP_MEAN / OPENAI_CLIP_STD).
OPENAI_CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
OPENAI_CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
PIL_BICUBIC = 3  # PIL.Image.Resampling.BICUBIC, as preprocessor_config.json's "resample"


def to_float_image(x):
    """uint8 [0, 255] -> float32 [-1, 1] (a jnp array)."""
    return jnp.asarray(x, jnp.float32) / 127.5 - 1.0


def to_uint8(x) -> np.ndarray:
    """[-1, 1] floats -> uint8 [0, 255] (a host array)."""
    return np.clip(np.round((np.asarray(x, np.float32) + 1.0) * 127.5), 0, 255).astype(np.uint8)


def image_rows(rows: list[np.ndarray], pad: int = 2) -> np.ndarray:
    """Rows of uint8 [N, H, W, 3] (same H, W) -> one uint8 image with `pad` px white gaps."""
    n, h, w, _ = rows[0].shape
    out = np.full((len(rows) * (h + pad) + pad, n * (w + pad) + pad, 3), 255, np.uint8)
    for r, images in enumerate(rows):
        for i, image in enumerate(images):
            y, x = pad + r * (h + pad), pad + i * (w + pad)
            out[y : y + h, x : x + w] = image
    return out


def to_rgb(image: PIL.Image.Image) -> np.ndarray:
    """A PIL image of any mode -> uint8 RGB [H, W, 3], as transformers' `convert_to_rgb`
    (the CLIP processors' do_convert_rgb step): an image with an alpha band, or a palette
    with a transparent entry, is composited onto white; any other mode (grayscale, CMYK,
    palette) goes through Pillow's `convert("RGB")`."""
    if "A" in image.getbands() or image.info.get("transparency") is not None:
        white = PIL.Image.new("RGBA", image.size, (255, 255, 255, 255))
        image = PIL.Image.alpha_composite(white, image.convert("RGBA"))
    return np.asarray(image.convert("RGB"))


def load_rgb(path: str | os.PathLike) -> np.ndarray:
    """An image file, decoded whole, as `to_rgb` converts it. OSError (PIL's
    UnidentifiedImageError included) or SyntaxError when the file is not a readable image
    (not an image, truncated), PIL's DecompressionBombError beyond its pixel limit."""
    with PIL.Image.open(path) as im:
        im.load()  # a truncated file fails here, not later
        return to_rgb(im)


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


def resize_batch(x, size: tuple[int, int]) -> jax.Array:
    """[B, H, W, C] resized to size (H', W'), antialiased bilinear (jax.image.resize), as
    float32; unchanged at its size. What editing resizes init images and masks with."""
    if tuple(x.shape[1:3]) == tuple(size):
        return jnp.asarray(x, jnp.float32)
    shape = (x.shape[0], *size, x.shape[-1])
    return jax.image.resize(jnp.asarray(x, jnp.float32), shape, "linear", antialias=True)


def _pair(value, what: str) -> tuple[int, int]:
    if isinstance(value, int):
        return value, value
    if isinstance(value, dict) and "height" in value and "width" in value:
        return int(value["height"]), int(value["width"])
    raise ValueError(f"{what}: expected an int or {{'height', 'width'}}, got {value!r}")


def clip_preprocessor_config(size: int, mean, std) -> dict:
    """The preprocessor_config.json of CLIP's processor for images of side `size`: shortest
    edge to `size` (bicubic), centre crop, x / 255, then (x - mean) / std (what our trained
    models write beside their weights)."""
    return {
        "image_processor_type": "CLIPImageProcessor",
        "do_resize": True,
        "size": {"shortest_edge": size},
        "resample": PIL_BICUBIC,
        "do_center_crop": True,
        "crop_size": {"height": size, "width": size},
        "do_rescale": True,
        "rescale_factor": 1 / 255,
        "do_normalize": True,
        "image_mean": list(mean),
        "image_std": list(std),
        "do_convert_rgb": True,
    }


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
