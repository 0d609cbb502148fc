"""Per-record image preprocessing: decode to RGB, square crop + resize, low-res conditioning.

All images are uint8 HWC RGB numpy arrays, in and out.

* `decode_image`: encoded bytes -> RGB. EXIF orientation is applied and transparency is
  composited onto white (the usual choice for web image-text data); anything PIL cannot
  decode completely raises `CorruptRecordError`, which the pipeline turns into a skip.
  Optionally decodes large JPEGs at a reduced scale (`min_size`), which is faster.
* `resize_and_crop`: the stage's training image, `resolution x resolution`. It takes the
  largest square of the image (centred, or at a random offset along the long side) and
  resizes it to the resolution, i.e. "resize the shorter side to `resolution`, then crop",
  done in one resampling step on the crop box. Pillow's BICUBIC, which widens its kernel
  with the scale factor when it shrinks, so it is antialiased. An aspect-ratio bucket's
  (h, w) target takes the largest box of its aspect ratio instead of the square.
* `downsample`: the low-resolution conditioning image of a super-resolution stage, made
  from the final (cropped, resized) target. Bicubic with antialiasing by default: SR3
  (Saharia et al. 2021, "Image Super-Resolution via Iterative Refinement",
  arXiv:2104.07636) made its low-resolution inputs by bicubic downsampling with
  antialiasing, and Imagen's super-resolution stages (Saharia et al. 2022,
  arXiv:2205.11487) build on SR3. "box" (area averaging) is the alternative.
"""

from __future__ import annotations

import io
import math
import os
from typing import Any

import numpy as np
from PIL import Image, ImageOps

LOW_RES_METHODS = {"bicubic": Image.Resampling.BICUBIC, "box": Image.Resampling.BOX}


class CorruptRecordError(Exception):
    """A record whose image cannot be decoded; the message names its file (and shard)."""


def decode_image(data: bytes, *, name: str, min_size: int | None = None) -> np.ndarray:
    """Encoded image bytes -> uint8 [H, W, 3] RGB; raises CorruptRecordError naming `name`.

    With `min_size`, a JPEG may be decoded at 1/2, 1/4 or 1/8 scale (libjpeg's DCT
    scaling, Pillow's `draft`) as long as its shorter side stays >= 2 * min_size: much
    faster for large images, and after a later resize to `min_size` it differs from a full
    decode by well under one grey level on average (the "reducing gap" of Pillow's
    `Image.thumbnail`). Other formats always decode at full size.
    """
    return decode_image_and_size(data, name=name, min_size=min_size)[0]


def decode_image_and_size(
    data: bytes, *, name: str, min_size: int | None = None
) -> tuple[np.ndarray, tuple[int, int]]:
    """(`decode_image`'s image, the (height, width) of the full-size image as shown: what
    a reduced-scale decode leaves out, EXIF orientation applied)."""
    try:
        with Image.open(io.BytesIO(data)) as img:
            size = _shown_size(img)
            if min_size is not None and img.format == "JPEG":
                scale = 2 * min_size / min(img.size)
                if scale < 1:
                    img.draft("RGB", (math.ceil(img.width * scale), math.ceil(img.height * scale)))
            img.load()  # Decodes all of it: a truncated file fails here, not later.
            img = ImageOps.exif_transpose(img)
            image = _to_rgb(img)
    except Exception as e:  # PIL raises OSError, SyntaxError, ValueError, zlib.error, ...
        raise CorruptRecordError(f"{name}: cannot decode image ({type(e).__name__}: {e})") from e
    if image.shape[0] == 0 or image.shape[1] == 0:
        raise CorruptRecordError(f"{name}: image has no pixels ({image.shape})")
    return image, size


_TRANSPOSING_ORIENTATIONS = (5, 6, 7, 8)  # EXIF orientations that swap height and width


def _shown_size(img: Image.Image) -> tuple[int, int]:
    """(height, width) of an opened image as shown (its EXIF orientation applied); reads
    the header only."""
    width, height = img.size
    try:  # a PNG's EXIF may follow its pixels: a truncated file has no orientation to read
        orientation = img.getexif().get(0x0112)
    except OSError:
        orientation = None
    if orientation in _TRANSPOSING_ORIENTATIONS:
        width, height = height, width
    return height, width


def image_header_size(data: bytes | os.PathLike, *, name: str) -> tuple[int, int]:
    """(height, width) of an encoded image (bytes, or a file's path) as shown, from its
    header alone; raises CorruptRecordError naming `name` where none can be read."""
    try:
        with Image.open(io.BytesIO(data) if isinstance(data, bytes) else data) as img:
            return _shown_size(img)
    except Exception as e:
        reason = f"{type(e).__name__}: {e}"
        raise CorruptRecordError(f"{name}: cannot read image header ({reason})") from e


def _to_rgb(img: Image.Image) -> np.ndarray:
    if img.mode == "P" and "transparency" in img.info:
        img = img.convert("RGBA")
    if img.mode in ("RGBA", "LA", "PA"):
        img = img.convert("RGBA")
        background = Image.new("RGBA", img.size, (255, 255, 255, 255))
        img = Image.alpha_composite(background, img)
    return np.asarray(img.convert("RGB"), dtype=np.uint8)


