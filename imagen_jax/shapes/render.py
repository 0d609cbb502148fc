"""The renderer: a `Scene` -> an anti-aliased uint8 image [H, W, 3], at any resolution.

Coverage is analytic from the signed distance in pixels: a pixel whose centre lies at
signed distance d from an edge is covered by clip(0.5 - d, 0, 1), the exact box-filtered
coverage of a straight edge that runs along a pixel axis and a close approximation for any
other edge. Objects are composited in order over the background in sRGB. Only the pixels
inside each object's circumscribed box are evaluated, so the cost grows with the objects'
area, not the canvas. No randomness: a scene and a resolution fix the image.
"""

from __future__ import annotations

import math

import numpy as np

from imagen_jax.shapes import geometry
from imagen_jax.shapes.spec import BACKGROUNDS, COLORS, SHAPES, Scene, SceneObject

MIN_RESOLUTION = 8


def _check_resolution(resolution: int) -> int:
    if isinstance(resolution, bool) or not isinstance(resolution, int | np.integer):
        raise ValueError(f"resolution must be an integer, got {resolution!r}")
    if resolution < MIN_RESOLUTION:
        raise ValueError(f"resolution must be at least {MIN_RESOLUTION}, got {resolution}")
    return int(resolution)


def image_size(scene: Scene, resolution: int) -> tuple[int, int]:
    """(height, width) in pixels of the scene drawn with its shorter side `resolution`
    pixels: the canvas's longer side rounded to whole pixels."""
    resolution = _check_resolution(resolution)
    return round(scene.height * resolution), round(scene.width * resolution)


def coverage(
    obj: SceneObject, resolution: int, shape: tuple[int, int] | None = None
) -> tuple[tuple[slice, slice], np.ndarray]:
    """The object's coverage [h, w] in [0, 1] over its window (rows, cols) of a canvas of
    `shape` (height, width) pixels (square by default), `resolution` pixels a canvas unit."""
    height, width = shape or (resolution, resolution)
    radius = geometry.circumradius(obj.shape) * obj.size * resolution  # pixels
    cx, cy = obj.x * resolution, obj.y * resolution
    x0, x1 = max(0, math.floor(cx - radius - 1)), min(width, math.ceil(cx + radius + 1))
    y0, y1 = max(0, math.floor(cy - radius - 1)), min(height, math.ceil(cy + radius + 1))
    window = (slice(y0, max(y0, y1)), slice(x0, max(x0, x1)))
    px = (np.arange(x0, x1, dtype=np.float32) + 0.5) / resolution
    py = (np.arange(y0, y1, dtype=np.float32) + 0.5) / resolution
    p = geometry.to_unit_frame(obj, px[None, :], py[:, None])  # [h, w, 2]
    dist_px = geometry.unit_sdf(obj.shape, p) * (obj.size * resolution)
    return window, np.clip(0.5 - dist_px, 0.0, 1.0)


def render(scene: Scene, resolution: int) -> np.ndarray:
    """The scene drawn with `resolution` pixels to its canvas's shorter side: uint8
    [resolution, resolution, 3] for the square canvas, `image_size` for any other."""
    shape = image_size(scene, resolution)
    canvas = np.empty((*shape, 3), np.float32)
    canvas[:] = BACKGROUNDS[scene.background]
    for obj in scene.objects:
        window, alpha = coverage(obj, resolution, shape)
        if alpha.size:
            color = np.asarray(COLORS[obj.color], np.float32)
            canvas[window] += alpha[..., None] * (color - canvas[window])
    return np.rint(canvas).astype(np.uint8)


def cell_labels(scene: Scene, grid: int, resolution: int) -> np.ndarray:
    """What each cell of a grid x grid partition of the canvas shows: int32 [grid, grid],
    0 for the background, else 1 + the index in `SHAPES` of the shape covering most of the
    cell, where it covers at least 1/8 of it (objects drawn later hide earlier ones, as in
    `render`). The per-cell targets of a captioner's auxiliary shape loss."""
    resolution = _check_resolution(resolution)
    if scene.canvas != (1.0, 1.0):
        raise ValueError(f"cell labels are for square canvases; this scene's is {scene.canvas}")
    if grid < 1 or resolution % grid:
        raise ValueError(f"grid {grid} must divide the resolution {resolution}")
    owner = np.full((resolution, resolution), -1, np.int32)  # object index per pixel
    for i, obj in enumerate(scene.objects):
        window, alpha = coverage(obj, resolution)
        if alpha.size:
            owner[window] = np.where(alpha >= 0.5, i, owner[window])
    side = resolution // grid
    cells = owner.reshape(grid, side, grid, side).transpose(0, 2, 1, 3).reshape(grid, grid, -1)
    if not scene.objects:
        return np.zeros((grid, grid), np.int32)
    counts = (cells[..., None] == np.arange(len(scene.objects))).sum(2)  # [g, g, objects]
    ids = np.asarray([1 + list(SHAPES).index(obj.shape) for obj in scene.objects], np.int32)
    covered = counts.max(-1) * 8 >= side * side
    return np.where(covered, ids[counts.argmax(-1)], 0).astype(np.int32)
