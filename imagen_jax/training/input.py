"""The trainer's input: the `data` config group -> a source -> this process's batches.

Sources: "folder" (ImageFolderSource), "tar" (TarShardSource), "shapes" (the procedural
shapes domain, `imagen_jax.data.ShapesSource`) and
"synthetic" (`SyntheticSource` below: a few hundred tiny captioned scenes drawn in memory,
for runlocal configs and tests; no files, no other package).

With a text-embedding cache (`text.cache`), `make_input` adds each batch's text from it.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import grain
import jax
import ml_collections
import numpy as np

from imagen_jax import data as data_lib
from imagen_jax.data import buckets as buckets_lib
from imagen_jax.shapes.tasks import parse_task_weights

if TYPE_CHECKING:
    from imagen_jax.text.cache import EmbeddingCache

SOURCES = ("synthetic", "folder", "tar", "shapes")

_COLORS = {
    "red": (220, 40, 40),
    "green": (40, 180, 60),
    "blue": (40, 80, 220),
    "yellow": (230, 210, 40),
    "purple": (150, 60, 190),
    "white": (240, 240, 240),
}
_SHAPES = ("square", "circle")
_PLACES = {"on the left": (0.3, 0.5), "on the right": (0.7, 0.5), "at the top": (0.5, 0.3)}


class SyntheticSource:
    """`size` captioned images of one coloured square or circle on a dark background.

    Record i is drawn from (seed, i) only: a colour, a shape and a place, with the caption
    "a <colour> <shape> <place>" (e.g. "a red circle on the left"). Images are uint8
    [resolution, resolution, 3]; the pipeline resizes them like any other source.
    """

    def __init__(self, size: int = 256, resolution: int = 32, seed: int = 0):
        if size < 1 or resolution < 4:
            raise ValueError(
                f"SyntheticSource needs size >= 1 and resolution >= 4, got {size}, {resolution}"
            )
        self.size, self.resolution, self.seed = int(size), int(resolution), int(seed)

    def __len__(self) -> int:
        return self.size

    def _draw(self, index: int) -> tuple[str, str, str]:
        """Record i's (colour, shape, place)."""
        if not 0 <= index < self.size:
            raise IndexError(index)
        rng = np.random.default_rng([self.seed, int(index)])
        color = list(_COLORS)[rng.integers(len(_COLORS))]
        shape = _SHAPES[rng.integers(len(_SHAPES))]
        place = list(_PLACES)[rng.integers(len(_PLACES))]
        return color, shape, place

    def caption(self, index: int) -> str:
        """Record i's caption, without drawing its image."""
        color, shape, place = self._draw(index)
        return f"a {color} {shape} {place}"

    def __getitem__(self, index: int) -> dict:
        color, shape, place = self._draw(index)
        r = self.resolution
        y, x = (np.mgrid[0:r, 0:r] + 0.5) / r
        cx, cy = _PLACES[place]
        half = 0.18
        if shape == "square":
            inside = (np.abs(x - cx) < half) & (np.abs(y - cy) < half)
        else:
            inside = (x - cx) ** 2 + (y - cy) ** 2 < half**2
        image = np.full((r, r, 3), 30, np.uint8)
        image[inside] = _COLORS[color]
        return {"image": image, "caption": self.caption(index), "key": f"syn{index:06d}"}

    def __repr__(self) -> str:
        return f"SyntheticSource(size={self.size}, resolution={self.resolution}, seed={self.seed})"


def counterfactual_kinds(cfg: ml_collections.ConfigDict) -> tuple[str, ...]:
    """`data.counterfactuals` as a tuple of kinds; () when off (or a config has no such key)."""
    value = str(cfg.get("counterfactuals", "") or "")
    return tuple(k.strip() for k in value.split(",") if k.strip())


