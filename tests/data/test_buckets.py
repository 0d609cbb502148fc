"""Aspect-ratio buckets (data/buckets.py, `make_pipeline(buckets=...)`): every image goes to
the bucket nearest its aspect ratio, every global batch is of one bucket, an epoch reads
each image of a bucket once (but the last short batch), two processes read the halves of
the one-process batches, a restored iterator goes on with the same batches, and bad input
(a malformed or repeated bucket, a bucket with fewer images than a batch, a state saved
with other buckets) is named."""

import numpy as np
import pytest
from conftest import Dataset, encode, make_image

from imagen_jax import data as data_lib
from imagen_jax.data.buckets import BucketPlan, nearest_bucket, parse_buckets

# (height, width) of the data set's images: 10 of each
SIZES = ((24, 40), (40, 24), (32, 32))
BUCKETS = "16x24,24x16,20x20"
SHAPE_OF = {(24, 40): (16, 24), (40, 24): (24, 16), (32, 32): (20, 20)}


def _pipeline(root, *, batch_size=4, process_index=0, process_count=1, **kw):
    return data_lib.make_pipeline(
        data_lib.ImageFolderSource(str(root)),
        batch_size=batch_size,
        resolution=20,
        seed=3,
        process_index=process_index,
        process_count=process_count,
        buckets=parse_buckets(BUCKETS),
        **kw,
    )


@pytest.fixture
def folder(tmp_path):
    data = Dataset(30, sizes=SIZES)
    return data.write_folder(tmp_path / "data"), data


def test_parse_buckets_and_nearest_bucket():
    assert parse_buckets("1024x1024, 896x1152,1152x896") == ((1024, 1024), (896, 1152), (1152, 896))
    assert parse_buckets("") == ()
    with pytest.raises(ValueError, match="'896by1152' is not HEIGHTxWIDTH"):
        parse_buckets("1024x1024,896by1152")
    with pytest.raises(ValueError, match="'64x64' is given twice"):
        parse_buckets("64x64,64x64")
    buckets = parse_buckets("64x64,48x80,80x48")
    assert nearest_bucket(480, 640, buckets) == 1  # 0.75 is nearer 0.6 than 1 in log ratio
    assert nearest_bucket(640, 600, buckets) == 0
    assert nearest_bucket(1000, 500, buckets) == 2


def test_every_batch_is_of_one_bucket_and_an_epoch_reads_each_image_once(folder):
    root, data = folder
    it = _pipeline(root, size_crop=True, random_crop=True)
    seen = []
    for _ in range(6):  # 10 images a bucket: 2 batches of 4 each, 6 an epoch
        batch = next(it)
        shapes = {SHAPE_OF[data.images[k].shape[:2]] for k in batch["key"]}
        assert len(shapes) == 1
        (h, w) = shapes.pop()
        assert batch["image"].shape == (4, h, w, 3)
        assert (batch["size_crop"][:, 4:] == (h, w)).all()  # the bucket is the target size
        for key, ids in zip(batch["key"], batch["size_crop"], strict=True):
            assert tuple(ids[:2]) == data.images[key].shape[:2]
        seen += list(batch["key"])
    assert len(seen) == len(set(seen)) == 24
    # each bucket leaves 2 of its 10 images for this epoch
    for size in SIZES:
        assert sum(data.images[k].shape[:2] == size for k in seen) == 8


def test_two_processes_read_the_halves_of_one_process_batches(folder):
    root, _ = folder
    whole = _pipeline(root, batch_size=4, random_crop=True)
    halves = [
        _pipeline(root, batch_size=2, process_index=i, process_count=2, random_crop=True)
        for i in range(2)
    ]
    for _ in range(8):  # into the second epoch
        want = next(whole)
        parts = [next(h) for h in halves]
        assert list(want["key"]) == [*parts[0]["key"], *parts[1]["key"]]
        np.testing.assert_array_equal(want["image"], np.concatenate([p["image"] for p in parts]))


def test_a_restored_iterator_goes_on_with_the_same_batches(folder):
    root, _ = folder
    it = _pipeline(root)
    for _ in range(3):
        next(it)
    state = it.get_state()
    want = [next(it) for _ in range(5)]
    again = _pipeline(root)
    again.set_state(state)
    for a, b in zip(want, [next(again) for _ in range(5)], strict=True):
        assert list(a["key"]) == list(b["key"])
        np.testing.assert_array_equal(a["image"], b["image"])
    square = data_lib.make_pipeline(
        data_lib.ImageFolderSource(str(root)), batch_size=4, resolution=20, seed=3
    )
    with pytest.raises(ValueError, match="buckets="):
        square.set_state(state)


