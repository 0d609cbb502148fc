"""Inpainting tasks of the shapes domain: a rendered two-object scene, a mask over one of
its objects, and a prompt naming that object changed (another colour, or another shape)
with the other object as it is.

    task = inpainting_task(np.random.default_rng(0), kind="color", split="train", resolution=64)
    task.image     # uint8 [H, W, 3]: the scene as rendered
    task.mask      # float32 [H, W]: 1 where the image is regenerated, 0 where it is kept
    task.prompt    # the edited scene's caption in the grammar's wording
    task.spec      # what the edited image must show (scored as the color_attr task)
    task.target    # the edited scene, rendered: one right answer, equal to image outside mask

The scenes are the `color_attr` task's (two objects of different shapes and colours). The
edited object keeps its place, size and rotation; its new colour (kind "color") or shape
(kind "shape") differs from both objects', and the new colour-shape pair is a training pair
(split "train") or one of the held-out pairs (split "heldout": a combination the model never
saw, drawn into a scene it did). The mask is the bounding box of the object's old and new
footprints, grown by `MARGIN_PX`, less the other object's footprint grown by one pixel: the
other object is never regenerated, and the target differs from the image only inside the
mask (tested).
"""

from __future__ import annotations

import dataclasses

import numpy as np

from imagen_jax.shapes import grammar, splits
from imagen_jax.shapes.render import render
from imagen_jax.shapes.spec import COLORS, SHAPES, ObjectSpec, PromptSpec, Scene
from imagen_jax.shapes.tasks import sample_example

KINDS = ("color", "shape")
EDIT_SPLITS = ("train", "heldout")
MARGIN_PX = 2  # at 64 px; scaled with the resolution


@dataclasses.dataclass(frozen=True)
class InpaintingTask:
    image: np.ndarray  # uint8 [H, W, 3]
    mask: np.ndarray  # float32 [H, W], 1 = regenerate
    prompt: str
    spec: PromptSpec  # the edited scene's constraints, task "color_attr"
    scene: Scene  # the original
    target: Scene  # the edited scene
    kind: str  # color | shape
    split: str  # the new colour-shape pair's: train | heldout
    edited: int  # the index of the edited object in scene.objects

    @property
    def keep(self) -> np.ndarray:
        """bool [H, W]: the pixels that must stay as they are."""
        return self.mask < 0.5


def footprint(scene: Scene, index: int, resolution: int) -> np.ndarray:
    """bool [H, W]: where object `index` changes the background (antialiased edge included)."""
    alone = render(dataclasses.replace(scene, objects=(scene.objects[index],)), resolution)
    empty = render(dataclasses.replace(scene, objects=()), resolution)
    return np.any(alone != empty, axis=-1)


def _grow(mask: np.ndarray, px: int) -> np.ndarray:
    """mask dilated by a (2 px + 1)^2 square."""
    out = mask.copy()
    h, w = mask.shape
    padded = np.pad(mask, px)
    for dy in range(-px, px + 1):
        for dx in range(-px, px + 1):
            out |= padded[px + dy : px + dy + h, px + dx : px + dx + w]
    return out


def _new_value(rng, kind: str, split: str, obj, other) -> str | None:
    """A colour (or shape) for `obj` unlike both objects', whose pair with the object's
    shape (colour) is of `split`; None if there is none."""
    heldout = splits.HELDOUT_PAIRS
    if kind == "color":
        options = [
            c
            for c in COLORS
            if c not in (obj.color, other.color)
            and ((c, obj.shape) in heldout) == (split == "heldout")
        ]
    else:
        options = [
            s
            for s in SHAPES
            if s not in (obj.shape, other.shape)
            and ((obj.color, s) in heldout) == (split == "heldout")
        ]
    return options[int(rng.integers(len(options)))] if options else None


def inpainting_task(
    rng: np.random.Generator, *, kind: str, split: str = "train", resolution: int = 64
) -> InpaintingTask:
    """One task drawn from `rng` (see the module docstring). The original scene is always
    of the training split: only the edit may name a held-out pair."""
    if kind not in KINDS:
        raise ValueError(f"inpainting kind {kind!r}; expected one of {KINDS}")
    if split not in EDIT_SPLITS:
        raise ValueError(f"inpainting split {split!r}; expected one of {EDIT_SPLITS}")
    while True:
        example = sample_example(rng, task="color_attr", split="train", rich=False)
        scene = example.scene
        edited = int(rng.integers(2))
        obj, other = scene.objects[edited], scene.objects[1 - edited]
        value = _new_value(rng, kind, split, obj, other)
        if value is None:
            continue
        new = dataclasses.replace(obj, **{kind: value})
        objects = list(scene.objects)
        objects[edited] = new
        target = dataclasses.replace(scene, objects=tuple(objects))
        old_px = footprint(scene, edited, resolution)
        new_px = footprint(target, edited, resolution)
        margin = max(1, round(MARGIN_PX * resolution / 64))
        ys, xs = np.nonzero(old_px | new_px)
        box = np.zeros_like(old_px)
        box[
            max(0, ys.min() - margin) : ys.max() + margin + 1,
            max(0, xs.min() - margin) : xs.max() + margin + 1,
        ] = True
        box &= ~_grow(footprint(scene, 1 - edited, resolution), 1)
        spec = PromptSpec(
            tuple(ObjectSpec(o.shape, o.color) for o in target.objects), task="color_attr"
        )
        return InpaintingTask(
            image=render(scene, resolution),
            mask=box.astype(np.float32),
            prompt=grammar.caption(spec, rng),
            spec=spec,
            scene=scene,
            target=target,
            kind=kind,
            split=split,
            edited=edited,
        )
