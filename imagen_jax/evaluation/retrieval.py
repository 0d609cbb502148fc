"""Evaluators of image-text embedding models: zero-shot classification, image<->text
retrieval, and the shapes domain's compositional hard-negative test.

    evaluators = make_embedding_evaluators(config.evals, resolution=64)
    metrics = run_embedding_evaluators(evaluators, embedder)
    # {"zero_shot/heldout/color": 0.97, "retrieval/heldout/i2t_r1": 0.41, ...}

The protocol is `evaluators.py`'s with an embedding model in place of generated images: an
evaluator has a `name`, `__call__(embedder) -> dict[str, float]` (names start with its
name) and `describe()`. An embedder is any object with `embed_images(images)` (uint8
[H, W, 3] each) and `embed_texts(texts)` (strings), each returning L2-normalised float32
[N, P] (`pipelines.embedding.Embedder`); the trainer runs them every `evals.every` steps on
its EMA weights (`training.contrastive_trainer`) and `eval/retrieval.py` on an exported
model directory.

Evaluators (`evals.metrics` names); each draws its scenes once, from `evals.seed`, for
every split of `evals.splits` (train | heldout: the held-out colour-shape pairs and layouts),
captions worded by `evals.wordings`:
* `zero_shot`: single-object scenes classified by colour and by shape against the class
  names in prompt templates (CLIP's recipe, Radford et al. 2021, sec. 3.1.4: each class's
  text embedding the normalised mean over its templates): `zero_shot/<split>/{color,shape}`,
  and `zero_shot/<split>/shape_given_color` (each image's classes name its true colour)
  (chance 1/6).
* `retrieval`: `evals.size` scenes of the six tasks with their captions; image->text and
  text->image recall at 1, 5 and 10 (`retrieval/<split>/{i2t,t2i}_r{1,5,10}`). Items whose
  captions are the same string are not each other's competitors, and a tie counts against
  the true match.
* `hard_negatives`: for each scene, its true caption against a caption that differs in one
  binding (`hard_negative_specs`): the two objects' colours exchanged ("colors"), the
  relation inverted ("relation"), one count off ("count") — worded alike, so only the
  binding tells them apart. Accuracy (the true caption scores higher; chance 0.5) per kind,
  `hard_negatives/<split>/<kind>`, and their mean, `.../overall`.
"""

from __future__ import annotations

import copy
import dataclasses
from collections.abc import Callable, Sequence
from typing import Any, Protocol

import ml_collections
import numpy as np

from imagen_jax.shapes import SPLITS, TASKS, tasks
from imagen_jax.shapes import wordings as wordings_lib
from imagen_jax.shapes.render import render
from imagen_jax.shapes.spec import COLORS, INVERSE_RELATION, SHAPES, PromptSpec

RECALL_AT = (1, 5, 10)
COLOR_TEMPLATES = ("a photo of a {} shape", "a {} shape", "a drawing of a {} object")
SHAPE_TEMPLATES = ("a photo of a {}", "a {}", "a drawing of a {}")
NEGATIVE_KINDS = ("colors", "relation", "count")
# The tasks whose scenes have a negative of each kind.
_NEGATIVE_TASKS = ("color_attr", "position", "counting")


class Embedder(Protocol):
    def embed_images(self, images: Sequence[np.ndarray]) -> np.ndarray: ...

    def embed_texts(self, texts: Sequence[str]) -> np.ndarray: ...


# ----------------------------------------------------------------------------------------------
# The measures
# ----------------------------------------------------------------------------------------------


def zero_shot_accuracy(
    embedder: Embedder, image_embeds: np.ndarray, labels: Sequence[int], classnames, templates
) -> float:
    """Accuracy of argmax_c <image, class_c>, class_c the normalised mean of the class name's
    template embeddings."""
    prompts = [t.format(c) for c in classnames for t in templates]
    texts = np.asarray(embedder.embed_texts(prompts), np.float64)
    classes = texts.reshape(len(classnames), len(templates), -1).mean(1)
    classes /= np.maximum(np.linalg.norm(classes, axis=-1, keepdims=True), 1e-12)
    predicted = np.argmax(np.asarray(image_embeds, np.float64) @ classes.T, axis=-1)
    return float(np.mean(predicted == np.asarray(labels)))


