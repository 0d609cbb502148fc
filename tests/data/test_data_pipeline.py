"""The grain pipeline: batches, determinism, resume, per-process shards, skips, workers."""

import json
import os

import grain
import numpy as np
import pytest
from PIL import Image

from imagen_jax.data import ImageFolderSource, TarShardSource, make_pipeline
from imagen_jax.data.pipeline import AUTO_WORKERS, auto_worker_count

N = 12  # records in the default data set


@pytest.fixture
def source(tmp_path, dataset):
    return ImageFolderSource(dataset(N).write_folder(tmp_path))


def pipeline(source, **kwargs):
    kwargs = dict(batch_size=4, resolution=16, seed=0, process_index=0, process_count=1) | kwargs
    return make_pipeline(source, **kwargs)


def take(it, n):
    return [next(it) for _ in range(n)]


def keys(batches):
    return [k for b in batches for k in b["key"]]


def assert_same_batches(a, b):
    assert len(a) == len(b)
    for x, y in zip(a, b, strict=True):
        assert x.keys() == y.keys()
        for name in x:
            np.testing.assert_array_equal(x[name], y[name])


def test_batch_shapes_and_dtypes(source):
    batch = next(pipeline(source, resolution=16, low_resolution=8))
    assert batch["image"].shape == (4, 16, 16, 3) and batch["image"].dtype == np.uint8
    assert batch["low_res"].shape == (4, 8, 8, 3) and batch["low_res"].dtype == np.uint8
    for name in ("caption", "key"):
        assert batch[name].shape == (4,) and batch[name].dtype == object
        assert all(isinstance(s, str) for s in batch[name])
    assert all(c.startswith("caption ") for c in batch["caption"])


def test_low_res_is_the_downsampled_target(source):
    batch = next(pipeline(source, resolution=16, low_resolution=4, random_crop=True))
    for image, low_res in zip(batch["image"], batch["low_res"], strict=True):
        want = np.asarray(Image.fromarray(image).resize((4, 4), Image.Resampling.BICUBIC))
        np.testing.assert_array_equal(low_res, want)
        block_means = image.reshape(4, 4, 4, 4, 3).mean((1, 3))
        assert np.abs(low_res - block_means).mean() < 8


def test_same_seed_same_batches_other_seed_other_order(source):
    a = take(pipeline(source, seed=3, random_crop=True), 6)
    assert_same_batches(a, take(pipeline(source, seed=3, random_crop=True), 6))
    assert keys(take(pipeline(source, seed=4), 6)) != keys(a)
    unshuffled = keys(take(pipeline(source, shuffle=False), 3))
    assert unshuffled == [source[i]["key"] for i in range(N)]


def test_each_epoch_is_a_new_permutation(source):
    order = keys(take(pipeline(source, num_epochs=3), 9))
    epochs = [order[i * N : (i + 1) * N] for i in range(3)]
    assert all(sorted(e) == sorted(order[:N]) for e in epochs)
    assert epochs[0] != epochs[1] != epochs[2]
    with pytest.raises(StopIteration):
        next(pipeline(source, num_epochs=1, batch_size=N + 1))


def test_restored_iterator_yields_the_same_next_batches(tmp_path, dataset):
    data = dataset(N).add("d1/broken", b"GIF89a broken", ext="png")  # one skip per epoch
    source = ImageFolderSource(data.write_folder(tmp_path))
    kwargs = dict(batch_size=5, random_crop=True, low_resolution=8, seed=7)
    it = pipeline(source, **kwargs)
    take(it, 4)
    state = json.loads(json.dumps(it.get_state()))
    expected = take(it, 5)
    restored = pipeline(source, **kwargs)
    next(restored)  # its own position is overwritten
    restored.set_state(state)
    assert restored.num_skipped == state["num_skipped"]
    assert_same_batches(take(restored, 5), expected)
    assert restored.num_skipped == it.num_skipped > 0
    with pytest.raises(ValueError, match="process_count"):
        pipeline(source, process_count=2, **kwargs).set_state(state)


def test_grain_checkpoint_handler_round_trip(source, tmp_path):
    it = pipeline(source)
    take(it, 2)
    (tmp_path / "ckpt").mkdir()  # Orbax makes it, then calls the handler.
    grain.checkpoint.CheckpointHandler().save(tmp_path / "ckpt", it)
    expected = take(it, 3)
    restored = grain.checkpoint.CheckpointHandler().restore(tmp_path / "ckpt", pipeline(source))
    assert_same_batches(take(restored, 3), expected)


