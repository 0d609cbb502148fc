"""Aspect-ratio buckets: every image goes to the bucket shape nearest its aspect ratio, and
every global batch holds images of one bucket (as SDXL and SD 3 were trained: a wide photo
is not cropped to a square, and one step's batch still stacks into one array).

    buckets = parse_buckets("1024x1024,896x1152,1152x896,768x1344,1344x768")
    plan = BucketPlan(buckets, record_shapes(source), global_batch=64, seed=0)
    record, bucket = plan.lookup(position)   # position in the global stream

The plan of an epoch (a function of the seed and the epoch only): each bucket's records
in a seeded random order (in order with `shuffle=False`), cut into global batches (the
last, short one of each bucket is left for this epoch), and the batches of all buckets in
a seeded random order. Global stream position p is row p % B of batch p // B; a process
reads rows [i * B / n, (i + 1) * B / n) of every batch (`DataIterator` keeps them
together), so the processes of one step read the same bucket.

A record is assigned by its image's height and width (read from the file header where the
source can, `image_shape`), to the bucket minimizing |log(h / w) - log(H / W)| (the first
of equals). Records whose header cannot be read are left out and counted. A bucket that
holds images but fewer than one global batch is an error that names it: its images would
never be trained on.
"""

from __future__ import annotations

import functools
import math
import re
from collections.abc import Sequence
from concurrent import futures

import numpy as np

from imagen_jax.data.preprocess import CorruptRecordError

_SPEC = re.compile(r"^\s*(\d+)\s*x\s*(\d+)\s*$")


AUTO = "auto"


def pixel_budget_buckets(
    side: int, *, step: int = 64, max_ratio: float = 4.0
) -> tuple[tuple[int, int], ...]:
    """SDXL's way of making buckets: for every width a multiple of `step` up to `side`, the
    tallest height a multiple of `step` whose image holds at most side x side pixels, as
    long as the aspect ratio stays within 1 : `max_ratio`, and each such shape turned on
    its side; tallest first. For 1024 and 64: 2048x512 ... 1152x896, 1024x1024, 896x1152
    ... 512x2048."""
    if side < step or step < 1:
        raise ValueError(f"data.buckets=auto: resolution {side} must be at least the step {step}")
    area, out = side * side, set()
    for width in range(step, side + 1, step):  # tall and square; wide ones mirror them
        height = area // width // step * step
        if height >= width and height <= max_ratio * width:
            out.update({(height, width), (width, height)})
    return tuple(sorted(out, key=lambda hw: (-hw[0] / hw[1], -hw[0])))


def is_auto(spec: str | Sequence[str]) -> bool:
    """Whether `data.buckets` asks for pixel-budget buckets ("auto" or "auto:STEP")."""
    return isinstance(spec, str) and spec.strip().split(":")[0] == AUTO


def parse_buckets(
    spec: str | Sequence[str], *, resolution: int | None = None
) -> tuple[tuple[int, int], ...]:
    """ "HxW,HxW,..." (or a sequence of "HxW") -> ((H, W), ...); "" -> (). "auto" (or
    "auto:STEP") -> `pixel_budget_buckets(resolution, step=STEP)`, step 64 by default;
    a plan over such buckets passes over those too small for a batch (`BucketPlan`'s
    `prune`)."""
    if is_auto(spec):
        _, _, step = spec.strip().partition(":")
        if not (step.strip() or "64").isdigit():
            raise ValueError(
                f"data.buckets={spec!r}: expected 'auto' or 'auto:STEP' (e.g. auto:64)"
            )
        if not resolution:
            raise ValueError(
                f"data.buckets={spec!r} needs data.resolution (the pixel budget's side)"
            )
        return pixel_budget_buckets(int(resolution), step=int(step.strip() or 64))
    items = [s for s in (spec.split(",") if isinstance(spec, str) else spec) if str(s).strip()]
    out = []
    for item in items:
        m = _SPEC.match(str(item))
        if not m or int(m.group(1)) < 1 or int(m.group(2)) < 1:
            raise ValueError(f"data.buckets: {item!r} is not HEIGHTxWIDTH (e.g. 896x1152)")
        shape = (int(m.group(1)), int(m.group(2)))
        if shape in out:
            raise ValueError(f"data.buckets: {item!r} is given twice")
        out.append(shape)
    return tuple(out)


def format_buckets(buckets: Sequence[tuple[int, int]]) -> str:
    return ",".join(f"{h}x{w}" for h, w in buckets)


def nearest_bucket(height: int, width: int, buckets: Sequence[tuple[int, int]]) -> int:
    """The index of the bucket whose aspect ratio is nearest the image's (in log ratio)."""
    ratio = math.log(height / width)
    return int(np.argmin([abs(ratio - math.log(h / w)) for h, w in buckets]))


