"""The train / heldout split of the shapes domain: combinations no training scene contains.

Held out are two kinds of combination, fixed here once for all experiments:

* Colour-shape pairs (6 of the 36): red star, orange heart, yellow circle, green cross,
  blue triangle, purple square. Each colour and each shape is held out exactly once, so
  training still shows every colour on five shapes and every shape in five colours.
* Spatial configurations (4 of the 60 ordered shape pairs x 2 axes): a circle left of a
  star, a heart left of a square, a triangle above a circle, a cross above a heart. A
  configuration is what the image shows, whatever the wording: "a star to the right of a
  circle" is the same held-out configuration as "a circle to the left of a star". Every
  shape still appears in training on both sides of both axes, and every pair of shapes
  in the other arrangements (a star left of a circle, a circle above a star, ...).

Training scenes never contain a held-out combination: no object has a held-out pair, and
no two objects stand in a held-out configuration by `geometry.relations` with a zero
threshold (looser than the scorer's 0.1, so that nothing the scorer could read as that
configuration is ever trained on). Held-out scenes and prompts always contain at least one.
"""

from __future__ import annotations

from imagen_jax.shapes import geometry
from imagen_jax.shapes.spec import (
    COLORS,
    INVERSE_RELATION,
    SHAPES,
    PromptSpec,
    Scene,
)

SPLITS = ("train", "heldout")
HELDOUT_PAIRS = frozenset(
    {
        ("red", "star"),
        ("orange", "heart"),
        ("yellow", "circle"),
        ("green", "cross"),
        ("blue", "triangle"),
        ("purple", "square"),
    }
)
# (shape A, relation, shape B): A stands `relation` B; only "left of" and "above" are
# listed, their inverses being the same configurations.
HELDOUT_CONFIGURATIONS = frozenset(
    {
        ("circle", "left of", "star"),
        ("heart", "left of", "square"),
        ("triangle", "above", "circle"),
        ("cross", "above", "heart"),
    }
)


def check_split(split: str) -> str:
    if split not in SPLITS:
        raise ValueError(f"unknown split {split!r}; expected one of {SPLITS}")
    return split


def canonical_configuration(shape_a: str, relation: str, shape_b: str) -> tuple[str, str, str]:
    """The same configuration stated with "left of" or "above"."""
    if relation in ("right of", "below"):
        return shape_b, INVERSE_RELATION[relation], shape_a
    return shape_a, relation, shape_b


def is_heldout_configuration(shape_a: str, relation: str, shape_b: str) -> bool:
    return canonical_configuration(shape_a, relation, shape_b) in HELDOUT_CONFIGURATIONS


def scene_heldout(scene: Scene) -> list[str]:
    """The held-out combinations a scene shows, described; [] for a training scene."""
    found = [f"{o.color} {o.shape}" for o in scene.objects if (o.color, o.shape) in HELDOUT_PAIRS]
    for i, a in enumerate(scene.objects):
        for j, b in enumerate(scene.objects):
            if i == j:
                continue
            for rel in ("left of", "above"):
                if (a.shape, rel, b.shape) in HELDOUT_CONFIGURATIONS and rel in (
                    geometry.object_relations(a, b, threshold=0.0)
                ):
                    found.append(f"{a.shape} {rel} {b.shape}")
    return found


def spec_heldout(spec: PromptSpec) -> list[str]:
    """The held-out combinations a prompt states, described; [] for a training prompt."""
    found = [f"{g.color} {g.shape}" for g in spec.objects if (g.color, g.shape) in HELDOUT_PAIRS]
    if spec.relation is not None:
        a, b = spec.objects
        if is_heldout_configuration(a.shape, spec.relation, b.shape):
            found.append(" ".join(canonical_configuration(a.shape, spec.relation, b.shape)))
    return found


def training_pairs() -> list[tuple[str, str]]:
    """The 30 colour-shape pairs training scenes may show, in a fixed order."""
    return [(c, s) for c in COLORS for s in SHAPES if (c, s) not in HELDOUT_PAIRS]
