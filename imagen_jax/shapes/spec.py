"""Scene specs and prompt specs of the shapes domain: what is drawn, and what a prompt states.

A `Scene` is everything the renderer needs: objects (shape, color, size, centre, rotation)
on a plain background. A `PromptSpec` is the set of constraints a prompt states (object
groups with shape and maybe color, size and count; maybe a relation between the two groups;
maybe the background) plus the GenEval task it belongs to; the grammar turns one into text
and parses text back into one, and the scorer checks an image against one.

Units: positions and sizes are fractions of the canvas side, so one scene renders at any
resolution. `x` grows to the right and `y` grows downwards (image convention). `size` is
the square root of the object's area (a size-0.2 object covers 4% of the canvas, whatever
its shape); `rotation` is in degrees, counter-clockwise as seen.

The palette: six object colors and three backgrounds, at least 105 apart in RGB from each
other (the closest pairs are red/orange 106, orange/yellow 111, purple/gray 114), so that
noise, blur and JPEG artefacts do not move a pixel to another name.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping, Sequence
from typing import Any

SHAPES = ("circle", "square", "triangle", "star", "heart", "cross")
PLURALS = {
    "circle": "circles",
    "square": "squares",
    "triangle": "triangles",
    "star": "stars",
    "heart": "hearts",
    "cross": "crosses",
}
COLORS = {  # name: sRGB
    "red": (220, 30, 30),
    "orange": (255, 125, 0),
    "yellow": (245, 230, 35),
    "green": (30, 165, 60),
    "blue": (30, 80, 230),
    "purple": (140, 40, 200),
}
BACKGROUNDS = {
    "black": (0, 0, 0),
    "white": (255, 255, 255),
    "gray": (128, 128, 128),
}
SIZES = ("small", "large")
# Object sizes (sqrt of area / canvas side) drawn for each named size, and the boundary
# between the names that the scorer applies to what it measures.
SIZE_RANGES = {"small": (0.18, 0.22), "large": (0.26, 0.3)}
SIZE_BOUNDARY = 0.24
RELATIONS = ("left of", "right of", "above", "below")
INVERSE_RELATION = {
    "left of": "right of",
    "right of": "left of",
    "above": "below",
    "below": "above",
}
TASKS = ("single_object", "two_object", "counting", "colors", "position", "color_attr")
MAX_CANVAS_RATIO = 2.0  # the longest scene canvas: twice as wide (or tall) as the other side
MAX_COUNT = 6  # counts a prompt may state; scenes the samplers draw hold at most 4 objects


def _check_name(kind: str, name: Any, allowed: Sequence[str] | Mapping[str, Any]) -> str:
    if name not in allowed:
        raise ValueError(f"unknown {kind} {name!r}; expected one of {tuple(allowed)}")
    return name


def check_shape(name: Any) -> str:
    return _check_name("shape", name, SHAPES)


def check_color(name: Any) -> str:
    return _check_name("color", name, COLORS)


def check_background(name: Any) -> str:
    return _check_name("background", name, BACKGROUNDS)


def check_task(name: Any) -> str:
    return _check_name("task", name, TASKS)


def size_name(size: float) -> str:
    """The named size ('small' | 'large') of a size in canvas units."""
    return "small" if size < SIZE_BOUNDARY else "large"


def _check_keys(cls, data: Any, what: str) -> Mapping[str, Any]:
    if not isinstance(data, Mapping):
        raise ValueError(f"{what} must be a JSON object, got {data!r}")
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - names)
    if unknown:
        raise ValueError(f"{what} has unknown keys {unknown}; expected some of {sorted(names)}")
    return data


def check_canvas(width: Any, height: Any) -> tuple[float, float]:
    """A scene canvas (width, height) in units of its shorter side: finite numbers, the
    shorter exactly 1, the longer at most `MAX_CANVAS_RATIO`."""
    for name, value in (("width", width), ("height", height)):
        if isinstance(value, bool) or not isinstance(value, int | float) or not value >= 1:
            raise ValueError(f"scene {name} must be a number >= 1 (canvas units), got {value!r}")
    if min(width, height) != 1 or max(width, height) > MAX_CANVAS_RATIO:
        raise ValueError(
            f"scene canvas {width} x {height}: the shorter side must be 1 and the longer at "
            f"most {MAX_CANVAS_RATIO}"
        )
    return float(width), float(height)


def canvas_of(height: int, width: int) -> tuple[float, float]:
    """The scene canvas (width, height) of an image of height x width pixels."""
    side = min(height, width)
    return width / side, height / side


def _as_list(value: Any) -> Sequence[Any]:
    if isinstance(value, str | bytes | Mapping) or not isinstance(value, Sequence):
        raise ValueError(f"'objects' must be a list, got {value!r}")
    return value


def _construct(cls, data: Mapping[str, Any], what: str):
    try:
        return cls(**data)
    except TypeError as e:  # a missing key
        raise ValueError(f"{what} {dict(data)}: {e}") from None


def _from_dict(cls, data: Any, what: str):
    return _construct(cls, _check_keys(cls, data, what), what)


@dataclasses.dataclass(frozen=True)
class SceneObject:
    """One drawn object. `x`, `y`: centroid; `size`: sqrt(area); canvas units, y down."""

    shape: str
    color: str
    size: float
    x: float
    y: float
    rotation: float = 0.0

    def __post_init__(self):
        check_shape(self.shape)
        check_color(self.color)
        for name in ("size", "x", "y", "rotation"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int | float):
                raise ValueError(f"object {name} must be a number, got {value!r}")
            if not math.isfinite(value):
                raise ValueError(f"object {name} must be finite, got {value!r}")
        if not 0.0 < self.size <= 1.0:
            raise ValueError(f"object size must be in (0, 1], got {self.size}")

    @property
    def size_name(self) -> str:
        return size_name(self.size)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> SceneObject:
        return _from_dict(cls, data, "scene object")


@dataclasses.dataclass(frozen=True)
class Scene:
    """What the renderer draws: objects, in drawing order, on a plain background.

    The canvas is `width` x `height` canvas units, the shorter side 1 (1 x 1, the square,
    by default; 1.25 x 1 is a wide one): object positions and sizes are in units of the
    shorter side, so a shape keeps its proportions and a relation its angle on any canvas
    (`render`, the scorer)."""

    objects: tuple[SceneObject, ...]
    background: str = "black"
    width: float = 1.0
    height: float = 1.0

    def __post_init__(self):
        object.__setattr__(self, "objects", tuple(self.objects))
        for obj in self.objects:
            if not isinstance(obj, SceneObject):
                raise ValueError(f"scene objects must be SceneObject, got {obj!r}")
        check_background(self.background)
        check_canvas(self.width, self.height)

    @property
    def canvas(self) -> tuple[float, float]:
        """(width, height) in canvas units."""
        return self.width, self.height

    def to_dict(self) -> dict[str, Any]:
        out = {"objects": [o.to_dict() for o in self.objects], "background": self.background}
        if self.canvas != (1.0, 1.0):
            out.update(width=self.width, height=self.height)
        return out

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> Scene:
        data = dict(_check_keys(cls, data, "scene"))
        data["objects"] = tuple(SceneObject.from_dict(o) for o in _as_list(data.get("objects")))
        return _construct(cls, data, "scene")


@dataclasses.dataclass(frozen=True)
class ObjectSpec:
    """A group of objects a prompt names: `count` objects of `shape`, maybe of a color/size."""

    shape: str
    color: str | None = None
    count: int = 1
    size: str | None = None  # small | large

    def __post_init__(self):
        check_shape(self.shape)
        if self.color is not None:
            check_color(self.color)
        if self.size is not None:
            _check_name("size", self.size, SIZES)
        if isinstance(self.count, bool) or not isinstance(self.count, int):
            raise ValueError(f"count must be an integer, got {self.count!r}")
        if not 1 <= self.count <= MAX_COUNT:
            raise ValueError(f"count must be in 1..{MAX_COUNT}, got {self.count}")

    def to_dict(self) -> dict[str, Any]:
        return {k: v for k, v in dataclasses.asdict(self).items() if v is not None}

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> ObjectSpec:
        return _from_dict(cls, data, "object spec")


@dataclasses.dataclass(frozen=True)
class PromptSpec:
    """The constraints a prompt states, and the GenEval task it is scored as (None: all).

    `relation` relates the first group to the second ("a circle left of a square":
    objects[0] is left of objects[1]); it needs exactly two single-object groups.
    """

    objects: tuple[ObjectSpec, ...]
    relation: str | None = None
    background: str | None = None
    task: str | None = None

    def __post_init__(self):
        object.__setattr__(self, "objects", tuple(self.objects))
        if not self.objects:
            raise ValueError("a prompt spec needs at least one object group")
        for group in self.objects:
            if not isinstance(group, ObjectSpec):
                raise ValueError(f"prompt spec objects must be ObjectSpec, got {group!r}")
        if self.relation is not None:
            _check_name("relation", self.relation, RELATIONS)
            if len(self.objects) != 2 or any(g.count != 1 for g in self.objects):
                raise ValueError("a relation needs exactly two single objects")
        if self.background is not None:
            check_background(self.background)
        if self.task is not None:
            check_task(self.task)

    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {"objects": [g.to_dict() for g in self.objects]}
        for name in ("relation", "background", "task"):
            if getattr(self, name) is not None:
                out[name] = getattr(self, name)
        return out

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> PromptSpec:
        data = dict(_check_keys(cls, data, "prompt spec"))
        data["objects"] = tuple(ObjectSpec.from_dict(g) for g in _as_list(data.get("objects")))
        return _construct(cls, data, "prompt spec")

    def constraints(self) -> PromptSpec:
        """The same constraints without the task (what a prompt's text alone states)."""
        return dataclasses.replace(self, task=None)

    def canonical(self) -> PromptSpec:
        """The same constraints with a relation stated as "left of" or "above": "a star
        right of a circle" and "a circle left of a star" state one thing, and have one
        canonical spec (the objects in the order the relation then reads)."""
        if self.relation not in ("right of", "below"):
            return self
        a, b = self.objects
        return dataclasses.replace(self, objects=(b, a), relation=INVERSE_RELATION[self.relation])
