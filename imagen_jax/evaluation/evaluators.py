"""The evaluator protocol: generated images and their prompts in, named scalar metrics out.

    evaluators = make_evaluators(config.evals)
    metrics = {}
    for evaluator in evaluators:
        metrics.update(evaluator(samples))  # {"compositional/heldout/overall": 0.61, ...}

An evaluator is any object with a `name` and `__call__(samples: Samples) -> dict[str, float]`
(plus `describe() -> dict`, what a report records about it: weights, conventions). The
trainer runs them periodically on images sampled from its EMA weights
(`imagen_jax.training.periodic_eval`); `eval/` mains run the same evaluators over a folder of
samples with its manifest (`samples_from_folder`). Metric names start with the evaluator's
name.

Evaluators (`evals.metrics` names):
* `compositional`: GenEval-style accuracy with the shapes scorer, per split and task, and
  the overall mean of the task accuracies (`imagen_jax.shapes.accuracy`); samples whose
  prompts are outside the shapes domain are skipped, counted in `compositional/skipped`.
* `fid`: FID against reference statistics (`evals.fid.reference`, an `.npz` of mu and
  sigma as pytorch-fid and clean-fid write them), and KID when reference features are given
  (`evals.fid.kid_reference`), with the FID Inception of `evals.fid.inception`.
* `clip_score`: the CLIP score with the CLIPModel of `evals.clip.path`
  (`imagen_jax.evaluation.clip_score`: torchmetrics' convention, equal to its CLIPScore), or
  an in-domain score with another embedding model directory there (the shapes embedding
  model that `configs/shapes_embedding.py` trains).
"""

from __future__ import annotations

import dataclasses
import os
import pathlib
from collections.abc import Callable, Sequence
from typing import Any, Protocol

import ml_collections
import numpy as np
from absl import logging

from imagen_jax.evaluation import fid as fid_lib
from imagen_jax.evaluation import folder as folder_lib
from imagen_jax.evaluation import inception
from imagen_jax.shapes import accuracy as shapes_accuracy
from imagen_jax.shapes import scorer


@dataclasses.dataclass(frozen=True)
class Samples:
    """Generated images and what they were generated from, row by row.

    images: uint8 [H, W, 3] each (sizes may differ where an evaluator allows it).
    records: one dict per image with at least "prompt"; shapes prompts may carry "spec",
      "task" and "split" as the evaluation prompt files do.
    """

    images: Sequence[np.ndarray]
    records: Sequence[dict[str, Any]]

    def __post_init__(self):
        if len(self.images) != len(self.records):
            raise ValueError(f"{len(self.images)} images but {len(self.records)} prompt records")

    @property
    def prompts(self) -> list[str]:
        return [r["prompt"] for r in self.records]

    def __len__(self) -> int:
        return len(self.images)


class Evaluator(Protocol):
    name: str

    def __call__(self, samples: Samples) -> dict[str, float]: ...

    def describe(self) -> dict[str, Any]: ...


class Compositional:
    """Compositional accuracy with the shapes scorer: `compositional/<split>/<task>` and
    `compositional/<split>/overall` (the mean of the task accuracies, as GenEval reports);
    `compositional/skipped` counts the samples whose prompts are outside the shapes domain
    (only when there are some: they are not scored, and a warning says why)."""

    name = "compositional"

    def __call__(self, samples: Samples) -> dict[str, float]:
        results, skipped = [], []
        for i, (image, record) in enumerate(zip(samples.images, samples.records, strict=True)):
            try:
                spec, split = shapes_accuracy.record_spec(record)
            except shapes_accuracy.OutOfDomain as e:
                skipped.append(str(e))
                continue
            entry = shapes_accuracy.ManifestEntry(
                pathlib.Path(f"sample_{i}"), record["prompt"], spec, split, {}
            )
            results.append((entry, scorer.score(np.asarray(image), spec)))
        if skipped and not results:
            raise ValueError(f"no sample has a prompt of the shapes domain ({skipped[0]})")
        table = shapes_accuracy.summarize(results)
        metrics = {}
        for split, block in table["splits"].items():
            for task, row in block["tasks"].items():
                metrics[f"{self.name}/{split}/{task}"] = row["accuracy"]
            metrics[f"{self.name}/{split}/overall"] = block["overall"]
        if skipped:
            logging.warning(
                "compositional: skipped %d of %d samples, %s (first: %s)",
                len(skipped),
                len(samples),
                shapes_accuracy.SKIPPED_WHY,
                skipped[0],
            )
            metrics[f"{self.name}/skipped"] = float(len(skipped))
        return metrics

    def describe(self) -> dict[str, Any]:
        return {"name": self.name, "scorer": "imagen_jax.shapes.scorer"}