def recalls(image_embeds, text_embeds, captions: Sequence[str], ks=RECALL_AT) -> dict:
    """{"i2t_r<k>", "t2i_r<k>"} of N matching pairs (row i of each). The rank of a true
    match counts the other items scoring at least as high (ties count against it), other
    than those with the same caption."""
    sims = np.asarray(image_embeds, np.float64) @ np.asarray(text_embeds, np.float64).T
    captions = np.asarray(captions, dtype=object)
    rivals = captions[:, None] != captions[None, :]  # [N, N]: not the same caption
    true = np.diagonal(sims)
    rank_i2t = ((sims >= true[:, None]) & rivals).sum(1)  # image i: texts above its own
    rank_t2i = ((sims >= true[None, :]) & rivals).sum(0)  # text j: images above its own
    out = {}
    for k in ks:
        out[f"i2t_r{k}"] = float(np.mean(rank_i2t < k))
        out[f"t2i_r{k}"] = float(np.mean(rank_t2i < k))
    return out


def pair_accuracy(image_embeds, true_embeds, negative_embeds) -> np.ndarray:
    """bool [N]: each image scores its true caption above its negative."""
    image = np.asarray(image_embeds, np.float64)
    true = np.sum(image * np.asarray(true_embeds, np.float64), -1)
    return true > np.sum(image * np.asarray(negative_embeds, np.float64), -1)


# ----------------------------------------------------------------------------------------------
# Shapes scenes
# ----------------------------------------------------------------------------------------------


def hard_negative_specs(spec: PromptSpec, index: int = 0) -> dict[str, PromptSpec]:
    """The spec's hard negatives by kind: "colors" (two groups of different colours: the
    colours exchanged), "relation" (inverted), "count" (a group of 2 to 4: one more or one
    less, staying in 2..4; 3 goes down or up by `index`'s parity)."""
    out = {}
    groups = spec.objects
    if len(groups) == 2 and None not in (groups[0].color, groups[1].color):
        a, b = groups
        if a.color != b.color:
            out["colors"] = dataclasses.replace(
                spec,
                objects=(
                    dataclasses.replace(a, color=b.color),
                    dataclasses.replace(b, color=a.color),
                ),
            )
    if spec.relation is not None:
        out["relation"] = dataclasses.replace(spec, relation=INVERSE_RELATION[spec.relation])
    if len(groups) == 1 and 2 <= groups[0].count <= 4:
        count = groups[0].count
        other = {2: 3, 4: 3}.get(count, 2 if index % 2 else 4)
        out["count"] = dataclasses.replace(
            spec, objects=(dataclasses.replace(groups[0], count=other),)
        )
    return out


@dataclasses.dataclass(frozen=True)
class ShapesItem:
    """A rendered scene, its spec and a caption; `negatives`: kind -> caption, worded alike."""

    image: np.ndarray
    spec: PromptSpec
    caption: str
    negatives: dict[str, str]


def shapes_items(
    split: str,
    count: int,
    *,
    resolution: int,
    seed: int = 0,
    task: str | None = None,
    wordings: str = "grammar",
) -> list[ShapesItem]:
    """`count` scenes of `split` (of `task`, else the six tasks in turn), rendered, with
    plain captions (no sizes or backgrounds) and their hard negatives' captions."""
    items = []
    for i in range(count):
        rng = np.random.default_rng([seed, SPLITS.index(split), i])
        chosen = task or TASKS[i % len(TASKS)]
        example = tasks.sample_example(rng, task=chosen, split=split, rich=False)
        wording = np.random.default_rng([seed, 7, i])  # one wording for a caption and its foils

        def caption(spec, wording=wording):
            return wordings_lib.caption(spec, copy.deepcopy(wording), wordings)

        negatives = {k: caption(s) for k, s in hard_negative_specs(example.spec, i).items()}
        image = render(example.scene, resolution)
        items.append(ShapesItem(image, example.spec, caption(example.spec), negatives))
    return items


