"""The shapes domain as a data source: record i is a scene drawn from a generator seeded by
(seed, i), rendered at the stage's resolution, with its caption (and, on request, the
caption of what the scene is not: `imagen_jax.shapes.tasks.counterfactual`). With
`canvases`, record i's image is one of several sizes (a wide or tall scene, not a crop of
a square one): the aspect-ratio buckets of a training run (`data.buckets`)."""

from __future__ import annotations

import numpy as np

from imagen_jax.shapes import SPLITS, TASKS
from imagen_jax.shapes.render import cell_labels, render
from imagen_jax.shapes.spec import canvas_of, check_canvas
from imagen_jax.shapes.tasks import check_counterfactual_kinds, check_task_weights, sample_example


class ShapesSource:
    """A random-access source of `size` procedural scenes.

    split: train | heldout (the held-out colour-shape pairs and layouts of
      `imagen_jax.shapes.splits`; training never sees them).
    task: one of the six tasks, or None for the training mixture.
    task_weights: the mixture's task -> weight (`imagen_jax.shapes.tasks.parse_task_weights`
      reads "position:3,color_attr:2"); None = the six tasks equally.
    resolution: the render resolution. Render at the stage's resolution: the pipeline's
      resize is then the identity, and a super-resolution stage's low-res input is made from
      this render like any other image.
    wordings: the captions' wording set ("grammar" | "train"; `imagen_jax.shapes.wordings`:
      "heldout" is refused, no training caption may use a held-out template).
    counterfactuals: records also hold "counterfactual": the caption with the relation
      inverted or the two colours exchanged, worded alike ("" where there is none). The
      scenes and captions are the same either way.
    counterfactual_kinds: which of those ("relation", "colors", "shape"; None: the first
      two, `tasks.counterfactual`). In the train split none names a held-out combination.
    counterfactual_mixed: each scene's kind picked among those that apply (from its spec),
      rather than the first that applies (`tasks.counterfactual(mixed=True)`).
    cell_labels: > 0: records also hold "cell_labels", int32 [n, n] with n = cell_labels:
      the shape each cell of an n x n grid shows (`render.cell_labels`; 0 = background).
    canvases: image sizes ((height, width), ...): record i is drawn on one of them, picked
      uniformly (the picks of all records drawn at once from a generator seeded by
      (seed, 1): `image_shape` reads them without drawing a scene), its scene on the
      matching canvas (`Scene`: objects keep their shapes and relations their angles);
      () = square images of `resolution`.
    """

    def __init__(
        self,
        *,
        size: int = 1_000_000,
        resolution: int = 64,
        split: str = "train",
        task: str | None = None,
        seed: int = 0,
        task_weights: dict[str, float] | None = None,
        wordings: str = "grammar",
        counterfactuals: bool = False,
        counterfactual_kinds=None,
        counterfactual_mixed: bool = False,
        cell_labels: int = 0,
        canvases=(),
    ):
        if split not in SPLITS:
            raise ValueError(f"unknown shapes split {split!r}; expected one of {SPLITS}")
        if task is not None and task not in TASKS:
            raise ValueError(f"unknown shapes task {task!r}; expected one of {TASKS}")
        if task_weights is not None:
            check_task_weights(task_weights)
        if wordings not in ("grammar", "train"):
            raise ValueError(
                f"shapes wordings={wordings!r}; training captions use 'grammar' or 'train' "
                "(the held-out templates are for evaluation only)"
            )
        if size < 1:
            raise ValueError(f"size must be >= 1, got {size}")
        self.size, self.resolution, self.split, self.task, self.seed = (
            size,
            resolution,
            split,
            task,
            seed,
        )
        self.task_weights = None if task_weights is None else dict(task_weights)
        self.wordings = wordings
        self.counterfactuals = bool(counterfactuals)
        self.counterfactual_kinds = check_counterfactual_kinds(counterfactual_kinds)
        self.counterfactual_mixed = bool(counterfactual_mixed)
        if cell_labels and resolution % cell_labels:
            raise ValueError(f"cell_labels={cell_labels} must divide the resolution {resolution}")
        self.cell_labels = int(cell_labels)
        self.canvases = tuple((int(h), int(w)) for h, w in canvases)
        for h, w in self.canvases:
            try:
                check_canvas(*canvas_of(h, w))
            except ValueError as e:
                raise ValueError(f"shapes canvas {h}x{w}: {e}") from None
        if len(self.canvases) > 255:
            raise ValueError(f"at most 255 shapes canvases, got {len(self.canvases)}")
        self._picks = None  # record -> canvas index (`image_shape`)
        if self.canvases and self.cell_labels:
            raise ValueError("shapes cell_labels are for square images; canvases are set")

    def __len__(self) -> int:
        return self.size

    def __getitem__(self, index: int) -> dict:
        example = self.example(index)
        shape = self.image_shape(index)
        record = {
            "image": render(example.scene, min(shape)),
            "caption": example.caption,
            "key": f"shapes-{self.split}-{self.seed}-{index}",
        }
        if self.counterfactuals:
            record["counterfactual"] = example.counterfactual or ""
        if self.cell_labels:
            record["cell_labels"] = cell_labels(example.scene, self.cell_labels, self.resolution)
        return record

    def example(self, index: int):
        """Record `index`'s `tasks.Example` (scene, spec and caption), not rendered."""
        if not 0 <= index < self.size:
            raise IndexError(f"index {index} out of range for {self.size} records")
        rng = np.random.default_rng([self.seed, int(index)])
        shape = self.image_shape(index)
        return sample_example(
            rng,
            task=self.task,
            split=self.split,
            task_weights=self.task_weights,
            wordings=self.wordings,
            with_counterfactual=self.counterfactuals,
            counterfactual_kinds=self.counterfactual_kinds,
            counterfactual_mixed=self.counterfactual_mixed,
            canvas=canvas_of(*shape),
        )

    def _canvas_picks(self) -> np.ndarray:
        """uint8 [size]: every record's index into `canvases`, drawn at once on first use."""
        if self._picks is None:
            rng = np.random.default_rng([self.seed, 1])
            self._picks = rng.integers(len(self.canvases), size=self.size, dtype=np.uint8)
        return self._picks

    def image_shape(self, index: int) -> tuple[int, int]:
        """Record `index`'s image (height, width), without drawing its scene."""
        if not self.canvases:
            return self.resolution, self.resolution
        return self.canvases[int(self._canvas_picks()[index])]

    def image_shapes(self) -> list[tuple[int, int]]:
        """Every record's `image_shape`, at once (what a bucket plan reads)."""
        if not self.canvases:
            return [(self.resolution, self.resolution)] * self.size
        return [self.canvases[int(k)] for k in self._canvas_picks()]

    def __repr__(self) -> str:
        return (
            f"ShapesSource(size={self.size}, resolution={self.resolution}, "
            f"split={self.split!r}, task={self.task!r}, seed={self.seed}, "
            f"task_weights={self.task_weights}, wordings={self.wordings!r}, "
            f"counterfactuals={self.counterfactuals}, "
            f"counterfactual_kinds={self.counterfactual_kinds}, "
            f"counterfactual_mixed={self.counterfactual_mixed}, "
            f"cell_labels={self.cell_labels}, canvases={self.canvases})"
        )