class FID:
    """FID (and KID, when reference features are given) of the samples against reference
    statistics, with the FID Inception of `inception_path` and the `resize` convention."""

    name = "fid"

    def __init__(
        self,
        inception_path: str,
        reference: str,
        *,
        kid_reference: str = "",
        resize: str = "pytorch_fid",
        batch_size: int = 50,
    ):
        inception.check_resize(resize)
        self.inception_path = os.fspath(inception_path)
        self.reference_path = os.fspath(reference)
        self.reference = fid_lib.load_stats(reference)
        self.kid_reference_path = kid_reference
        self.kid_features = fid_lib.load_features(kid_reference) if kid_reference else None
        self.resize = resize
        self.extractor = inception.FeatureExtractor(
            inception.load_inception(inception_path), resize=resize, batch_size=batch_size
        )

    def __call__(self, samples: Samples) -> dict[str, float]:
        if len(samples) < 2:
            raise ValueError(f"FID needs at least 2 images, got {len(samples)}")
        features = self.extractor(samples.images)
        mu, sigma = fid_lib.statistics(features)
        metrics = {
            self.name: fid_lib.frechet_distance(
                mu, sigma, self.reference["mu"], self.reference["sigma"]
            )
        }
        if self.kid_features is not None:
            size = min(fid_lib.KID_SUBSET_SIZE, len(features), len(self.kid_features))
            mean, std = fid_lib.kernel_inception_distance(
                features, self.kid_features, subset_size=size, seed=fid_lib.KID_SEED
            )
            metrics.update({"kid/mean": mean, "kid/std": std})
        return metrics

    def describe(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "inception": self.inception_path,
            "inception_sha256": inception.file_sha256(self.inception_path),
            "resize": self.resize,
            "reference": self.reference_path,
            "kid_reference": self.kid_reference_path or None,
        }


class CLIPScore:
    """The CLIP score of each image with its prompt, averaged (`clip_score`: torchmetrics'
    convention, 100 * cos clamped at 0); the backbone is named in `describe()`."""

    name = "clip_score"

    def __init__(self, path: str, *, batch_size: int = 32):
        from imagen_jax.evaluation import clip_score  # lazy: only CLIP runs need it

        self.path = os.fspath(path)
        self.scorer = clip_score.load_clip_scorer(path, batch_size=batch_size)

    def __call__(self, samples: Samples) -> dict[str, float]:
        return {self.name: self.scorer.score(samples.images, samples.prompts)["score"]}

    def describe(self) -> dict[str, Any]:
        return {"name": self.name, "clip": self.path, "backbone": self.scorer.backbone}


def _make_compositional(evals: ml_collections.ConfigDict) -> Evaluator:
    del evals
    return Compositional()


def _make_fid(evals: ml_collections.ConfigDict) -> Evaluator:
    cfg = evals.fid
    for key in ("inception", "reference"):
        if not cfg[key]:
            raise ValueError(f"the fid evaluator needs evals.fid.{key} (a file path)")
    return FID(
        cfg.inception,
        cfg.reference,
        kid_reference=cfg.kid_reference,
        resize=cfg.resize,
        batch_size=cfg.batch_size,
    )


def _make_clip_score(evals: ml_collections.ConfigDict) -> Evaluator:
    if not evals.clip.path:
        raise ValueError("the clip_score evaluator needs evals.clip.path (a CLIP directory)")
    return CLIPScore(evals.clip.path)


EVALUATORS: dict[str, Callable[[ml_collections.ConfigDict], Evaluator]] = {
    "compositional": _make_compositional,
    "fid": _make_fid,
    "clip_score": _make_clip_score,
}


def make_evaluators(evals: ml_collections.ConfigDict) -> list[Evaluator]:
    """The evaluators `evals.metrics` names, built (weights loaded) once."""
    names = list(evals.metrics)
    unknown = [n for n in names if n not in EVALUATORS]
    if unknown:
        raise ValueError(f"unknown evals.metrics {unknown}; known: {sorted(EVALUATORS)}")
    if not names:
        raise ValueError("evals.metrics names no evaluator")
    return [EVALUATORS[name](evals) for name in names]


def run_evaluators(evaluators: Sequence[Evaluator], samples: Samples) -> dict[str, float]:
    """All evaluators' metrics, merged (names are prefixed by evaluator, so they never clash)."""
    metrics: dict[str, float] = {}
    for evaluator in evaluators:
        metrics.update({k: float(v) for k, v in evaluator(samples).items()})
    return metrics


def samples_from_folder(folder: str | os.PathLike) -> Samples:
    """The images a sampling job's `manifest.jsonl` lists, with their records, checked
    against the folder (`folder.read_manifest`: every listed image exists, none is listed
    twice, none beside them is left out)."""
    pairs = folder_lib.read_manifest(folder)
    return Samples([folder_lib.load_image(path) for path, _ in pairs], [r for _, r in pairs])