def crop_box(
    height: int,
    width: int,
    *,
    rng: np.random.Generator | None = None,
    target: tuple[int, int] | None = None,
) -> tuple[float, float, float, float]:
    """(left, top, right, bottom) of the largest box of the `target` (height, width)
    aspect ratio (None: a square); centred, or random if `rng`."""
    th, tw = target or (1, 1)
    box_w, box_h = min(width, height * tw / th), min(height, width * th / tw)
    slack_y, slack_x = height - box_h, width - box_w
    if rng is None:
        top, left = slack_y // 2, slack_x // 2
    else:  # One of the two slacks is zero: only the long side moves.
        top = int(rng.integers(0, int(slack_y) + 1))
        left = int(rng.integers(0, int(slack_x) + 1))
    return left, top, left + box_w, top + box_h


def _shape(resolution: int | tuple[int, int]) -> tuple[int, int]:
    return (resolution, resolution) if isinstance(resolution, int) else tuple(resolution)


def resize_and_crop(
    image: np.ndarray,
    *,
    resolution: int | tuple[int, int],
    rng: np.random.Generator | None = None,
) -> np.ndarray:
    """uint8 [H, W, 3] -> [resolution, resolution, 3] (or [h, w, 3] for a (h, w)
    resolution): the largest box of the target's aspect ratio, resized to it.

    Centre crop without `rng`; with it, a uniformly random offset along the long side.
    """
    target = _shape(resolution)
    box = crop_box(image.shape[0], image.shape[1], rng=rng, target=target)
    return _resize_box(image, box, target)


def _resize_box(image: np.ndarray, box, target: tuple[int, int]) -> np.ndarray:
    size = (target[1], target[0])  # PIL: (width, height)
    resized = Image.fromarray(image).resize(size, Image.Resampling.BICUBIC, box=box)
    return np.asarray(resized, dtype=np.uint8)


def size_crop_ids(height: int, width: int, box, target: tuple[int, int]) -> np.ndarray:
    """SDXL's size and crop conditioning of an image of `height` x `width` cropped to
    `box` (left, top, right, bottom) and resized to `target` (height, width): int32 [6] =
    (original height, width, crop top, crop left, target height, width), the crop's
    corner in the resized image's pixels (as diffusers' train_text_to_image_sdxl.py resizes
    the image first, then crops)."""
    left, top, _, bottom = box
    scale = target[0] / (bottom - top)
    crop = (int(round(top * scale)), int(round(left * scale)))
    return np.asarray([height, width, *crop, *target], np.int32)


def downsample(image: np.ndarray, *, resolution: int, method: str = "bicubic") -> np.ndarray:
    """uint8 [H, W, 3] -> [resolution, resolution, 3], antialiased (see module docstring)."""
    if method not in LOW_RES_METHODS:
        raise ValueError(f"method={method!r}; expected one of {sorted(LOW_RES_METHODS)}")
    small = Image.fromarray(image).resize((resolution, resolution), LOW_RES_METHODS[method])
    return np.asarray(small, dtype=np.uint8)


def preprocess_record(
    record: dict[str, Any],
    *,
    resolution: int | tuple[int, int],
    low_resolution: int | None = None,
    low_res_method: str = "bicubic",
    rng: np.random.Generator | None = None,
    size_crop: bool = False,
) -> dict[str, Any]:
    """A source record -> a training example of one stage.

    Returns {"image": uint8 [R, R, 3] (or [h, w, 3] for a (h, w) `resolution`: an
    aspect-ratio bucket), "caption": str, "key": str} and, for a
    super-resolution stage, "low_res": uint8 [r, r, 3] downsampled from that "image"; with
    `size_crop`, "size_crop" int32 [6] (`size_crop_ids`: SDXL's micro-conditioning); a
    record's "counterfactual" caption and "cell_labels" (ShapesSource) are kept, the
    labels only where the image is used as it is (they describe its pixels' cells).
    """
    height, width = record["image"].shape[:2]
    target = _shape(resolution)
    box = crop_box(height, width, rng=rng, target=target)
    image = _resize_box(record["image"], box, target)
    example = {"image": image, "caption": record["caption"], "key": record["key"]}
    if size_crop:  # the file's size where a reduced-scale decode gave fewer pixels
        ids = size_crop_ids(height, width, box, target)
        ids[:2] = record.get("size", (height, width))
        example["size_crop"] = ids
    if "counterfactual" in record:
        example["counterfactual"] = record["counterfactual"]
    if "cell_labels" in record:
        if record["image"].shape != image.shape:
            raise ValueError(
                f"record {record['key']!r}: cell_labels describe a {record['image'].shape} "
                f"image resized to {image.shape}; render at the training resolution"
            )
        example["cell_labels"] = record["cell_labels"]
    if low_resolution is not None:
        example["low_res"] = downsample(image, resolution=low_resolution, method=low_res_method)
    return example
