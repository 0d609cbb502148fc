"""Sampling scenes and prompts for the six GenEval tasks, in either split.

The tasks (Ghosh et al. 2023, GenEval) and the scenes drawn for them:

* single_object: one object (what is scored: its shape).
* two_object: two objects of different shapes (both shapes).
* counting: N identical objects, N in 2..4: same shape, colour and named size (the count).
* colors: one object (its colour).
* position: two objects of different shapes, the first clearly `left of | right of | above |
  below` the second: within 30 degrees of that axis, and related even with 2.5 times the
  scorer's threshold (the relation).
* color_attr: two objects of different shapes and different colours (the binding).

Every prompt names the colour of every object, so that the prompts of all tasks, and of
both splits, read alike and differ only in what is scored and in which combinations they
contain. The "rich" captions used for training (the default for `split='train'`) also
name sizes and the background now and then and sometimes leave a colour out (except in
the colour tasks).

Layout: objects keep a margin of `MARGIN` from the canvas edge and a gap of `GAP` between
their circumscribed circles, so they never touch, even after blur at 32 px; rotations are
within +-`MAX_ROTATION` degrees. Everything is drawn from the `np.random.Generator` passed
in (never a global RNG), so a seed fixes the example.
"""

from __future__ import annotations

import copy
import dataclasses
import zlib

import numpy as np

from imagen_jax.shapes import geometry, splits
from imagen_jax.shapes import wordings as wordings_lib
from imagen_jax.shapes.spec import (
    BACKGROUNDS,
    INVERSE_RELATION,
    RELATIONS,
    SHAPES,
    SIZE_RANGES,
    SIZES,
    TASKS,
    ObjectSpec,
    PromptSpec,
    Scene,
    SceneObject,
    check_canvas,
    check_task,
)

MARGIN = 0.03
GAP = 0.06
MAX_ROTATION = 15.0
COUNTS = (2, 3, 4)
RELATION_THRESHOLD = 0.25  # position scenes hold their relation at 2.5x the scorer's 0.1
RICH_SIZE_P = 0.25  # in rich captions, chance of naming each group's size
RICH_BACKGROUND_P = 0.3  # ... of naming the background
RICH_NO_COLOR_P = 0.1  # ... of leaving a group's colour out (tasks that do not score it)
_PLACEMENT_TRIES = 50
_SCENE_TRIES = 20


@dataclasses.dataclass(frozen=True)
class Example:
    """A scene, the constraints its caption states (with the task), and the caption; with
    `sample_example(with_counterfactual=True)`, also the caption of `counterfactual(spec)` in
    the same wording (None where the spec has no relation or two colours to exchange)."""

    scene: Scene
    spec: PromptSpec
    caption: str
    counterfactual: str | None = None


COUNTERFACTUAL_KINDS = ("relation", "colors")  # the default kinds
ALL_COUNTERFACTUAL_KINDS = (*COUNTERFACTUAL_KINDS, "shape")


def check_counterfactual_kinds(kinds) -> tuple[str, ...]:
    """`kinds` as a tuple (None: the default kinds); an unknown or empty one is an error."""
    kinds = COUNTERFACTUAL_KINDS if kinds is None else tuple(kinds)
    unknown = sorted(set(kinds) - set(ALL_COUNTERFACTUAL_KINDS))
    if unknown or not kinds:
        raise ValueError(
            f"counterfactual kinds {list(kinds)}: expected a non-empty subset of "
            f"{list(ALL_COUNTERFACTUAL_KINDS)}"
        )
    return kinds