def make_source(cfg: ml_collections.ConfigDict):
    """The source of a `data` config group. With `data.counterfactuals` set, records also
    carry a "counterfactual" caption of those kinds (the shapes source only)."""
    kinds = counterfactual_kinds(cfg)
    if kinds and cfg.source != "shapes":
        raise ValueError(
            f"data.counterfactuals={cfg.counterfactuals!r} needs counterfactual captions, which "
            f"only data.source='shapes' writes; this is {cfg.source!r}"
        )
    if cfg.source == "synthetic":
        return SyntheticSource(cfg.size, cfg.resolution, cfg.seed)
    if cfg.source in ("folder", "tar") and not cfg.path:
        raise ValueError(f"data.source={cfg.source!r} needs data.path")
    # reduced-scale JPEG decoding keeps the shorter side >= 2x the largest side trained at
    decode = max(max(shape) for shape in training_shapes(cfg))
    if cfg.source == "folder":
        return data_lib.ImageFolderSource(cfg.path, min_decode_size=decode)
    if cfg.source == "tar":
        return data_lib.TarShardSource(cfg.path, min_decode_size=decode)
    if cfg.source == "shapes":
        return data_lib.ShapesSource(
            split=cfg.split,
            resolution=cfg.resolution,
            size=cfg.size,
            seed=cfg.seed,
            task_weights=parse_task_weights(cfg.task_weights),
            wordings=cfg.get("wordings", "grammar"),
            counterfactuals=bool(kinds),
            counterfactual_kinds=kinds or None,
            counterfactual_mixed=bool(cfg.get("counterfactuals_mixed", False)),
            cell_labels=int(cfg.get("cell_labels", 0)),
            # aspect-ratio buckets: scenes drawn on those canvases, not crops of squares
            canvases=data_lib.parse_buckets(cfg.get("buckets", ""), resolution=cfg.resolution),
        )
    raise ValueError(f"unknown data.source {cfg.source!r}; expected one of {SOURCES}")


def check_stage(config: ml_collections.ConfigDict, num_levels: int, data_parallel: int) -> None:
    """Raises ValueError when the stage and its data disagree: resolutions, a low-resolution
    input for (only) super-resolution stages, sizes the UNet can halve, batch splits."""
    model, data = config.model, config.data
    low_resolution = model.get("low_resolution", 0)  # the VAE's model group has none
    if model.resolution != data.resolution:
        raise ValueError(
            f"the stage generates {model.resolution} px images (model.resolution) but its "
            f"data is {data.resolution} px (data.resolution); set both to the same size"
        )
    if low_resolution != data.low_resolution:
        raise ValueError(
            f"the stage takes {low_resolution or 'no'} px low-resolution inputs "
            f"(model.low_resolution) but data.low_resolution={data.low_resolution}"
        )
    if low_resolution and not 0 < low_resolution < model.resolution:
        raise ValueError(
            f"model.low_resolution={low_resolution} must lie in (0, {model.resolution})"
        )
    factor = 2 ** (num_levels - 1)
    if model.resolution % factor:
        raise ValueError(
            f"model.resolution={model.resolution} is not divisible by {factor}, which the "
            f"UNet's {num_levels} levels need"
        )
    for h, w in training_shapes(data):
        if h % factor or w % factor:
            raise ValueError(
                f"data.buckets: {h}x{w} is not divisible by {factor}, which the UNet's "
                f"{num_levels} levels need"
            )
    if data.get("buckets") and low_resolution:
        raise ValueError(
            "data.buckets: aspect-ratio buckets are for base stages, not super-resolution"
        )
    if data.batch_size % jax.process_count() or data.batch_size % data_parallel:
        raise ValueError(
            f"data.batch_size={data.batch_size} must divide evenly among "
            f"{jax.process_count()} processes and {data_parallel} data-parallel devices"
        )
    accum = config.optim.accum_steps
    if accum < 1 or data.batch_size % (accum * data_parallel):
        raise ValueError(
            f"data.batch_size={data.batch_size} must split into optim.accum_steps={accum} "
            f"micro-batches of a multiple of {data_parallel} devices"
        )


def make_input(
    config: ml_collections.ConfigDict, text_cache: EmbeddingCache | None = None
) -> grain.DatasetIterator:
    """This process's DataIterator over the configured source; with `text_cache`, its
    batches also carry their captions' "text" and "text_mask" (`CachedText`); with
    `data.prior_fraction`, part of every batch comes from the prior source (`PriorMix`)."""
    cfg = config.data
    local = cfg.batch_size // jax.process_count()
    fraction = float(cfg.get("prior_fraction", 0.0))
    n_prior = int(round(local * fraction))
    if fraction and not 0 < n_prior < local:
        raise ValueError(
            f"data.prior_fraction={fraction} of this process's {local} examples a batch gives "
            f"{n_prior} prior examples; it must give at least one and leave one"
        )

    def pipeline(group, batch_size: int, seed: int):
        return data_lib.make_pipeline(
            make_source(group),
            batch_size=batch_size,
            resolution=cfg.resolution,
            low_resolution=cfg.low_resolution or None,
            low_res_method=cfg.low_res_method,
            seed=seed,
            shuffle=cfg.shuffle,
            random_crop=cfg.random_crop,
            worker_count=cfg.worker_count,
            size_crop=cfg.get("size_crop", False),
            buckets=data_lib.parse_buckets(cfg.get("buckets", ""), resolution=cfg.resolution),
            prune_buckets=buckets_lib.is_auto(cfg.get("buckets", "")),
        )

    if n_prior and cfg.get("buckets"):
        raise ValueError(
            f"data.prior_fraction={fraction} with data.buckets={cfg.buckets!r}: a batch mixes "
            "the two sources, so it cannot be of one bucket; use one of them"
        )
    data = pipeline(cfg, local - n_prior, cfg.seed)
    if n_prior:
        if cfg.prior_source in ("folder", "tar") and not cfg.prior_path:
            raise ValueError(
                f"data.prior_fraction={fraction} with data.prior_source={cfg.prior_source!r} "
                "needs data.prior_path (the class images)"
            )
        prior = ml_collections.ConfigDict(cfg.to_dict())
        prior.source, prior.path = cfg.prior_source, cfg.prior_path
        prior.counterfactuals = ""
        data = PriorMix(data, pipeline(prior, n_prior, cfg.seed + 1), weight=cfg.prior_weight)
    return data if text_cache is None else CachedText(data, text_cache)