def test_a_corrupt_image_in_a_bucket_leaves_the_batch_its_shape(folder, tmp_path):
    root, _ = folder
    path = next(root.glob("d0/img000.png"))
    path.write_bytes(path.read_bytes()[: len(path.read_bytes()) // 2])  # header kept
    (root / "broken.png").write_bytes(b"not an image")  # no header: left out
    (root / "broken.txt").write_text("x")
    it = _pipeline(root, batch_size=5)  # 2 batches a bucket: every image read in an epoch
    batches = [next(it) for _ in range(6)]
    assert it.num_skipped == 1
    assert all(len(b["key"]) == 5 for b in batches)
    assert sum("d0/img000" in b["key"] for b in batches) == 0
    assert sum(len(set(b["key"])) == 4 for b in batches) == 1  # a copy took its place


def test_a_bucket_with_fewer_images_than_a_batch_is_named(tmp_path):
    data = Dataset(12, sizes=SIZES)
    data.add("wide", encode(make_image(9, 10, 40)), caption="w")
    root = data.write_folder(tmp_path / "data")
    with pytest.raises(ValueError, match="bucket 8x32 holds 1 images, fewer than a global batch"):
        data_lib.make_pipeline(
            data_lib.ImageFolderSource(str(root)),
            batch_size=4,
            resolution=20,
            seed=0,
            buckets=parse_buckets(BUCKETS + ",8x32"),
        )


def test_plans_depend_on_the_seed_and_epoch_only():
    shapes = [(24, 40)] * 9 + [(32, 32)] * 7
    a = BucketPlan(parse_buckets(BUCKETS), shapes, global_batch=3, seed=1)
    b = BucketPlan(parse_buckets(BUCKETS), shapes, global_batch=3, seed=1)
    assert a.batches_per_epoch == 3 + 2
    assert [a.lookup(p) for p in range(40)] == [b.lookup(p) for p in range(40)]
    c = BucketPlan(parse_buckets(BUCKETS), shapes, global_batch=3, seed=2)
    assert [a.lookup(p) for p in range(15)] != [c.lookup(p) for p in range(15)]
    first, second = a.epoch(0), a.epoch(1)
    assert not np.array_equal(first[1], second[1])  # reshuffled every epoch


def test_pixel_budget_buckets_as_sdxl_made_its_own():
    """Every width a multiple of 64 with the tallest height within 1024^2 pixels, ratios up
    to 4: SDXL's square, 1152x896 and 1344x768 among them, none over the budget."""
    buckets = parse_buckets("auto", resolution=1024)
    assert {(1024, 1024), (1152, 896), (896, 1152), (1344, 768), (2048, 512)} <= set(buckets)
    assert all(h * w <= 1024**2 and h % 64 == 0 == w % 64 for h, w in buckets)
    assert all(max(h, w) <= 4 * min(h, w) for h, w in buckets)
    assert buckets == tuple((w, h) for h, w in reversed(buckets))  # wide mirror tall
    assert parse_buckets("auto:32", resolution=64) == ((128, 32), (64, 64), (32, 128))
    with pytest.raises(ValueError, match="needs data.resolution"):
        parse_buckets("auto")
    with pytest.raises(ValueError, match="'auto' or 'auto:STEP'"):
        parse_buckets("auto:x", resolution=64)


def test_buckets_a_batch_cannot_fill_are_passed_over_when_pruned():
    """With `prune` (data.buckets=auto), the shortest bucket under a global batch gives its
    images to the nearest bucket left, until none is short; without it, it is refused."""
    shapes = [(24, 40)] * 6 + [(32, 32)] * 6 + [(10, 40)] * 2
    buckets = parse_buckets(BUCKETS + ",8x32")
    with pytest.raises(ValueError, match="bucket 8x32 holds 2 images"):
        BucketPlan(buckets, shapes, global_batch=3, seed=0)
    plan = BucketPlan(buckets, shapes, global_batch=3, seed=0, prune=True)
    assert plan.passed_over == (3,)
    assert plan.counts == [8, 0, 6, 0]  # the two very wide images went to 16x24
    seen = [plan.lookup(p)[0] for p in range(plan.epoch_length)]  # 2 + 2 batches of 3
    assert len(set(seen)) == len(seen) == 12 and set(seen) <= set(range(14))


def test_a_pipeline_over_pixel_budget_buckets(folder):
    root, _ = folder
    buckets = parse_buckets("auto:8", resolution=24)
    assert buckets == ((32, 16), (24, 24), (16, 32))
    it = data_lib.make_pipeline(
        data_lib.ImageFolderSource(str(root)),
        batch_size=4,
        resolution=24,
        seed=3,
        buckets=buckets,
        prune_buckets=True,
    )
    shapes = {next(it)["image"].shape[1:3] for _ in range(6)}
    assert shapes == set(buckets)  # 24x40 -> 16x32, 40x24 -> 32x16, 32x32 -> 24x24