# ----------------------------------------------------------------------------------------------
# Evaluators
# ----------------------------------------------------------------------------------------------


class ZeroShot:
    """Colour and shape of single-object scenes, zero-shot: `zero_shot/<split>/<attribute>`."""

    name = "zero_shot"

    def __init__(self, sets: dict[str, tuple[list[np.ndarray], dict[str, list[int]]]]):
        """sets: split -> (images, {"color": class indices into COLORS, "shape": into SHAPES})."""
        self.sets = sets
        self.classes = {
            "color": (tuple(COLORS), COLOR_TEMPLATES),
            "shape": (SHAPES, SHAPE_TEMPLATES),
        }

    @classmethod
    def shapes(cls, splits, size: int, *, resolution: int, seed: int = 0) -> ZeroShot:
        sets = {}
        for split in splits:
            items = shapes_items(split, size, resolution=resolution, seed=seed, task="colors")
            groups = [it.spec.objects[0] for it in items]
            labels = {
                "color": [tuple(COLORS).index(g.color) for g in groups],
                "shape": [SHAPES.index(g.shape) for g in groups],
            }
            sets[split] = ([it.image for it in items], labels)
        return cls(sets)

    def __call__(self, embedder: Embedder) -> dict[str, float]:
        metrics = {}
        for split, (images, labels) in self.sets.items():
            image_embeds = embedder.embed_images(images)
            for attribute, (names, templates) in self.classes.items():
                metrics[f"{self.name}/{split}/{attribute}"] = zero_shot_accuracy(
                    embedder, image_embeds, labels[attribute], names, templates
                )
            metrics[f"{self.name}/{split}/shape_given_color"] = self._shape_given_color(
                embedder, np.asarray(image_embeds), labels
            )
        return metrics

    @staticmethod
    def _shape_given_color(embedder: Embedder, image_embeds, labels) -> float:
        """Shape zero-shot with the object's true colour in every class name ("a red star"
        against "a red circle", ...): whether the model tells shapes apart once colour is
        not the question (on held-out scenes, colour-shape pairs it never saw named)."""
        colors, right = tuple(COLORS), 0.0
        for c in sorted(set(labels["color"])):
            rows = [i for i, label in enumerate(labels["color"]) if label == c]
            names = [f"{colors[c]} {shape}" for shape in SHAPES]
            shapes = [labels["shape"][i] for i in rows]
            accuracy = zero_shot_accuracy(
                embedder, image_embeds[rows], shapes, names, SHAPE_TEMPLATES
            )
            right += accuracy * len(rows)
        return right / len(labels["color"])

    def describe(self) -> dict[str, Any]:
        templates = {k: list(t) for k, (_, t) in self.classes.items()}
        sizes = {s: len(v[0]) for s, v in self.sets.items()}
        return {"name": self.name, "templates": templates, "images": sizes}


class Retrieval:
    """Image->text and text->image recall@{1,5,10} of (image, caption) pairs per split."""

    name = "retrieval"

    def __init__(self, sets: dict[str, tuple[list[np.ndarray], list[str]]]):
        self.sets = sets

    @classmethod
    def shapes(cls, splits, size: int, *, resolution: int, seed=0, wordings="grammar"):
        sets = {}
        for split in splits:
            items = shapes_items(split, size, resolution=resolution, seed=seed, wordings=wordings)
            sets[split] = ([it.image for it in items], [it.caption for it in items])
        return cls(sets)

    def __call__(self, embedder: Embedder) -> dict[str, float]:
        metrics = {}
        for split, (images, captions) in self.sets.items():
            found = recalls(embedder.embed_images(images), embedder.embed_texts(captions), captions)
            metrics.update({f"{self.name}/{split}/{k}": v for k, v in found.items()})
        return metrics

    def describe(self) -> dict[str, Any]:
        return {"name": self.name, "pairs": {s: len(v[0]) for s, v in self.sets.items()}}