def test_processes_cover_each_example_once_per_epoch(tmp_path, dataset):
    source = ImageFolderSource(dataset(13).write_folder(tmp_path))  # odd: 13 = 2 * 6 + 1
    shards = [
        keys(pipeline(source, batch_size=1, num_epochs=1, process_index=i, process_count=2))
        for i in range(2)
    ]
    assert len(shards[0]) == len(shards[1]) == 6  # the global stream is cut to 2 * 6
    assert not set(shards[0]) & set(shards[1])
    # Endless stream: the first epoch's 13 positions split 7 + 6 cover every record once.
    endless = [pipeline(source, batch_size=1, process_index=i, process_count=2) for i in range(2)]
    first_epoch = keys(take(endless[0], 7)) + keys(take(endless[1], 6))
    assert sorted(first_epoch) == sorted(source[i]["key"] for i in range(13))


def test_global_batch_does_not_depend_on_the_process_count(source):
    one = keys(take(pipeline(source, batch_size=4), 3))
    halves = [pipeline(source, batch_size=2, process_index=i, process_count=2) for i in range(2)]
    two = [keys(take(half, 3)) for half in halves]
    for step in range(3):
        global_batch = two[0][2 * step : 2 * step + 2] + two[1][2 * step : 2 * step + 2]
        assert sorted(global_batch) == sorted(one[4 * step : 4 * step + 4])


def test_corrupt_records_are_skipped_counted_and_logged(tmp_path, dataset, caplog):
    good = dataset(1).records["d0/img000"][0]
    data = dataset(N).add("bad", b"not an image").add("d2/cut", good[: len(good) // 2])
    source = ImageFolderSource(data.write_folder(tmp_path))
    it = pipeline(source, num_epochs=2, batch_size=5, drop_remainder=False)
    with caplog.at_level("WARNING"):
        seen = keys(list(it))
    assert sorted(seen) == sorted(2 * list(data.images))
    assert it.num_skipped == it.get_state()["num_skipped"] == 4
    assert sum("bad.png" in r.getMessage() for r in caplog.records) == 2
    assert sum("cut.png" in r.getMessage() for r in caplog.records) == 2


def by_key(batch, name="image"):
    return dict(zip(batch["key"], batch[name], strict=True))


def num_different(a, b):
    assert a.keys() == b.keys()
    return sum(not np.array_equal(a[k], b[k]) for k in a)


def test_random_crop_depends_on_seed_record_and_epoch_only(tmp_path, dataset):
    source = ImageFolderSource(dataset(N, sizes=((16, 40),)).write_folder(tmp_path))
    crop = dict(random_crop=True, batch_size=N)
    first, second = (by_key(b) for b in take(pipeline(source, seed=1, **crop), 2))  # 2 epochs
    halves = {}
    for i in range(2):
        shard = dict(batch_size=N // 2, process_index=i, process_count=2)
        halves |= by_key(next(pipeline(source, seed=1, **crop | shard)))
    assert num_different(first, halves) == 0  # whichever process reads the record
    assert num_different(first, second) > N // 2  # a new epoch draws new crops
    assert num_different(first, by_key(next(pipeline(source, seed=2, **crop)))) > N // 2
    assert num_different(first, by_key(next(pipeline(source, seed=1, batch_size=N)))) > N // 2


def test_tar_pipeline_equals_folder_pipeline(tmp_path, dataset):
    data = dataset(N)
    folder = ImageFolderSource(data.write_folder(tmp_path / "folder"))
    tar = TarShardSource(data.write_shards(tmp_path / "shards", per_shard=5))
    kwargs = dict(low_resolution=8, random_crop=True, seed=5)
    assert_same_batches(take(pipeline(folder, **kwargs), 5), take(pipeline(tar, **kwargs), 5))


def test_worker_processes_give_the_same_batches_and_resume(source):
    kwargs = dict(random_crop=True, seed=2)
    expected = take(pipeline(source, **kwargs), 6)
    it = pipeline(source, worker_count=2, **kwargs)
    try:
        assert_same_batches(take(it, 3), expected[:3])
        it.set_state(json.loads(json.dumps(it.get_state())))
        assert_same_batches(take(it, 3), expected[3:])
    finally:
        it.close()


def test_worker_count_by_the_cores(source, monkeypatch):
    """None on small hosts (the train step needs the cores), half the cores past 4, at most
    8; the configs' default (-1) takes it and reads the same batches."""
    got = [auto_worker_count(c) for c in (1, 2, 4, 6, 8, 16, 24, 64)]
    assert got == [0, 0, 0, 1, 2, 6, 8, 8]
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: set(range(4)), raising=False)
    it = pipeline(source, worker_count=AUTO_WORKERS, seed=3)
    assert it._worker_count == 0
    assert_same_batches(take(it, 2), take(pipeline(source, seed=3), 2))
    with pytest.raises(ValueError, match="worker_count=-2"):
        pipeline(source, worker_count=-2)


def test_bad_settings_raise(source):
    with pytest.raises(ValueError, match="low_resolution"):
        pipeline(source, resolution=16, low_resolution=16)
    with pytest.raises(ValueError, match="process_index"):
        pipeline(source, process_index=2, process_count=2)
    with pytest.raises(ValueError, match="low_res_method"):
        pipeline(source, low_resolution=8, low_res_method="nearest")
