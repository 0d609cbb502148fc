"""Shape outlines as signed distance functions, and the geometry the samplers and scorer share.

Every shape is defined in its own frame with unit area and its centroid at the origin, in
math orientation (v points up). A drawn object is that outline scaled by `size` (so that
its area is size**2), rotated by `rotation` and moved to its centroid (x, y) on the canvas,
where y points down. Signed distances are negative inside.

`relations` is the one definition of "left of / right of / above / below" in the domain:
the scene samplers use it to place objects, the held-out split uses it to decide which
configurations a scene contains, and the scorer uses it to read an image. It is GenEval's
rule (Ghosh et al. 2023, `evaluation/evaluate_images.py:relative_position`): the offset
between centres, each axis shrunk by `threshold` times the summed box sizes, must point
within 60 degrees of the direction named.
"""

from __future__ import annotations

import functools
import math

import numpy as np

from imagen_jax.shapes.spec import SHAPES, SceneObject, check_shape

STAR_INNER_RATIO = 0.45  # inner / outer radius; chunkier than a pentagram (0.38) to read at 32 px


def _regular_vertices(n: int, radius: float, phase_deg: float = 90.0) -> np.ndarray:
    angles = np.deg2rad(phase_deg + 360.0 * np.arange(n) / n)
    return radius * np.stack([np.cos(angles), np.sin(angles)], -1)


def _unit_polygons() -> dict[str, np.ndarray]:
    """Vertices [N, 2] (counter-clockwise) of the polygonal shapes, unit area, centroid 0."""
    tri_radius = math.sqrt(4.0 / (3.0 * math.sqrt(3.0)))  # area 3*sqrt(3)/4 * R^2 = 1
    star_radius = math.sqrt(1.0 / (5.0 * STAR_INNER_RATIO * math.sin(math.radians(36.0))))
    star = _regular_vertices(10, star_radius)
    star[1::2] *= STAR_INNER_RATIO
    w = math.sqrt(1.0 / 5.0)  # a plus sign of five w-by-w squares
    a, b = w / 2, 3 * w / 2
    cross = [(a, -b), (a, -a), (b, -a), (b, a), (a, a), (a, b)]
    cross += [(-x, -y) for x, y in cross]
    return {
        "square": np.array([(0.5, -0.5), (0.5, 0.5), (-0.5, 0.5), (-0.5, -0.5)]),
        "triangle": _regular_vertices(3, tri_radius),
        "star": star,
        "cross": np.array(cross),
    }


POLYGONS = _unit_polygons()
CIRCLE_RADIUS = 1.0 / math.sqrt(math.pi)


def polygon_sdf(p: np.ndarray, vertices: np.ndarray) -> np.ndarray:
    """Signed distance from points p [..., 2] to a simple polygon (Quilez, "2D distance
    functions": exact distance to the nearest edge, sign by the crossing-number rule)."""
    v0 = vertices.astype(p.dtype)
    e = np.roll(v0, -1, axis=0) - v0  # [E, 2]
    w = p[..., None, :] - v0  # [..., E, 2]
    t = np.clip((w * e).sum(-1) / (e * e).sum(-1), 0.0, 1.0)
    b = w - e * t[..., None]
    dist = np.sqrt((b * b).sum(-1).min(-1))
    up = p[..., None, 1] >= v0[:, 1]
    down = p[..., None, 1] < np.roll(v0, -1, axis=0)[:, 1]
    left = e[:, 0] * w[..., 1] > e[:, 1] * w[..., 0]
    crossings = ((up & down & left) | (~up & ~down & ~left)).sum(-1)
    return np.where(crossings % 2 == 1, -dist, dist)


def _raw_heart_sdf(p: np.ndarray) -> np.ndarray:
    """Quilez's exact heart: two discs on a 45-degree square, tip at the origin, ~1.1 tall."""
    x, y = np.abs(p[..., 0]), p[..., 1]
    lobe = np.hypot(x - 0.25, y - 0.75) - math.sqrt(2.0) / 4.0
    k = 0.5 * np.maximum(x + y, 0.0)
    body = np.sqrt(np.minimum(x**2 + (y - 1.0) ** 2, (x - k) ** 2 + (y - k) ** 2))
    return np.where(y + x > 1.0, lobe, body * np.sign(x - y))