class HardNegatives:
    """The true caption against one hard negative a kind: `hard_negatives/<split>/<kind>`
    (accuracy; chance 0.5) and `.../overall` (the mean over kinds)."""

    name = "hard_negatives"

    def __init__(self, sets: dict[str, list[ShapesItem]]):
        self.sets = sets

    @classmethod
    def shapes(cls, splits, size: int, *, resolution: int, seed=0, wordings="grammar"):
        """`size` scenes a task of color_attr, position and counting, per split."""
        sets = {}
        for split in splits:
            sets[split] = [
                item
                for task in _NEGATIVE_TASKS
                for item in shapes_items(
                    split, size, resolution=resolution, seed=seed, task=task, wordings=wordings
                )
            ]
        return cls(sets)

    def __call__(self, embedder: Embedder) -> dict[str, float]:
        metrics = {}
        for split, items in self.sets.items():
            image_embeds = embedder.embed_images([it.image for it in items])
            true_embeds = embedder.embed_texts([it.caption for it in items])
            accuracies = []
            for kind in NEGATIVE_KINDS:
                rows = [i for i, it in enumerate(items) if kind in it.negatives]
                if not rows:
                    continue
                foils = embedder.embed_texts([items[i].negatives[kind] for i in rows])
                right = pair_accuracy(image_embeds[rows], true_embeds[rows], foils)
                metrics[f"{self.name}/{split}/{kind}"] = float(right.mean())
                accuracies.append(float(right.mean()))
            metrics[f"{self.name}/{split}/overall"] = float(np.mean(accuracies))
        return metrics

    def describe(self) -> dict[str, Any]:
        counts = {
            split: {k: sum(k in it.negatives for it in items) for k in NEGATIVE_KINDS}
            for split, items in self.sets.items()
        }
        return {"name": self.name, "kinds": list(NEGATIVE_KINDS), "pairs": counts}


def _make_zero_shot(evals, resolution):
    return ZeroShot.shapes(evals.splits, evals.size, resolution=resolution, seed=evals.seed)


def _make_retrieval(evals, resolution):
    return Retrieval.shapes(
        evals.splits, evals.size, resolution=resolution, seed=evals.seed, wordings=evals.wordings
    )


def _make_hard_negatives(evals, resolution):
    return HardNegatives.shapes(
        evals.splits, evals.size, resolution=resolution, seed=evals.seed, wordings=evals.wordings
    )


EMBEDDING_EVALUATORS: dict[str, Callable[[ml_collections.ConfigDict, int], Any]] = {
    "zero_shot": _make_zero_shot,
    "retrieval": _make_retrieval,
    "hard_negatives": _make_hard_negatives,
}


def make_embedding_evaluators(evals: ml_collections.ConfigDict, *, resolution: int) -> list:
    """The evaluators `evals.metrics` names, their scenes drawn and rendered once."""
    names = list(evals.metrics)
    unknown = [n for n in names if n not in EMBEDDING_EVALUATORS]
    if unknown or not names:
        raise ValueError(f"evals.metrics={names}: expected some of {sorted(EMBEDDING_EVALUATORS)}")
    for split in evals.splits:
        if split not in SPLITS:
            raise ValueError(f"evals.splits holds {split!r}; expected some of {SPLITS}")
    return [EMBEDDING_EVALUATORS[name](evals, resolution) for name in names]


def run_embedding_evaluators(evaluators, embedder: Embedder) -> dict[str, float]:
    metrics: dict[str, float] = {}
    for evaluator in evaluators:
        metrics.update({k: float(v) for k, v in evaluator(embedder).items()})
    return metrics
