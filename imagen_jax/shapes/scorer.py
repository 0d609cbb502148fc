"""The scorer: reads the objects back from an image and checks them against a prompt's spec.

Reading (`read_image`), step by step:

1. Background: the per-channel median of the image border; its name is the nearest of
   `BACKGROUNDS`. An image whose border is mostly not that colour (less than half of it
   within `PLAIN_DISTANCE`) has no plain background: nothing is read from it (noise).
2. Foreground: pixels farther from the background colour than half the distance from it
   to the nearest palette colour; 8-connected components of that mask are candidates.
3. Colour: each candidate's pixels vote for their nearest palette colour, counting only
   "solid" pixels, whose nearest palette entry (background included) is less than 0.6 times
   as far as the second nearest. Anti-aliased edges, which blend the object into the
   background and may pass near a third colour (yellow over black through orange), do not
   vote. A colour with at least a quarter of the votes is present; a candidate with two
   present colours (objects that touch) is split between them; a candidate whose top colour
   has less than 60% of the votes is not an object (noise).
4. Coverage: each pixel near the object gets alpha, its position on the line from the
   background colour to the object's own (median) colour. Alpha is unclipped, so pixel
   noise averages out and blur moves coverage without changing its sum: the area, centroid
   and angular profile below are sub-pixel measurements that survive noise, blur and JPEG.
   A candidate whose covered pixels stray far from that line (mean distance over
   `MAX_RESIDUAL` times the object-background distance) is not a flat-coloured object.
   Objects too small (30% of the smallest drawn) or too large (a quarter of the image)
   are dropped. The rings around objects that catch their blurred rims are shared out
   between neighbours, so that one object's rim never adds to another's area.
5. Shape: the radial profile r(theta) = sqrt(2 * area of the angular sector / sector
   angle), about the centroid, divided by sqrt(area) and low-passed to its first 6
   harmonics, is matched against templates of every shape: the renderer's own drawing of
   the shape at the object's pixel size, Gaussian-blurred by 0 to 0.16 of its size, rotated
   within +-22.5 degrees. The nearest template names the shape; none within
   `MAX_SHAPE_DISTANCE` leaves it unnamed. Shapes are read upright, as they are drawn
   (within +-15 degrees): a square turned past 22.5 degrees is nearer a diamond (and a
   cross), a triangle past 30 is turning upside down.
6. Size: sqrt(area / image area), named by `spec.SIZE_BOUNDARY`; position: the centroid;
   relations: `geometry.relations` (GenEval's rule) on centroids and alpha >= 0.5 boxes.

Checking (`check`, GenEval semantics, Ghosh et al. 2023), by the prompt's task:

* single_object: at least one object of the shape (colour not checked).
* two_object: at least one object of each shape.
* counting: exactly N objects of the shape (colour not checked).
* colors: at least one object of the shape, and every object of that shape has the colour.
* position: at least one object of each shape, and every such pair holds the relation.
* color_attr: at least one object of each (colour, shape), and every object of either shape
  has the colour the prompt binds to that shape.
* no task (a free prompt): every constraint the prompt states: shapes; colours, sizes and
  counts where stated (a count of one means "at least one", larger counts are exact); the
  relation; the background; and the binding rule of colors/color_attr for colour and size.

Why an image failed (`failure_kind`), the first of `FAILURE_KINDS` that applies:
unreadable (no plain background); missing (no object of a shape the prompt names);
swapped (an object of a named shape wears the colour the prompt gives another object: the
binding failure of color_attr); color (a named shape in a colour no object is asked for);
size; count; background; relation.

Objects of shapes the prompt does not name never fail it (as in GenEval, which only looks
for the classes a prompt names); objects of a named shape do when they contradict it (a
fourth star for "three stars", a blue circle beside the red one for "a red circle"). Where
GenEval looks at the most confident detection of a class, this scorer has no confidences
and asks every object of that shape to agree. An object whose shape is unnamed counts for
nothing. Touching objects of one colour merge into one candidate, which then rarely matches a
shape (a count comes out short): the samplers never draw touching objects.

Measured on the renderer's own images (tests/shapes/test_scorer.py, which prints them):
100% at 32-256 px, clean and under noise (std 8), blur (0.6 px at 32 px) and JPEG q75,
except 32 px JPEG with 4:2:0 chroma subsampling (about 90%: it erases the outline of
colours as bright as the background); 0% on renders of wrong specs and on noise.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from typing import Any

import numpy as np

from imagen_jax.shapes import geometry, render
from imagen_jax.shapes.spec import (
    BACKGROUNDS,
    COLORS,
    SHAPES,
    SIZE_RANGES,
    ObjectSpec,
    PromptSpec,
    SceneObject,
    size_name,
)

PALETTE = np.asarray(list(COLORS.values()), np.float32)  # [6, 3]
COLOR_NAMES = tuple(COLORS)
BACKGROUND_PALETTE = np.asarray(list(BACKGROUNDS.values()), np.float32)

SOLID_RATIO = 0.6  # a pixel votes if its nearest colour is < 0.6x as far as the second
PRESENT_SHARE = 0.25  # share of a candidate's votes that makes a colour present
MIN_PURITY = 0.6  # share of votes the colour of a one-colour object must have
# Smallest object (area, fraction of the image): 30% of the smallest drawn one.
MIN_AREA = 0.3 * SIZE_RANGES["small"][0] ** 2
MAX_AREA = 0.25  # a candidate covering more than a quarter of the image is not an object
NUM_BINS = 72  # angular bins of the radial profile (5 degrees)
HARMONICS = 6  # the profile is compared on its harmonics 0..6
TEMPLATE_BLURS = (0.0, 0.04, 0.08, 0.12, 0.16)  # Gaussian sigma / sqrt(area)
MAX_ROTATION = 22.5  # degrees either way that a template is turned to match
ROTATION_STEP = 1.25
# RMS profile distance (in units of sqrt(area)) within which a shape is named: renders stay
# below 0.035 (0.065 in 32 px 4:2:0 JPEG); a circle stretched 1.2x is 0.035 from a circle
# (stretched further it turns heart-like); two overlapping circles are >= 0.06 from anything.
MAX_SHAPE_DISTANCE = 0.06
PLAIN_DISTANCE = 40.0  # border pixels this close to the background colour are plain
MIN_PLAIN = 0.5  # an image whose border is less plain than this has no background to read
MAX_RESIDUAL = 0.2  # mean colour off the background-object line, / object-background distance


# ----------------------------------------------------------------------------------------------
# Results
# ----------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Detection:
    """An object read from an image. Positions are fractions of the width / height."""

    shape: str | None  # None: matches no shape's template
    color: str
    x: float  # centroid
    y: float
    bbox: tuple[float, float, float, float]  # x0, y0, x1, y1 of the alpha >= 0.5 pixels
    size: float  # sqrt(area / image area)
    rotation: float  # degrees, of the best matching template
    shape_distance: float  # RMS distance of the profile to the best template
    shape_margin: float  # distance to the second best shape minus shape_distance
    residual: float  # mean colour distance off the background-object line, relative

    @property
    def size_name(self) -> str:
        return size_name(self.size)

    @property
    def dims(self) -> tuple[float, float]:
        return self.bbox[2] - self.bbox[0], self.bbox[3] - self.bbox[1]

    def to_dict(self) -> dict[str, Any]:
        out = dataclasses.asdict(self)
        out["bbox"] = [round(v, 4) for v in self.bbox]
        for key in ("x", "y", "size", "rotation", "shape_distance", "shape_margin", "residual"):
            out[key] = round(out[key], 4)
        out["size_name"] = self.size_name
        return out


@dataclasses.dataclass(frozen=True)
class Reading:
    """Everything read from one image."""

    background: str  # the nearest named background
    background_rgb: tuple[float, float, float]
    objects: tuple[Detection, ...]
    plain_background: bool = True  # False: no plain background, so nothing was read

    def counts(self) -> dict[str, int]:
        """Objects per named shape."""
        out = dict.fromkeys(SHAPES, 0)
        for obj in self.objects:
            if obj.shape is not None:
                out[obj.shape] += 1
        return {k: v for k, v in out.items() if v}

    def to_dict(self) -> dict[str, Any]:
        return {
            "background": self.background,
            "plain_background": self.plain_background,
            "objects": [o.to_dict() for o in self.objects],
            "counts": self.counts(),
        }


@dataclasses.dataclass(frozen=True)
class Result:
    """The verdict on one image for one prompt spec, with what was read."""

    passed: bool
    task: str | None
    checked: PromptSpec  # the constraints that were checked (the task's share of the spec)
    failures: tuple[str, ...]  # why it failed; empty when passed
    reading: Reading
    relations: tuple[str, ...] | None  # relations of group 0 to group 1, when both were found

    @property
    def objects(self) -> tuple[Detection, ...]:
        return self.reading.objects

    @property
    def counts(self) -> dict[str, int]:
        return self.reading.counts()

    def to_dict(self) -> dict[str, Any]:
        return {
            "passed": self.passed,
            "task": self.task,
            "checked": self.checked.to_dict(),
            "failures": list(self.failures),
            "failure_kind": failure_kind(self),
            "relations": None if self.relations is None else list(self.relations),
            **self.reading.to_dict(),
        }


# ----------------------------------------------------------------------------------------------
# Image processing helpers
# ----------------------------------------------------------------------------------------------


def label_components(mask: np.ndarray) -> tuple[np.ndarray, int]:
    """8-connected components of a boolean mask [H, W]: labels (0 = off, 1..n) and n.

    Label propagation with hooking and pointer jumping (as in Shiloach & Vishkin): every
    pixel holds the index of a pixel of its component, minimised over its neighbours until
    nothing changes; a few dozen array passes even for noise or long snakes.
    """
    h, w = mask.shape
    off = h * w
    lab = np.where(mask, np.arange(off).reshape(h, w), off)
    on = np.flatnonzero(mask)
    while True:
        padded = np.pad(lab, 1, constant_values=off)
        new = lab
        for dy in range(3):
            for dx in range(3):
                new = np.minimum(new, padded[dy : dy + h, dx : dx + w])
        flat = np.where(mask, new, off).ravel()
        np.minimum.at(flat, lab.ravel()[on], flat[on])  # hook the old root too
        while True:
            jumped = flat[flat[on]]
            if np.array_equal(jumped, flat[on]):
                break
            flat[on] = jumped
        new = flat.reshape(h, w)
        if np.array_equal(new, lab):
            break
        lab = new
    roots, inverse = np.unique(lab.ravel(), return_inverse=True)
    labels = inverse.reshape(h, w).astype(np.int32) + 1
    labels[~mask] = 0
    return labels, int(len(roots) - (roots[-1] == off))


def grow_labels(labels: np.ndarray, steps: int) -> np.ndarray:
    """Labels [H, W] grown into unlabelled (0) pixels, one 8-neighbour ring per step, all
    at once: a pixel goes to the label that reaches it first (the larger on a tie)."""
    h, w = labels.shape
    for _ in range(steps):
        padded = np.pad(labels, 1)
        reach = labels
        for dy in range(3):
            for dx in range(3):
                reach = np.maximum(reach, padded[dy : dy + h, dx : dx + w])
        labels = np.where(labels == 0, reach, labels)
    return labels


def _gaussian_blur(a: np.ndarray, sigma: float) -> np.ndarray:
    """a [n, n] convolved with a Gaussian (zero outside), as two matrix products."""
    if sigma <= 0:
        return a
    x = np.arange(a.shape[0])
    k = np.exp(-((x[:, None] - x[None, :]) ** 2) / (2 * sigma**2))
    k[k < 1e-9] = 0.0  # no denormals: they make the products crawl
    k /= k.sum(0, keepdims=True).max()  # the full kernel's mass, so that edges lose theirs
    return k @ a @ k.T


def _subpixels(area: float) -> int:
    return 4 if area < 400 else 2 if area < 2000 else 1


def sector_weights(shape: tuple[int, int], cx: float, cy: float, sub: int) -> np.ndarray:
    """[h * w, NUM_BINS]: the share of each pixel of an [h, w] window that falls in each
    angular sector about (cx, cy), counter-clockwise as seen (y points down), from sub x sub
    sub-pixels; pixel (i, j) spans [j, j + 1] x [i, i + 1]. Splitting pixels lets one near
    the centre spread over the sectors it spans."""
    h, w = shape
    offsets = (np.arange(sub) + 0.5) / sub
    yy = np.arange(h)[:, None, None, None] + offsets[None, None, :, None] - cy
    xx = np.arange(w)[None, :, None, None] + offsets[None, None, None, :] - cx
    bins = np.floor(np.arctan2(-yy, xx) / (2 * np.pi) * NUM_BINS).astype(np.int64) % NUM_BINS
    pixel = np.arange(h * w).reshape(h, w, 1, 1)
    counts = np.bincount((pixel * NUM_BINS + bins).ravel(), minlength=h * w * NUM_BINS)
    return counts.reshape(h * w, NUM_BINS) / sub**2


def radial_profile(alpha: np.ndarray, weights: np.ndarray, area: float) -> np.ndarray:
    """sqrt(2 * sector area / sector angle) / sqrt(area) [..., NUM_BINS] from coverage
    alpha [..., h, w] and the window's `sector_weights`."""
    # einsum, not BLAS: OpenBLAS threads make this thin product 20x slower on 2 cores.
    sector = np.einsum("...p,pk->...k", alpha.reshape(*alpha.shape[:-2], -1), weights)
    return np.sqrt(np.maximum(sector, 0.0) * NUM_BINS / np.pi / area)