def counterfactual(
    spec: PromptSpec, kinds=COUNTERFACTUAL_KINDS, *, training: bool = False, mixed: bool = False
) -> PromptSpec | None:
    """What the scene is not, told apart only by one binding: the spec with its relation
    inverted ("left of" for "right of"; kind "relation"), else with its two objects' colours
    exchanged (kind "colors"), else (kind "shape") with its first group's shape replaced by
    another, picked from the spec so that it is the same every time; None if none of
    `kinds` applies. Earlier kinds take precedence where several apply; `mixed`: one of
    those that apply, picked from the spec (the same every time), so that scenes with a
    relation get the other kinds too. `training`: only a spec that names no held-out
    combination (`splits.spec_heldout`): a training scene's negative caption must not name
    a held-out pair or layout either (the held-out split's claim is that training never
    stated them)."""
    options = _counterfactuals(spec, kinds, training)
    if not options:
        return None
    if not mixed:
        return options[0]
    return options[zlib.crc32(repr(("mixed", spec.canonical())).encode()) % len(options)]


def _counterfactuals(spec: PromptSpec, kinds, training: bool) -> list[PromptSpec]:
    """The counterfactuals of `counterfactual`, one per kind that applies, in its order."""
    options = []
    if spec.relation is not None and "relation" in kinds:
        options.append(dataclasses.replace(spec, relation=INVERSE_RELATION[spec.relation]))
    if "colors" in kinds and len(spec.objects) == 2 and spec.relation is None:
        a, b = spec.objects
        if a.color is not None and b.color is not None and a.color != b.color:
            options.append(
                dataclasses.replace(
                    spec,
                    objects=(
                        dataclasses.replace(a, color=b.color),
                        dataclasses.replace(b, color=a.color),
                    ),
                )
            )
    if "shape" in kinds:
        first, taken = spec.objects[0], {g.shape for g in spec.objects}
        others = [
            dataclasses.replace(
                spec, objects=(dataclasses.replace(first, shape=s), *spec.objects[1:])
            )
            for s in SHAPES
            if s not in taken
        ]
        if training:
            others = [o for o in others if not splits.spec_heldout(o)]
        if others:
            options.append(others[zlib.crc32(repr(spec.canonical()).encode()) % len(others)])
    if training:
        options = [o for o in options if not splits.spec_heldout(o)]
    return options


def _pick(rng: np.random.Generator, options):
    return options[int(rng.integers(len(options)))]


def _pair(rng: np.random.Generator, *, heldout: bool, shape: str | None = None):
    """A (colour, shape) pair, held out or not; of the given shape if one is given."""
    pairs = splits.HELDOUT_PAIRS if heldout else splits.training_pairs()
    pairs = sorted(p for p in pairs if shape is None or p[1] == shape)
    return _pick(rng, pairs)


def _two_shapes(rng: np.random.Generator) -> tuple[str, str]:
    a, b = rng.choice(len(SHAPES), size=2, replace=False)
    return SHAPES[a], SHAPES[b]


def _two_groups(rng: np.random.Generator, split: str, *, distinct_colors: bool):
    """Two (colour, shape) pairs of different shapes; in heldout, at least one held out."""
    while True:
        shape_a, shape_b = _two_shapes(rng)
        heldout_a = split == "heldout" and rng.random() < 0.5
        heldout_b = split == "heldout" and not heldout_a
        color_a, _ = _pair(rng, heldout=heldout_a, shape=shape_a)
        color_b, _ = _pair(rng, heldout=heldout_b, shape=shape_b)
        if not distinct_colors or color_a != color_b:
            return ObjectSpec(shape_a, color_a), ObjectSpec(shape_b, color_b)


def _position_groups(rng: np.random.Generator, split: str):
    relation = _pick(rng, RELATIONS)
    if split == "heldout":
        a, rel, b = _pick(rng, sorted(splits.HELDOUT_CONFIGURATIONS))
        relation = _pick(rng, (rel, {"left of": "right of", "above": "below"}[rel]))
        if relation != rel:
            a, b = b, a
    else:
        while True:
            a, b = _two_shapes(rng)
            if not splits.is_heldout_configuration(a, relation, b):
                break
    color_a, _ = _pair(rng, heldout=False, shape=a)
    color_b, _ = _pair(rng, heldout=False, shape=b)
    return (ObjectSpec(a, color_a), ObjectSpec(b, color_b)), relation