class PriorMix(grain.DatasetIterator):
    """Batches of `data` followed by those of `prior` (DreamBooth's instance and class
    images, in that order), with "example_weight" float32 [B]: the train step's loss is
    the mean over `data`'s examples plus `weight` times the mean over `prior`'s, as
    diffusers' train_dreambooth.py adds its prior loss (each example's weight is B / n of
    its part, times `weight` for the prior's; the parts have the same size on every
    process). Its state holds both iterators'."""

    def __init__(self, data, prior, *, weight: float):
        super().__init__([data, prior])  # closing it closes both
        self.data, self.prior, self.weight = data, prior, float(weight)

    def __next__(self) -> dict[str, np.ndarray]:
        self._assert_not_closed()
        a, b = next(self.data), next(self.prior)
        n_a, n_b = len(a["caption"]), len(b["caption"])
        batch = {k: np.concatenate([a[k], b[k]]) for k in a.keys() & b.keys()}
        total = n_a + n_b
        batch["example_weight"] = np.concatenate(
            [np.full(n_a, total / n_a), np.full(n_b, self.weight * total / n_b)]
        ).astype(np.float32)
        return batch

    def get_state(self) -> dict:
        return {"data": self.data.get_state(), "prior": self.prior.get_state()}

    def set_state(self, state: dict) -> None:
        self.data.set_state(state["data"])
        self.prior.set_state(state["prior"])


class CachedText(grain.DatasetIterator):
    """The batches of `data` plus "text" float32 [B, L, D] and "text_mask" bool [B, L] of
    their captions, looked up in a text cache (so the trainer runs no encoder for them).
    Its state is the wrapped iterator's: checkpoints and resumption are unchanged."""

    def __init__(self, data: data_lib.DataIterator, cache: EmbeddingCache):
        super().__init__(data)
        self.cache = cache

    def __next__(self) -> dict[str, np.ndarray]:
        self._assert_not_closed()
        return with_cached_text(next(self._parent), self.cache)

    def get_state(self) -> dict:
        return self._parent.get_state()

    def set_state(self, state: dict) -> None:
        self._parent.set_state(state)


def with_cached_text(batch: dict, cache: EmbeddingCache) -> dict:
    """The batch plus its captions' "text" float32 [B, L, D] and "text_mask" bool [B, L]
    (and "text_pooled" [B, P] where the encoder's pooled text conditions the network),
    looked up in a text cache."""
    emb, mask, pooled = cache.lookup(batch["caption"])
    if cache.pooled_conditions:
        return dict(batch, text=emb, text_mask=mask, text_pooled=pooled)
    return dict(batch, text=emb, text_mask=mask)


def check_batch(batch: dict, config: ml_collections.ConfigDict) -> None:
    """The first batch has the stage's shapes (a source that ignores the resolution stops
    here, with its shapes named)."""
    low = config.data.low_resolution
    local = config.data.batch_size // jax.process_count()
    expected = {"image": [(local, h, w, 3) for h, w in training_shapes(config.data)]}
    if low:
        expected["low_res"] = [(local, low, low, 3)]
    for name, shapes in expected.items():
        got = np.shape(batch.get(name)) if name in batch else None
        if got not in shapes:
            want = " or ".join(str(s) for s in shapes)
            raise ValueError(f"the data gives {name} of shape {got}; the stage needs {want}")


def training_shapes(data: ml_collections.ConfigDict) -> tuple[tuple[int, int], ...]:
    """The (height, width) of the training images: `data.buckets`, else the square of
    `data.resolution`."""
    buckets = data_lib.parse_buckets(data.get("buckets", ""), resolution=data.resolution)
    return buckets or ((data.resolution, data.resolution),)