@functools.cache
def _heart_frame() -> tuple[float, float]:
    """(scale, centroid height) taking the raw heart to unit area with its centroid at 0."""
    n = 1000
    c = (np.arange(n) + 0.5) / n
    xs, ys = np.meshgrid(c * 1.6 - 0.8, c * 1.6 - 0.3)
    inside = _raw_heart_sdf(np.stack([xs, ys], -1)) < 0
    cell = (1.6 / n) ** 2
    area = inside.sum() * cell
    return 1.0 / math.sqrt(area), float(ys[inside].mean())


def unit_sdf(shape: str, p: np.ndarray) -> np.ndarray:
    """Signed distance [...] from points p [..., 2] to the unit-area shape (math frame)."""
    if shape == "circle":
        return np.hypot(p[..., 0], p[..., 1]) - CIRCLE_RADIUS
    if shape == "heart":
        scale, centroid_v = _heart_frame()
        raw = p / scale + np.asarray([0.0, centroid_v], p.dtype)
        return _raw_heart_sdf(raw) * scale
    return polygon_sdf(p, POLYGONS[check_shape(shape)])


@functools.cache
def outline(shape: str) -> np.ndarray:
    """Boundary points [720, 2] of the unit shape, by bisection along rays from the centroid
    (every shape here is star-shaped about its centroid)."""
    angles = np.deg2rad(np.arange(720) / 2.0)
    dirs = np.stack([np.cos(angles), np.sin(angles)], -1)
    lo, hi = np.zeros(len(angles)), np.full(len(angles), 2.0)
    for _ in range(40):
        mid = (lo + hi) / 2
        inside = unit_sdf(shape, dirs * mid[:, None]) < 0
        lo, hi = np.where(inside, mid, lo), np.where(inside, hi, mid)
    return dirs * lo[:, None]


@functools.cache
def circumradius(shape: str) -> float:
    """Largest distance from the centroid to the outline of the unit shape."""
    return float(np.hypot(*outline(shape).T).max())


def to_unit_frame(obj: SceneObject, px: np.ndarray, py: np.ndarray) -> np.ndarray:
    """Canvas points (x right, y down) -> points [..., 2] in the object's unit frame."""
    u = (px - obj.x) / obj.size
    v = (obj.y - py) / obj.size
    c, s = math.cos(math.radians(obj.rotation)), math.sin(math.radians(obj.rotation))
    return np.stack([c * u + s * v, -s * u + c * v], -1)


def bbox(obj: SceneObject) -> tuple[float, float, float, float]:
    """(x0, y0, x1, y1) of the drawn object, canvas units."""
    pts = outline(obj.shape)
    c, s = math.cos(math.radians(obj.rotation)), math.sin(math.radians(obj.rotation))
    x = obj.x + obj.size * (c * pts[:, 0] - s * pts[:, 1])
    y = obj.y - obj.size * (s * pts[:, 0] + c * pts[:, 1])
    return float(x.min()), float(y.min()), float(x.max()), float(y.max())


def relations(
    center_a: tuple[float, float],
    dims_a: tuple[float, float],
    center_b: tuple[float, float],
    dims_b: tuple[float, float],
    *,
    threshold: float = 0.1,
) -> frozenset[str]:
    """Relations of A to B ("left of", "right of", "above", "below"; y down), GenEval's rule.

    A diagonal offset can hold two relations; objects too close for their sizes hold none.
    """
    offset = np.subtract(center_a, center_b, dtype=np.float64)
    norm = float(np.hypot(*offset))
    if norm == 0.0:
        return frozenset()
    slack = threshold * (np.asarray(dims_a, np.float64) + np.asarray(dims_b, np.float64))
    revised = np.maximum(np.abs(offset) - slack, 0.0) * np.sign(offset)
    if np.all(np.abs(revised) < 1e-3 * max(norm, 1e-9)):
        return frozenset()
    dx, dy = revised / norm
    found = set()
    if dx < -0.5:
        found.add("left of")
    if dx > 0.5:
        found.add("right of")
    if dy < -0.5:
        found.add("above")
    if dy > 0.5:
        found.add("below")
    return frozenset(found)


def object_relations(a: SceneObject, b: SceneObject, *, threshold: float = 0.1) -> frozenset[str]:
    """`relations` of two drawn objects, from their exact boxes."""
    ba, bb = bbox(a), bbox(b)
    return relations(
        (a.x, a.y),
        (ba[2] - ba[0], ba[3] - ba[1]),
        (b.x, b.y),
        (bb[2] - bb[0], bb[3] - bb[1]),
        threshold=threshold,
    )


assert set(POLYGONS) | {"circle", "heart"} == set(SHAPES)