def image_shape(source, index: int) -> tuple[int, int] | None:
    """(height, width) of record `index`'s image: from its header where the source reads
    one (`source.image_shape`), else by loading the record; None if it is corrupt."""
    try:
        if hasattr(source, "image_shape"):
            return tuple(source.image_shape(index))
        return tuple(source[index]["image"].shape[:2])
    except CorruptRecordError:
        return None


def record_shapes(source, *, threads: int = 8) -> list[tuple[int, int] | None]:
    """Every record's image (height, width), None for corrupt ones: the source's own
    `image_shapes()` where it has one (a procedural source knows them all at once)."""
    if hasattr(source, "image_shapes"):
        return list(source.image_shapes())
    with futures.ThreadPoolExecutor(threads) as pool:
        return list(pool.map(lambda i: image_shape(source, i), range(len(source))))


class BucketPlan:
    """Which record (and bucket) each global stream position reads; see the module
    docstring. `batches_per_epoch` global batches of `global_batch` records an epoch."""

    def __init__(
        self,
        buckets: Sequence[tuple[int, int]],
        shapes: Sequence[tuple[int, int] | None],
        *,
        global_batch: int,
        seed: int,
        shuffle: bool = True,
        prune: bool = False,
    ):
        if not buckets:
            raise ValueError("a BucketPlan needs at least one bucket")
        self.buckets = tuple(buckets)
        self.global_batch = int(global_batch)
        self.seed, self.shuffle = int(seed), shuffle
        # With `prune`, the bucket with the fewest images among those holding fewer than a
        # global batch is passed over and its images go to the nearest bucket left, until
        # none is short: pixel-budget buckets are many, and a data set fills few of them.
        active = list(range(len(self.buckets)))
        while True:
            assigned = self._assign(shapes, active)
            self.counts = [int(np.sum(assigned == b)) for b in range(len(self.buckets))]
            short = [b for b in active if 0 < self.counts[b] < self.global_batch]
            if not (prune and short and len(active) > 1):
                break
            active.remove(min(short, key=lambda b: (self.counts[b], b)))
        self.passed_over = tuple(b for b in range(len(self.buckets)) if b not in active)
        self.num_unreadable = int(np.sum(assigned < 0))
        self.members = [np.flatnonzero(assigned == b) for b in range(len(self.buckets))]
        for (h, w), count in zip(self.buckets, self.counts, strict=True):
            if 0 < count < self.global_batch:
                raise ValueError(
                    f"data.buckets: bucket {h}x{w} holds {count} images, fewer than a global "
                    f"batch of {self.global_batch}; its images would never be trained on "
                    f"(bucket sizes: {self.describe()}): drop the bucket, add images of its "
                    "shape, or lower data.batch_size"
                )
        self.batches_per_epoch = sum(c // self.global_batch for c in self.counts)
        if not self.batches_per_epoch:
            raise ValueError(
                f"data.buckets: no bucket holds a global batch of {self.global_batch} images "
                f"({self.describe()})"
            )

    def _assign(self, shapes, active: list[int]) -> np.ndarray:
        """Each record's bucket (an index into `buckets`) among `active`; -1 if unreadable."""
        choices = [self.buckets[b] for b in active]
        return np.array(
            [-1 if s is None else active[nearest_bucket(*s, choices)] for s in shapes], np.int64
        )

    def describe(self) -> str:
        pairs = zip(self.buckets, self.counts, strict=True)
        return ", ".join(f"{h}x{w}: {c}" for (h, w), c in pairs if c)

    @property
    def epoch_length(self) -> int:
        """Global stream positions an epoch."""
        return self.batches_per_epoch * self.global_batch

    @functools.lru_cache(maxsize=4)  # noqa: B019 (a plan lives as long as its pipeline)
    def epoch(self, epoch: int) -> tuple[np.ndarray, np.ndarray]:
        """(bucket of each batch [N], records of each batch [N, B]) of one epoch."""
        rng = np.random.default_rng([self.seed, epoch])
        batches, kinds = [], []
        for b, members in enumerate(self.members):
            order = rng.permutation(members) if self.shuffle else members
            n = len(order) // self.global_batch
            batches.append(order[: n * self.global_batch].reshape(n, self.global_batch))
            kinds.append(np.full(n, b))
        rows, kinds = np.concatenate(batches), np.concatenate(kinds)
        if self.shuffle:
            order = rng.permutation(len(rows))
            rows, kinds = rows[order], kinds[order]
        return kinds, rows

    def lookup(self, position: int) -> tuple[int, int]:
        """(record index, bucket index) at global stream position `position`."""
        epoch, within = divmod(int(position), self.epoch_length)
        batch, row = divmod(within, self.global_batch)
        kinds, rows = self.epoch(epoch)
        return int(rows[batch, row]), int(kinds[batch])