def sample_prompt_spec(rng: np.random.Generator, task: str, split: str = "train") -> PromptSpec:
    """The plain constraints of an evaluation prompt: every object's shape and colour, the
    count, the relation; in `heldout`, at least one held-out combination."""
    check_task(task)
    splits.check_split(split)
    heldout = split == "heldout"
    relation = None
    if task in ("single_object", "colors"):
        color, shape = _pair(rng, heldout=heldout)
        groups = (ObjectSpec(shape, color),)
    elif task == "counting":
        color, shape = _pair(rng, heldout=heldout)
        groups = (ObjectSpec(shape, color, count=_pick(rng, COUNTS)),)
    elif task in ("two_object", "color_attr"):
        groups = _two_groups(rng, split, distinct_colors=task == "color_attr")
    else:
        groups, relation = _position_groups(rng, split)
    return PromptSpec(groups, relation=relation, task=task)


def _enrich(rng: np.random.Generator, spec: PromptSpec, scene: Scene) -> PromptSpec:
    """A training caption's spec: now and then the drawn sizes and background named, a
    colour left out (not in the colour tasks)."""
    keep_colors = spec.task in ("colors", "color_attr")
    groups, start = [], 0
    for g in spec.objects:
        drawn = scene.objects[start : start + g.count]  # scenes keep the groups' order
        start += g.count
        size = drawn[0].size_name if rng.random() < RICH_SIZE_P else None
        color = g.color if keep_colors or rng.random() >= RICH_NO_COLOR_P else None
        groups.append(dataclasses.replace(g, size=size, color=color))
    background = scene.background if rng.random() < RICH_BACKGROUND_P else None
    return dataclasses.replace(spec, objects=tuple(groups), background=background)


def _place(
    rng: np.random.Generator, objects: list[SceneObject], canvas: tuple[float, float]
) -> list[SceneObject] | None:
    """Positions for the objects on a canvas (width, height) (no overlap, inside the
    margin); None if none found.

    Uniform positions, one object after the other; when that finds no room (four large
    objects), a jittered 2 x 2 grid: each object keeps to its own quarter, away from the
    quarter's edges by its radius and half the gap.
    """
    radii = [geometry.circumradius(o.shape) * o.size for o in objects]
    placed: list[SceneObject] = []
    for obj, r in zip(objects, radii, strict=True):
        lo, hi = MARGIN + r, np.asarray(canvas) - MARGIN - r
        for _ in range(_PLACEMENT_TRIES if np.all(lo <= hi) else 0):
            x, y = rng.uniform(lo, hi, size=2)
            others = zip(placed, radii, strict=False)  # radii of the objects placed so far
            if all(np.hypot(x - p.x, y - p.y) >= r + q + GAP for p, q in others):
                placed.append(dataclasses.replace(obj, x=float(x), y=float(y)))
                break
        else:
            return _place_grid(rng, objects, radii, canvas)
    return placed


def _place_grid(
    rng: np.random.Generator,
    objects: list[SceneObject],
    radii: list[float],
    canvas: tuple[float, float],
):
    if len(objects) > 4:
        return None
    cell = (np.asarray(canvas) - 2 * MARGIN) / 2
    placed = []
    for obj, r, k in zip(objects, radii, rng.permutation(4)[: len(objects)], strict=True):
        row, col = divmod(int(k), 2)
        lo = MARGIN + r + GAP / 2 + np.array([col, row]) * cell
        hi = lo + cell - 2 * r - GAP
        if np.any(lo > hi):
            return None
        x, y = rng.uniform(lo, hi)
        placed.append(dataclasses.replace(obj, x=float(x), y=float(y)))
    return placed


# The direction from A to B when A stands `relation` B (y points down).
_TOWARDS_B = {"left of": 0.0, "right of": 180.0, "above": 90.0, "below": 270.0}


