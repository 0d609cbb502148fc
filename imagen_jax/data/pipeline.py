"""The training input pipeline: a source -> this process's batches of one cascade stage.

    it = make_pipeline(ImageFolderSource("data/"), batch_size=32, resolution=64, seed=0)
    batch = next(it)  # {"image": uint8 [32, 64, 64, 3], "caption": object [32], "key": ...}

The trainer turns `image` (and `low_res`) into global jax.Arrays with
`jax.make_array_from_process_local_data` and gives `caption.tolist()` to the tokenizer.

How it is built (grain's dataset API):

1. The example stream is a `grain.MapDataset`, lazy and random-access:
   `range(len(source))` -> load + preprocess (`random_map`) -> `shuffle` -> `repeat` ->
   `[process_index::process_count]`. Stream position `p` of process `i` is position
   `p * process_count + i` of one global stream, so in every epoch the processes read
   disjoint examples that together cover the whole source, and (while nothing is
   skipped) the examples of one global step do not depend on how the global batch is
   split among processes.
2. Shuffling is a permutation per epoch (grain folds the epoch into the shuffle seed).
   The random crop of a record depends on (seed, record index, epoch) only: the
   `random_map` sits before the shuffle, so grain seeds its generator by the record's
   index in the repeated source. `seed` is split (numpy SeedSequence) into the shuffle
   seed and the crop seed.
3. Corrupt records: a record whose image cannot be decoded (`CorruptRecordError`) loads
   as a `SkippedRecord` placeholder instead of an example. Whether a record is skipped is
   a function of its bytes, so every run, resumed or not, skips the same ones at the same
   stream positions. The placeholder travels like an example; `DataIterator` drops it,
   logs it (absl, warning, naming the file or shard and key; the first 100, then every
   1000th) and counts it in `num_skipped`.
4. Everything up to here is one-to-one, so grain's worker processes (`worker_count`,
   `mp_prefetch`, which slices the stream among workers and interleaves them back in
   order) return exactly the stream a single process would. Dropping skipped records
   and batching are many-to-one and run after it, in `DataIterator`, in this process:
   the batches are the same for every `worker_count` (0 reads with threads only).
5. State: `DataIterator.get_state()` is a small JSON-serializable dict,
   `{"next_index", "num_skipped", "seed", "process_index", "process_count"}`, where
   `next_index` counts the stream positions consumed (skipped ones included).
   `set_state` rebuilds the grain iterator on `stream[next_index:]`, so a restored
   iterator yields exactly the batches the original would have yielded next, with any
   `worker_count`. `DataIterator` is a `grain.DatasetIterator`, so Orbax saves it with
   `grain.checkpoint.CheckpointSave` (one JSON file per process).

Aspect-ratio buckets (`buckets=`, `buckets.py`): the stream is `bucket_stream` instead, a
plan of global batches each of one bucket's shape; a process reads its slice of every
global batch, random crops are seeded by the global position, and `DataIterator` keeps a
run of `batch_size` positions together (a corrupt record's place goes to a copy of another
of its batch). The state is the same dict plus "buckets".

Finite runs (`num_epochs` set): the global stream is cut to a multiple of
`process_count`, so every process gets the same number of positions (at most
`process_count - 1` examples of the last epoch are dropped). Processes that skip different
numbers of corrupt records can still end with a different number of batches; multi-host
trainers should run a fixed number of steps on the default endless stream.
"""

from __future__ import annotations

import dataclasses
import itertools
import os
import sys
from collections.abc import Sequence
from typing import Any

import grain
import jax
import numpy as np
from absl import flags, logging

from imagen_jax.data.buckets import BucketPlan, format_buckets, record_shapes
from imagen_jax.data.preprocess import LOW_RES_METHODS, CorruptRecordError, preprocess_record


@dataclasses.dataclass(frozen=True)
class SkippedRecord:
    """Placeholder for a record that could not be decoded; `reason` names file and key."""

    index: int  # in the source
    reason: str


class _LoadExample(grain.transforms.RandomMap):
    """Source index -> preprocessed example, or SkippedRecord if its image is corrupt."""

    def __init__(
        self, source, *, resolution, low_resolution, low_res_method, random_crop, size_crop
    ):
        self._source = source
        self._kwargs = dict(
            resolution=resolution,
            low_resolution=low_resolution,
            low_res_method=low_res_method,
            size_crop=size_crop,
        )
        self._random_crop = random_crop

    def random_map(self, index: int, rng: np.random.Generator):
        try:
            record = self._source[index]
        except CorruptRecordError as e:
            return SkippedRecord(index=int(index), reason=str(e))
        return preprocess_record(record, rng=rng if self._random_crop else None, **self._kwargs)


