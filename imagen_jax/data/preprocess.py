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
  with the scale factor when it shrinks, so it is antialiased.
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
    try:
        with Image.open(io.BytesIO(data)) as img:
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
    return image


def _to_rgb(img: Image.Image) -> np.ndarray:
    if img.mode == "P" and "transparency" in img.info:
        img = img.convert("RGBA")
    if img.mode in ("RGBA", "LA", "PA"):
        img = img.convert("RGBA")
        background = Image.new("RGBA", img.size, (255, 255, 255, 255))
        img = Image.alpha_composite(background, img)
    return np.asarray(img.convert("RGB"), dtype=np.uint8)


def crop_box(
    height: int, width: int, *, rng: np.random.Generator | None = None
) -> tuple[int, int, int, int]:
    """(left, top, right, bottom) of the largest square; centred, or random if `rng`."""
    side = min(height, width)
    slack_y, slack_x = height - side, width - side
    if rng is None:
        top, left = slack_y // 2, slack_x // 2
    else:  # One of the two slacks is zero: only the long side moves.
        top, left = int(rng.integers(0, slack_y + 1)), int(rng.integers(0, slack_x + 1))
    return left, top, left + side, top + side


def resize_and_crop(
    image: np.ndarray, *, resolution: int, rng: np.random.Generator | None = None
) -> np.ndarray:
    """uint8 [H, W, 3] -> [resolution, resolution, 3]: shorter side to `resolution`, crop.

    Centre crop without `rng`; with it, a uniformly random offset along the long side.
    """
    box = crop_box(image.shape[0], image.shape[1], rng=rng)
    size = (resolution, resolution)
    resized = Image.fromarray(image).resize(size, Image.Resampling.BICUBIC, box=box)
    return np.asarray(resized, dtype=np.uint8)


def downsample(image: np.ndarray, *, resolution: int, method: str = "bicubic") -> np.ndarray:
    """uint8 [H, W, 3] -> [resolution, resolution, 3], antialiased (see module docstring)."""
    if method not in LOW_RES_METHODS:
        raise ValueError(f"method={method!r}; expected one of {sorted(LOW_RES_METHODS)}")
    small = Image.fromarray(image).resize((resolution, resolution), LOW_RES_METHODS[method])
    return np.asarray(small, dtype=np.uint8)


def preprocess_record(
    record: dict[str, Any],
    *,
    resolution: int,
    low_resolution: int | None = None,
    low_res_method: str = "bicubic",
    rng: np.random.Generator | None = None,
) -> dict[str, Any]:
    """A source record -> a training example of one stage.

    Returns {"image": uint8 [R, R, 3], "caption": str, "key": str} and, for a
    super-resolution stage, "low_res": uint8 [r, r, 3] downsampled from that "image"; a
    record's "counterfactual" caption and "cell_labels" (ShapesSource) are kept, the
    labels only where the image is used as it is (they describe its pixels' cells).
    """
    image = resize_and_crop(record["image"], resolution=resolution, rng=rng)
    example = {"image": image, "caption": record["caption"], "key": record["key"]}
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