def _place_related(
    rng: np.random.Generator,
    a: SceneObject,
    b: SceneObject,
    relation: str,
    canvas: tuple[float, float],
) -> list[SceneObject] | None:
    """A and B placed on a canvas (width, height) so that A clearly stands `relation` B
    (see `_clear`)."""
    ra, rb = (geometry.circumradius(o.shape) * o.size for o in (a, b))
    size = np.asarray(canvas)
    if np.any(MARGIN + max(ra, rb) > size - MARGIN - max(ra, rb)):
        return None
    for _ in range(_PLACEMENT_TRIES):
        xa, ya = rng.uniform(MARGIN + ra, size - MARGIN - ra, size=2)
        angle = np.deg2rad(_TOWARDS_B[relation] + rng.uniform(-25.0, 25.0))
        dist = rng.uniform(ra + rb + GAP, max(canvas))
        xb, yb = xa + dist * np.cos(angle), ya + dist * np.sin(angle)
        xy = np.array([xb, yb])
        if not np.all((MARGIN + rb <= xy) & (xy <= size - MARGIN - rb)):
            continue
        pa = dataclasses.replace(a, x=float(xa), y=float(ya))
        pb = dataclasses.replace(b, x=float(xb), y=float(yb))
        if _clear(pa, pb, relation):
            return [pa, pb]
    return None


def _clear(a: SceneObject, b: SceneObject, relation: str) -> bool:
    """A holds exactly `relation` to B at threshold 0 (within 30 degrees of the axis) and
    still holds it at RELATION_THRESHOLD."""
    return geometry.object_relations(a, b, threshold=0.0) == {relation} and relation in (
        geometry.object_relations(a, b, threshold=RELATION_THRESHOLD)
    )


def _draw_size(rng: np.random.Generator, name: str | None) -> float:
    lo, hi = SIZE_RANGES[name or _pick(rng, SIZES)]
    return float(rng.uniform(lo, hi))