def example_stream(
    source,
    *,
    resolution: int,
    low_resolution: int | None = None,
    low_res_method: str = "bicubic",
    seed: int,
    shuffle: bool = True,
    num_epochs: int | None = None,
    process_index: int = 0,
    process_count: int = 1,
    random_crop: bool = False,
    size_crop: bool = False,
) -> grain.MapDataset:
    """This process's stream of examples (or SkippedRecords), before batching.

    See the module docstring for the order of operations and what each one guarantees.
    """
    if len(source) == 0:
        raise ValueError(f"{source!r} has no records")
    if num_epochs is not None and num_epochs < 1:
        raise ValueError(f"num_epochs={num_epochs}; expected a positive int or None (endless)")
    if not 0 <= process_index < process_count:
        raise ValueError(f"process_index={process_index} not in [0, {process_count})")
    shuffle_seed, crop_seed = (int(s) for s in np.random.SeedSequence(seed).generate_state(2))
    load = _LoadExample(
        source,
        resolution=resolution,
        low_resolution=low_resolution,
        low_res_method=low_res_method,
        random_crop=random_crop,
        size_crop=size_crop,
    )
    ds = grain.MapDataset.range(len(source)).random_map(load, seed=crop_seed)
    if shuffle:
        ds = ds.shuffle(seed=shuffle_seed)
    ds = ds.repeat(num_epochs)
    stop = None if num_epochs is None else len(ds) - len(ds) % process_count
    return ds[process_index:stop:process_count]


class _LoadBucketed(grain.transforms.Map):
    """This process's stream position -> the example of its bucket plan (or SkippedRecord):
    the record resized and cropped to its bucket's shape; a random crop seeded by the
    global stream position, so that it does not depend on the number of processes."""

    def __init__(self, source, plan: BucketPlan, *, local, process_index, crop_seed, **kwargs):
        self._source, self._plan, self._kwargs = source, plan, kwargs
        self._local, self._process_index, self._crop_seed = local, process_index, crop_seed

    def map(self, position: int):
        batch, row = divmod(int(position), self._local)
        global_position = batch * self._plan.global_batch + self._process_index * self._local + row
        index, bucket = self._plan.lookup(global_position)
        try:
            record = self._source[index]
        except CorruptRecordError as e:
            return SkippedRecord(index=index, reason=str(e))
        rng = None
        if self._kwargs["random_crop"]:
            rng = np.random.default_rng([self._crop_seed, global_position])
        kwargs = {k: v for k, v in self._kwargs.items() if k != "random_crop"}
        return preprocess_record(record, resolution=self._plan.buckets[bucket], rng=rng, **kwargs)


def bucket_stream(
    source,
    plan: BucketPlan,
    *,
    seed: int,
    num_epochs: int | None = None,
    process_index: int = 0,
    process_count: int = 1,
    random_crop: bool = False,
    size_crop: bool = False,
) -> grain.MapDataset:
    """This process's stream of examples of an aspect-ratio bucket plan (`buckets.py`):
    every run of `plan.global_batch / process_count` consecutive positions is this
    process's part of one global batch, all of one bucket's shape."""
    if plan.global_batch % process_count:
        raise ValueError(
            f"a global batch of {plan.global_batch} does not split among {process_count} processes"
        )
    local = plan.global_batch // process_count
    per_epoch = plan.batches_per_epoch * local
    length = sys.maxsize if num_epochs is None else per_epoch * num_epochs
    _, crop_seed = (int(s) for s in np.random.SeedSequence(seed).generate_state(2))
    load = _LoadBucketed(
        source,
        plan,
        local=local,
        process_index=process_index,
        crop_seed=crop_seed,
        random_crop=random_crop,
        size_crop=size_crop,
        low_resolution=None,
    )
    return grain.MapDataset.range(length).map(load)


def stack_examples(examples: list[dict[str, Any]]) -> dict[str, np.ndarray]:
    """Examples -> a batch: images stacked, strings in object arrays of Python str."""
    batch = {}
    for name, value in examples[0].items():
        values = [example[name] for example in examples]
        if isinstance(value, np.ndarray):
            batch[name] = np.stack(values)  # [B, H, W, 3]
        else:
            batch[name] = np.empty(len(values), dtype=object)  # [B] of str
            batch[name][:] = values
    return batch


# `worker_count=AUTO_WORKERS`: worker processes by the host's cores (`auto_worker_count`).
AUTO_WORKERS = -1


