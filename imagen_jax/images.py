"""Image conversions between the pixel range of files (uint8 [0, 255]) and of the
networks (float [-1, 1]), and a padded grid of images for a PNG."""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np


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