def scene_for(
    rng: np.random.Generator,
    spec: PromptSpec,
    split: str = "train",
    canvas: tuple[float, float] = (1.0, 1.0),
) -> Scene | None:
    """A scene on a canvas (width, height) (`Scene`: the shorter side 1) that satisfies
    every constraint of the spec, or None if none was found.

    Unstated colours are drawn from the training pairs, unstated sizes and the background
    at random; the objects of a group share one named size. In `train`, a scene showing a
    held-out combination is redrawn; `heldout` refuses nothing.
    """
    splits.check_split(split)
    canvas = check_canvas(*canvas)
    for attempt in range(_SCENE_TRIES):
        objects = []
        for g in spec.objects:
            color = g.color or _pair(rng, heldout=False, shape=g.shape)[0]
            # Unstated sizes turn small once large ones have failed to fit a few times.
            size_name = g.size or ("small" if attempt >= _SCENE_TRIES // 4 else _pick(rng, SIZES))
            objects += [
                SceneObject(
                    g.shape,
                    color,
                    _draw_size(rng, size_name),
                    0.5,
                    0.5,
                    float(rng.uniform(-MAX_ROTATION, MAX_ROTATION)),
                )
                for _ in range(g.count)
            ]
        if spec.relation is None:
            placed = _place(rng, objects, canvas)
        else:
            placed = _place_related(rng, *objects, spec.relation, canvas)
        if placed is None:
            continue
        background = spec.background or _pick(rng, tuple(BACKGROUNDS))
        scene = Scene(tuple(placed), background, *canvas)
        if split == "train" and splits.scene_heldout(scene):
            continue
        return scene
    return None


def parse_task_weights(text: str) -> dict[str, float] | None:
    """`"position:3,color_attr:2"` -> the six tasks' weights in the training mixture (tasks
    not named weigh 1); "" -> None (uniform). Raises ValueError naming a bad entry."""
    if not text.strip():
        return None
    weights = dict.fromkeys(TASKS, 1.0)
    for entry in text.split(","):
        name, sep, value = entry.partition(":")
        name = name.strip()
        if not sep or name not in TASKS:
            raise ValueError(
                f"bad task weight {entry.strip()!r} in {text!r}: expected TASK:WEIGHT, TASK "
                f"one of {TASKS}"
            )
        try:
            weights[name] = float(value)
        except ValueError:
            raise ValueError(f"task weight {entry.strip()!r} in {text!r} is not a number") from None
    check_task_weights(weights)
    return weights


def check_task_weights(weights: dict[str, float]) -> None:
    unknown = sorted(set(weights) - set(TASKS))
    if unknown:
        raise ValueError(f"unknown shapes tasks {unknown} in task weights; expected {TASKS}")
    if any(not np.isfinite(w) or w < 0 for w in weights.values()) or not any(
        w > 0 for w in weights.values()
    ):
        raise ValueError(f"task weights must be finite, >= 0 and not all 0; got {weights}")


def _pick_task(rng: np.random.Generator, weights: dict[str, float] | None) -> str:
    if weights is None:
        return _pick(rng, TASKS)  # the uniform mixture's draw, unchanged
    p = np.array([weights.get(t, 0.0) for t in TASKS])
    return TASKS[int(np.searchsorted(np.cumsum(p / p.sum()), rng.random(), side="right"))]


def sample_example(
    rng: np.random.Generator,
    *,
    task: str | None = None,
    split: str = "train",
    rich: bool | None = None,
    task_weights: dict[str, float] | None = None,
    wordings: str = "grammar",
    with_counterfactual: bool = False,
    counterfactual_kinds=COUNTERFACTUAL_KINDS,
    counterfactual_mixed: bool = False,
    canvas: tuple[float, float] = (1.0, 1.0),
) -> Example:
    """A scene, its spec (with task) and caption. task None: one of the six, uniformly, or
    with probabilities proportional to `task_weights` (task -> weight; missing tasks 0).
    rich (default: split == 'train'): training captions that also name sizes and the
    background now and then (see module docstring). wordings: the caption's wording set
    (`imagen_jax.shapes.wordings`: grammar | train | heldout). with_counterfactual: also
    word `counterfactual(spec, counterfactual_kinds, mixed=counterfactual_mixed)` as the
    caption was worded (`Example.counterfactual`; in the train split, one that names no
    held-out combination). canvas: the scene's (width, height) (`Scene`)."""
    splits.check_split(split)
    if task_weights is not None:
        check_task_weights(task_weights)
    rich = split == "train" if rich is None else rich
    while True:
        chosen = check_task(task) if task is not None else _pick_task(rng, task_weights)
        spec = sample_prompt_spec(rng, chosen, split)
        scene = scene_for(rng, spec, split, canvas)
        if scene is not None:
            spec = _enrich(rng, spec, scene) if rich else spec
            wording = copy.deepcopy(rng) if with_counterfactual else None  # worded alike
            text = wordings_lib.caption(spec, rng, wordings)
            other = None
            if wording is not None:
                other = counterfactual(
                    spec,
                    counterfactual_kinds,
                    training=split == "train",
                    mixed=counterfactual_mixed,
                )
                other = None if other is None else wordings_lib.caption(other, wording, wordings)
            return Example(scene, spec, text, other)


def sample_scene(
    rng: np.random.Generator,
    *,
    task: str | None = None,
    split: str = "train",
    task_weights: dict[str, float] | None = None,
) -> tuple[Scene, str]:
    """A (scene, caption) pair: the training mixture by default (all six tasks, rich
    captions; `task_weights` reweighs the tasks); `task` picks one task, `split='heldout'`
    the held-out combinations."""
    example = sample_example(rng, task=task, split=split, task_weights=task_weights)
    return example.scene, example.caption