def auto_worker_count(cpus: int | None = None) -> int:
    """Worker processes for a host of `cpus` cores (default: this process's): none up to
    4 cores, where the train step needs them (and the 2-core CPU machine trains there),
    then half of the cores past 4, at most 8. A record costs Python time under one GIL
    per process (the shapes source renders ~1,000 images/s in one; bench/README.md,
    train_loop.py), so a GPU host's loop needs them to keep the device fed."""
    if cpus is None:
        cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    return min(8, max(0, (int(cpus or 1) - 4) // 2))


class DataIterator(grain.DatasetIterator):
    """Batches of this process's example stream; drops, logs and counts skipped records.

    A `grain.DatasetIterator`: `get_state()` / `set_state()` (JSON-serializable dicts,
    format in the module docstring), `start_prefetch()`, `close()` (stops grain's worker
    processes; also done on garbage collection). `num_skipped` is the number of corrupt
    records this process has dropped since the start of the run, resumes included.
    """

    def __init__(
        self,
        examples: grain.MapDataset,
        *,
        batch_size: int,
        drop_remainder: bool = True,
        worker_count: int = 0,
        read_threads: int = 8,
        seed: int = 0,
        process_index: int = 0,
        process_count: int = 1,
        buckets: str = "",
    ):
        self._upstream: grain.DatasetIterator | None = None  # Built on first use.
        super().__init__()
        if batch_size < 1:
            raise ValueError(f"batch_size={batch_size}; expected >= 1")
        if worker_count == AUTO_WORKERS:
            worker_count = auto_worker_count()
        if worker_count < 0:
            raise ValueError(
                f"worker_count={worker_count}; expected >= 0, or {AUTO_WORKERS} (by the cores)"
            )
        self._examples = examples
        self._batch_size = batch_size
        self._drop_remainder = drop_remainder
        self._worker_count = worker_count
        self._read_options = grain.ReadOptions(
            num_threads=read_threads, prefetch_buffer_size=max(2 * batch_size, read_threads)
        )
        self._settings = dict(
            seed=int(seed), process_index=int(process_index), process_count=int(process_count)
        )
        if buckets:  # batches are runs of batch_size positions, each of one bucket
            self._settings["buckets"] = buckets
        self._next_index = 0
        self._num_skipped = 0

    @property
    def num_skipped(self) -> int:
        return self._num_skipped

    def _make_upstream(self) -> grain.DatasetIterator:
        ds = self._examples[self._next_index :].to_iter_dataset(self._read_options)
        if self._worker_count:
            if not flags.FLAGS.is_parsed():
                # grain's worker start-up reads its absl flags; outside an absl main (tests,
                # notebooks, scripts) they are unparsed, so take their defaults.
                flags.FLAGS.mark_as_parsed()
            options = grain.MultiprocessingOptions(
                num_workers=self._worker_count,
                per_worker_buffer_size=max(1, self._batch_size // self._worker_count),
            )
            ds = ds.mp_prefetch(options)
        return iter(ds)

    def __next__(self) -> dict[str, np.ndarray]:
        self._assert_not_closed()
        if self._upstream is None:
            self._upstream = self._make_upstream()
        if "buckets" in self._settings:
            return self._next_bucketed()
        examples = []
        while len(examples) < self._batch_size:
            try:
                example = next(self._upstream)
            except StopIteration:
                if examples and not self._drop_remainder:
                    break
                raise
            self._next_index += 1
            if isinstance(example, SkippedRecord):
                self._skip(example)
                continue
            examples.append(example)
        return stack_examples(examples)

    def _next_bucketed(self) -> dict[str, np.ndarray]:
        """The next run of batch_size positions (one bucket's shape); a corrupt record's
        place goes to a copy of another example of the run, so the batch keeps its shape
        and the next batch its bucket (a run of corrupt records only is passed over)."""
        while True:
            run = []
            for _ in range(self._batch_size):
                run.append(next(self._upstream))
                self._next_index += 1
            good = [e for e in run if not isinstance(e, SkippedRecord)]
            for example in run:
                if isinstance(example, SkippedRecord):
                    self._skip(example)
            if good:
                return stack_examples(list(itertools.islice(itertools.cycle(good), len(run))))

    def _skip(self, example: SkippedRecord) -> None:
        self._num_skipped += 1
        if self._num_skipped <= 100 or self._num_skipped % 1000 == 0:  # no log flood
            logging.warning(
                "Skipping corrupt record %d (%d skipped so far on this process): %s",
                example.index,
                self._num_skipped,
                example.reason,
            )

    def get_state(self) -> dict[str, int]:
        return dict(next_index=self._next_index, num_skipped=self._num_skipped, **self._settings)

    def set_state(self, state: dict[str, int]) -> None:
        for name in {*self._settings, "buckets"}:
            saved, value = state.get(name, ""), self._settings.get(name, "")
            if saved != value:
                raise ValueError(
                    f"Iterator state was saved with {name}={saved!r}, this pipeline "
                    f"has {name}={value!r}; it would not resume the same stream"
                )
        self._close_upstream()
        self._next_index = int(state["next_index"])
        self._num_skipped = int(state["num_skipped"])

    def start_prefetch(self) -> None:
        if self._upstream is None:
            self._upstream = self._make_upstream()
        self._upstream.start_prefetch()

    def _close_upstream(self) -> None:
        if self._upstream is not None:
            self._upstream.close()
            self._upstream = None

    def close(self) -> None:
        self._close_upstream()
        super().close()

    def __str__(self) -> str:
        return f"DataIterator(batch_size={self._batch_size}, {self._settings})"


def make_pipeline(
    source,
    *,
    batch_size: int,
    resolution: int,
    low_resolution: int | None = None,
    seed: int,
    shuffle: bool = True,
    num_epochs: int | None = None,
    process_index: int | None = None,
    process_count: int | None = None,
    random_crop: bool = False,
    worker_count: int = 0,
    drop_remainder: bool = True,
    low_res_method: str = "bicubic",  # bicubic | box
    read_threads: int = 8,
    size_crop: bool = False,
    buckets: Sequence[tuple[int, int]] = (),
    prune_buckets: bool = False,
) -> DataIterator:
    """An iterator of this process's batches of one stage.

    Each batch is a dict of numpy arrays: "image" uint8 [B, R, R, 3] (R = `resolution`),
    "caption" and "key" object arrays [B] of Python str, and for a super-resolution stage
    (`low_resolution` r set) "low_res" uint8 [B, r, r, 3], downsampled from "image".

    Args:
      source: a random-access source of {"image", "caption", "key"} records (sources.py).
      batch_size: examples per batch on this process.
      resolution: side of the square training image.
      low_resolution: side of "low_res"; None for a base stage.
      seed: the data seed: shuffle order and random crops.
      shuffle: reshuffle every epoch; False reads the source in order.
      num_epochs: passes over the source; None for an endless stream.
      process_index, process_count: this process's shard; default jax.process_index()
        and jax.process_count().
      random_crop: random (seeded, per record and epoch) instead of centre square crops.
      worker_count: grain worker processes for loading; 0 loads in this process with
        `read_threads` threads; `AUTO_WORKERS` (-1) by the host's cores
        (`auto_worker_count`). Batches do not depend on it.
      drop_remainder: drop the last, short batch of a finite stream.
      low_res_method: the downsampling filter of "low_res" (preprocess.py).
      read_threads: threads per process reading and preprocessing records.
      size_crop: examples also carry "size_crop" int32 [6], each image's original size,
        crop corner and target size (SDXL's micro-conditioning, `preprocess.size_crop_ids`).
      buckets: aspect-ratio buckets ((height, width), ...): every image is cropped to the
        bucket nearest its aspect ratio and every global batch is of one bucket
        (`buckets.py`; then `resolution` is not used). Base stages only.
      prune_buckets: pass over buckets with fewer images than a global batch (their
        images go to the nearest bucket left) instead of refusing them: for buckets made
        from a pixel budget (`data.buckets="auto"`), most of which a data set leaves short.
    """
    process_index = jax.process_index() if process_index is None else process_index
    process_count = jax.process_count() if process_count is None else process_count
    if resolution < 1:
        raise ValueError(f"resolution={resolution}; expected >= 1")
    if low_resolution is not None and not 0 < low_resolution < resolution:
        raise ValueError(f"low_resolution={low_resolution}; expected 0 < it < {resolution}")
    if low_res_method not in LOW_RES_METHODS:
        raise ValueError(f"low_res_method={low_res_method!r}; one of {sorted(LOW_RES_METHODS)}")
    if buckets:
        if low_resolution is not None:
            raise ValueError("aspect-ratio buckets are for base stages; low_resolution is set")
        plan = BucketPlan(
            buckets,
            record_shapes(source, threads=read_threads),
            global_batch=batch_size * process_count,
            seed=seed,
            shuffle=shuffle,
            prune=prune_buckets,
        )
        logging.info(
            "Aspect-ratio buckets (images each): %s; %d global batches an epoch%s",
            plan.describe(),
            plan.batches_per_epoch,
            f"; {plan.num_unreadable} unreadable images left out" if plan.num_unreadable else "",
        )
        examples = bucket_stream(
            source,
            plan,
            seed=seed,
            num_epochs=num_epochs,
            process_index=process_index,
            process_count=process_count,
            random_crop=random_crop,
            size_crop=size_crop,
        )
    else:
        examples = example_stream(
            source,
            resolution=resolution,
            low_resolution=low_resolution,
            low_res_method=low_res_method,
            seed=seed,
            shuffle=shuffle,
            num_epochs=num_epochs,
            process_index=process_index,
            process_count=process_count,
            random_crop=random_crop,
            size_crop=size_crop,
        )
    return DataIterator(
        examples,
        batch_size=batch_size,
        drop_remainder=drop_remainder,
        worker_count=worker_count,
        read_threads=read_threads,
        seed=seed,
        process_index=process_index,
        process_count=process_count,
        buckets=format_buckets(buckets),
    )
