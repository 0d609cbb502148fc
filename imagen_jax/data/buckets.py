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


def parse_buckets(spec: str | Sequence[str]) -> tuple[tuple[int, int], ...]:
    """ "HxW,HxW,..." (or a sequence of "HxW") -> ((H, W), ...); "" -> ()."""
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
    """Every record's image (height, width), None for corrupt ones."""
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
    ):
        if not buckets:
            raise ValueError("a BucketPlan needs at least one bucket")
        self.buckets = tuple(buckets)
        self.global_batch = int(global_batch)
        self.seed, self.shuffle = int(seed), shuffle
        assigned = np.array(
            [-1 if s is None else nearest_bucket(*s, self.buckets) for s in shapes], np.int64
        )
        self.num_unreadable = int(np.sum(assigned < 0))
        self.members = [np.flatnonzero(assigned == b) for b in range(len(self.buckets))]
        self.counts = [len(m) for m in self.members]
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

    def describe(self) -> str:
        pairs = zip(self.buckets, self.counts, strict=True)
        return ", ".join(f"{h}x{w}: {c}" for (h, w), c in pairs)

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