def _harmonics(profile: np.ndarray) -> np.ndarray:
    return np.fft.rfft(profile, axis=-1)[..., : HARMONICS + 1] / NUM_BINS


@functools.cache
def _templates(shape: str, half_px: int) -> np.ndarray:
    """Harmonics [blurs, HARMONICS + 1] of the shape as the renderer draws it with
    sqrt(area) = half_px / 2 pixels, averaged over four sub-pixel placements. Blurring
    keeps the centroid, so one set of sector weights serves every blur."""
    px = half_px / 2
    n = int(math.ceil(3 * px)) + 8
    total = np.zeros((len(TEMPLATE_BLURS), NUM_BINS))
    for ox, oy in ((0.0, 0.0), (0.25, 0.5), (0.5, 0.25), (0.75, 0.75)):
        obj = SceneObject(shape, "red", px / n, (n // 2 + ox) / n, (n // 2 + oy) / n)
        window, cover = render.coverage(obj, n)
        alpha = np.zeros((n, n))
        alpha[window] = cover
        area = alpha.sum()
        ys, xs = np.mgrid[0:n, 0:n] + 0.5
        cx, cy = (alpha * xs).sum() / area, (alpha * ys).sum() / area
        weights = sector_weights((n, n), cx, cy, _subpixels(area))
        blurred = np.stack([_gaussian_blur(alpha, blur * px) for blur in TEMPLATE_BLURS])
        total += radial_profile(blurred, weights, area)
    return _harmonics(total / 4)


def _rotations() -> tuple[np.ndarray, np.ndarray]:
    degrees = np.arange(-MAX_ROTATION, MAX_ROTATION + 1e-9, ROTATION_STEP)
    m = np.arange(HARMONICS + 1)
    return degrees, np.exp(-1j * np.deg2rad(degrees)[:, None] * m[None, :])


_ROTATION_DEGREES, _ROTATION_PHASES = _rotations()
# Parseval weights: harmonic m > 0 stands for itself and its conjugate.
_HARMONIC_WEIGHTS = np.where(np.arange(HARMONICS + 1) == 0, 1.0, 2.0)


def classify_profile(profile: np.ndarray, px: float) -> tuple[dict[str, float], dict[str, float]]:
    """RMS distance of a profile to each shape's nearest template, and that template's
    rotation in degrees. `px`: the object's sqrt(area) in pixels (picks the templates)."""
    half_px = int(np.clip(round(2 * px), 4, 48))  # pixel effects are negligible past 24 px
    p = _harmonics(profile)
    distances, rotations = {}, {}
    for shape in SHAPES:
        t = _templates(shape, half_px)  # [B, K]
        diff = p[None, None, :] - t[:, None, :] * _ROTATION_PHASES[None]  # [B, R, K]
        d2 = (np.abs(diff) ** 2 * _HARMONIC_WEIGHTS).sum(-1)
        b, r = np.unravel_index(np.argmin(d2), d2.shape)
        distances[shape] = float(np.sqrt(d2[b, r]))
        rotations[shape] = float(_ROTATION_DEGREES[r])
    return distances, rotations


# ----------------------------------------------------------------------------------------------
# Reading an image
# ----------------------------------------------------------------------------------------------


def _as_image(image: Any) -> np.ndarray:
    image = np.asarray(image)
    if image.ndim != 3 or image.shape[-1] != 3 or image.dtype != np.uint8:
        raise ValueError(f"expected a uint8 image [H, W, 3], got {image.dtype} {image.shape}")
    if min(image.shape[:2]) < 8:
        raise ValueError(f"image too small to score: {image.shape}")
    return image.astype(np.float32)


def _background(img: np.ndarray) -> tuple[np.ndarray, float]:
    """The background colour (median of the border) and the share of the border within
    PLAIN_DISTANCE of it."""
    b = max(1, min(img.shape[:2]) // 32)
    border = np.concatenate(
        [img[:b].reshape(-1, 3), img[-b:].reshape(-1, 3)]
        + [img[:, :b].reshape(-1, 3), img[:, -b:].reshape(-1, 3)]
    )
    bg = np.median(border, axis=0)
    return bg, float((np.linalg.norm(border - bg, axis=-1) <= PLAIN_DISTANCE).mean())


@dataclasses.dataclass
class _Pixels:
    """Per-pixel quantities shared by all candidates of one image."""

    img: np.ndarray  # [H, W, 3] float
    bg: np.ndarray  # [3]
    nearest: np.ndarray  # [H, W] index of the nearest palette colour
    solid: np.ndarray  # [H, W] bool: close enough to that colour to vote for it


def _pixels(img: np.ndarray, bg: np.ndarray) -> tuple[_Pixels, np.ndarray, int]:
    """The shared per-pixel quantities, and the foreground components (labels, count)."""
    d2_bg = ((img - bg) ** 2).sum(-1)
    threshold = max(30.0, 0.5 * float(np.linalg.norm(PALETTE - bg, axis=-1).min()))
    fg = d2_bg > threshold**2
    labels, n = label_components(fg)
    # Palette distances only where they are used: on the foreground.
    p = img[fg]  # [F, 3]
    d2 = (p**2).sum(-1, keepdims=True) - 2 * p @ PALETTE.T + (PALETTE**2).sum(-1)  # [F, 6]
    two = np.partition(np.concatenate([d2, d2_bg[fg][:, None]], -1), 1, axis=-1)[:, :2]
    nearest = np.full(fg.shape, -1, np.int64)
    nearest[fg] = d2.argmin(-1)
    solid = np.zeros(fg.shape, bool)
    solid[fg] = (two[:, 0] < SOLID_RATIO**2 * two[:, 1]) & (d2.min(-1) <= d2_bg[fg])
    return _Pixels(img, bg, nearest, solid), labels, n


def _pixel_sets(labels: np.ndarray, n: int, min_pixels: float) -> list[np.ndarray]:
    """Flat pixel indices of each labelled component with at least min_pixels pixels."""
    flat = labels.ravel()
    order = np.argsort(flat, kind="stable")
    ends = np.cumsum(np.bincount(flat, minlength=n + 1))
    return [
        order[ends[i - 1] : ends[i]] for i in range(1, n + 1) if ends[i] - ends[i - 1] >= min_pixels
    ]


def _box(index: np.ndarray, shape: tuple[int, int], pad: int) -> tuple[slice, slice]:
    ys, xs = np.unravel_index(index, shape)
    return (
        slice(max(0, ys.min() - pad), min(shape[0], ys.max() + pad + 1)),
        slice(max(0, xs.min() - pad), min(shape[1], xs.max() + pad + 1)),
    )


def _split(px: _Pixels, index: np.ndarray, min_pixels: float) -> list[tuple[np.ndarray, int]]:
    """The single-colour parts of a candidate (flat pixel indices): (indices, colour index)
    pairs; [] for noise."""
    votes = np.bincount(px.nearest.ravel()[index][px.solid.ravel()[index]], minlength=len(PALETTE))
    total = votes.sum()
    if total == 0:
        return []
    present = np.flatnonzero(votes >= PRESENT_SHARE * total)
    if len(present) <= 1:
        top = int(votes.argmax())
        return [(index, top)] if votes[top] >= MIN_PURITY * total else []
    # Objects that touch: each pixel goes to the nearest of the colours present.
    box = _box(index, px.nearest.shape, 0)
    crop = px.img[box]
    mask = np.zeros(px.nearest.shape, bool)
    mask.ravel()[index] = True
    nearest = np.linalg.norm(crop[..., None, :] - PALETTE[present], axis=-1).argmin(-1)
    parts = []
    for k, color in enumerate(present):
        sub, m = label_components(mask[box] & (nearest == k))
        for sub_index in _pixel_sets(sub, m, min_pixels):
            ys, xs = np.unravel_index(sub_index, sub.shape)
            flat = np.ravel_multi_index((ys + box[0].start, xs + box[1].start), mask.shape)
            parts.append((flat, int(color)))
    return parts


def _measure(px: _Pixels, region: np.ndarray, part: np.ndarray, color: int) -> Detection | None:
    """Coverage, size, position and shape of one single-colour part (mask [H, W]) of a
    candidate; `region` [H, W]: the pixels that may hold its coverage. Positions and sizes
    are in canvas units, the image's shorter side 1 (`Scene`)."""
    h, w = part.shape
    side = min(h, w)
    index = np.flatnonzero(region)
    box = _box(index, (h, w), 0)
    y0, x0 = box[0].start, box[1].start
    votes = part[box] & px.solid[box] & (px.nearest[box] == color)
    if not votes.any():
        return None
    crop = px.img[box] - px.bg
    direction = np.median(crop[votes], axis=0)  # the object's own colour, minus background
    alpha = (crop @ direction) / float(direction @ direction)
    alpha = np.where(region[box] & (alpha > 0.1), alpha, 0.0)
    area = float(alpha.sum())
    iy, ix = np.nonzero(alpha >= 0.5)
    if not (MIN_AREA * side**2 <= area <= MAX_AREA * side**2 and len(iy)):
        return None
    yy, xx = np.mgrid[0 : alpha.shape[0], 0 : alpha.shape[1]] + 0.5
    cx, cy = float((alpha * xx).sum() / area), float((alpha * yy).sum() / area)
    weights = sector_weights(alpha.shape, cx, cy, _subpixels(area))
    distances, rotations = classify_profile(radial_profile(alpha, weights, area), math.sqrt(area))
    # How far the covered pixels stray from the line between background and object colour:
    # little for a drawn object under noise, blur or JPEG (< 0.2), a lot for noise (> 0.29).
    stray = np.linalg.norm(crop - alpha[..., None] * direction, axis=-1)[alpha >= 0.5]
    residual = float(stray.mean() / np.linalg.norm(direction))
    if residual > MAX_RESIDUAL:
        return None
    ranked = sorted(distances, key=distances.get)
    best = ranked[0]
    return Detection(
        shape=best if distances[best] <= MAX_SHAPE_DISTANCE else None,
        color=COLOR_NAMES[color],
        x=float((x0 + cx) / side),
        y=float((y0 + cy) / side),
        bbox=(
            float(x0 + ix.min()) / side,
            float(y0 + iy.min()) / side,
            float(x0 + ix.max() + 1) / side,
            float(y0 + iy.max() + 1) / side,
        ),
        size=math.sqrt(area) / side,
        rotation=rotations[best],
        shape_distance=distances[best],
        shape_margin=distances[ranked[1]] - distances[best],
        residual=residual,
    )


def read_image(image: np.ndarray) -> Reading:
    """The background and every object read from a uint8 image [H, W, 3]; positions and
    sizes in canvas units (the shorter side 1), so a wide image reads as a wide `Scene`."""
    img = _as_image(image)
    h, w = img.shape[:2]
    side = min(h, w)
    bg, plain = _background(img)
    bg_name = tuple(BACKGROUNDS)[int(np.linalg.norm(BACKGROUND_PALETTE - bg, axis=-1).argmin())]
    if plain < MIN_PLAIN:
        return Reading(bg_name, tuple(float(v) for v in bg), (), plain_background=False)
    px, labels, n = _pixels(img, bg)
    min_pixels = 0.5 * MIN_AREA * side**2
    parts = []
    for index in _pixel_sets(labels, n, min_pixels):
        parts += _split(px, index, min_pixels)
    # Each part's coverage may reach into the background around it, up to where the blurred
    # rim of a neighbour starts: rings grown from all parts at once share it out.
    part_labels = np.zeros((h, w), np.int32)
    for k, (index, _) in enumerate(parts, start=1):
        part_labels.ravel()[index] = k
    regions = grow_labels(part_labels, max(1, round(1.5 * side / 32)))
    objects = []
    for k, (_, color) in enumerate(parts, start=1):
        found = _measure(px, regions == k, part_labels == k, color)
        if found is not None:
            objects.append(found)
    objects.sort(key=lambda o: (o.y, o.x))
    return Reading(bg_name, tuple(float(v) for v in bg), tuple(objects))


# ----------------------------------------------------------------------------------------------
# Checking a reading against a prompt spec
# ----------------------------------------------------------------------------------------------


def checked_constraints(spec: PromptSpec) -> PromptSpec:
    """The part of a spec that its task checks (see the module docstring)."""
    task = spec.task
    if task is None:
        return spec
    keep_color = task in ("colors", "color_attr")
    groups = spec.objects[:1] if task in ("single_object", "colors") else spec.objects[:2]
    if task == "position" and groups[0].shape == groups[1].shape:
        keep_color = True  # the colours are what tell the two apart
    groups = tuple(
        ObjectSpec(
            g.shape,
            color=g.color if keep_color else None,
            count=g.count if task == "counting" else 1,
        )
        for g in groups
    )
    relation = spec.relation if task == "position" else None
    return PromptSpec(groups, relation=relation, task=task)


def _describe(group: ObjectSpec) -> str:
    words = [w for w in (group.size, group.color, group.shape) if w]
    return " ".join(words)


def _matches(obj: Detection, group: ObjectSpec) -> bool:
    return (
        obj.shape == group.shape
        and (group.color is None or obj.color == group.color)
        and (group.size is None or obj.size_name == group.size)
    )


def check(reading: Reading, spec: PromptSpec) -> Result:
    """Checks what was read against the constraints of the spec's task."""
    checked = checked_constraints(spec)
    exact_counts = checked.task in (None, "counting")
    failures = []
    found = []
    for group in checked.objects:
        hits = [o for o in reading.objects if _matches(o, group)]
        found.append(hits)
        if exact_counts and group.count > 1 and len(hits) != group.count:
            failures.append(f"expected {group.count} {_describe(group)}, found {len(hits)}")
        elif not hits:
            failures.append(f"expected a {_describe(group)}, found none")
    for obj in reading.objects:  # binding: no object of a named shape contradicts the prompt
        groups = [g for g in checked.objects if g.shape == obj.shape]
        if groups and not any(_matches(obj, g) for g in groups):
            failures.append(
                f"found a {obj.size_name} {obj.color} {obj.shape} at ({obj.x:.2f}, {obj.y:.2f}),"
                f" but the prompt asks for {' or '.join(_describe(g) for g in groups)}"
            )
    relations = None
    if checked.relation is not None and all(found):
        seen = set()
        for a in found[0]:
            for b in found[1]:
                held = geometry.relations((a.x, a.y), a.dims, (b.x, b.y), b.dims)
                seen |= held
                if checked.relation not in held:
                    failures.append(
                        f"the {_describe(checked.objects[0])} at ({a.x:.2f}, {a.y:.2f}) is not"
                        f" {checked.relation} the {_describe(checked.objects[1])} at"
                        f" ({b.x:.2f}, {b.y:.2f}) (relations read: {sorted(held) or 'none'})"
                    )
        relations = tuple(sorted(seen))
    if checked.background is not None and reading.background != checked.background:
        failures.append(f"expected a {checked.background} background, read {reading.background}")
    return Result(not failures, spec.task, checked, tuple(failures), reading, relations)


FAILURE_KINDS = (
    "unreadable",
    "missing",
    "swapped",
    "color",
    "size",
    "count",
    "background",
    "relation",
)


def failure_kind(result: Result) -> str | None:
    """Why the image failed, the first of `FAILURE_KINDS` that applies; None if it passed."""
    if result.passed:
        return None
    reading, groups = result.reading, result.checked.objects
    if not reading.plain_background:
        return "unreadable"
    if any(all(o.shape != g.shape for o in reading.objects) for g in groups):
        return "missing"
    named = [(o, [g for g in groups if g.shape == o.shape]) for o in reading.objects]
    named = [(o, same) for o, same in named if same]
    off_color = [
        o for o, same in named if all(g.color is not None and g.color != o.color for g in same)
    ]
    if any(any(g.shape != o.shape and g.color == o.color for g in groups) for o in off_color):
        return "swapped"
    if off_color:
        return "color"
    if any(not any(_matches(o, g) for g in same) for o, same in named):
        return "size"  # its colour is one asked for its shape, so its size is not
    exact = result.checked.task in (None, "counting")
    for g in groups:
        hits = sum(_matches(o, g) for o in reading.objects)
        if not hits:
            return "missing"  # its shape is there, all taken by another object of the prompt
        if exact and g.count > 1 and hits != g.count:
            return "count"
    if result.checked.background is not None and reading.background != result.checked.background:
        return "background"
    return "relation"


def score(image: np.ndarray, spec: PromptSpec) -> Result:
    """Reads a uint8 image [H, W, 3] and checks it against the spec (see module docstring)."""
    return check(read_image(image), spec)
