"""Input pipeline throughput: images/s of `make_pipeline` over each source, on this CPU.

Writes --num_images synthetic --image_size px JPEGs with captions into a temp dir (as an
image folder and as tar shards of --per_shard records), then times batches of
--batch at --resolution (plus --low_resolution, if set) through the grain pipeline,
for each source and each --workers value (0: threads in this process). A `serial` row
gives the same decode + preprocess in a plain loop, one record at a time, for reference.
--min_decode_size=R (R = --resolution) lets the sources decode JPEGs at a reduced scale.

    python bench/data_pipeline.py --workers=0,2 > results.jsonl

Prints one JSON line per (source, worker_count): images_per_s is the median over
--repeats timings of --batches batches each, after a warm-up batch (which also starts
the worker processes).
"""

from __future__ import annotations

import argparse
import io
import json
import os
import platform
import statistics
import tarfile
import tempfile
import time

import grain
import jax
import numpy as np
import PIL
from PIL import Image

from imagen_jax.data import (
    ImageFolderSource,
    ShapesSource,
    TarShardSource,
    make_pipeline,
    preprocess_record,
)


def synthetic_jpeg(seed: int, size: int) -> bytes:
    """A photo-like JPEG: smooth colour fields plus texture noise (not flat, not white noise)."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:size, 0:size] / size
    waves = [
        np.sin(rng.uniform(2, 9) * (a * x + b * y) + c) for a, b, c in rng.uniform(-1, 1, (3, 3))
    ]
    image = 128 + 90 * np.stack(waves, -1) + rng.normal(0, 12, (size, size, 3))
    buf = io.BytesIO()
    Image.fromarray(np.clip(image, 0, 255).astype(np.uint8)).save(buf, "JPEG", quality=90)
    return buf.getvalue()


def write_data(root: str, args) -> None:
    """root/folder/<d>/<key>.jpg + .txt, and root/shards/shard-*.tar of the same records."""
    records = []
    for i in range(args.num_images):
        key = f"{i % 10}/img{i:06d}"
        records.append((key, synthetic_jpeg(i, args.image_size), f"synthetic image {i}".encode()))
        os.makedirs(os.path.join(root, "folder", key.split("/")[0]), exist_ok=True)
        for ext, data in (("jpg", records[-1][1]), ("txt", records[-1][2])):
            with open(os.path.join(root, "folder", f"{key}.{ext}"), "wb") as f:
                f.write(data)
    os.makedirs(os.path.join(root, "shards"))
    for start in range(0, len(records), args.per_shard):
        shard = os.path.join(root, "shards", f"shard-{start // args.per_shard:05d}.tar")
        with tarfile.open(shard, "w") as tar:
            for key, jpeg, caption in records[start : start + args.per_shard]:
                for ext, data in (("jpg", jpeg), ("txt", caption)):
                    info = tarfile.TarInfo(f"{key}.{ext}")
                    info.size = len(data)
                    tar.addfile(info, io.BytesIO(data))


# name -> builder(data root, args) -> source. Plug the shapes source in here when it lands:
#   "shapes": lambda root, args: ShapesSource(...),  # the imagen_jax.data wrapper of shapes
SOURCE_BUILDERS = {
    "folder": lambda root, args: ImageFolderSource(
        os.path.join(root, "folder"), min_decode_size=args.min_decode_size
    ),
    "tar": lambda root, args: TarShardSource(
        os.path.join(root, "shards", "*.tar"), min_decode_size=args.min_decode_size
    ),
    # Procedural scenes rendered at the image size (no files to decode).
    "shapes": lambda root, args: ShapesSource(size=args.num_images, resolution=args.image_size),
}


def bench_pipeline(source, args, worker_count: int) -> float:
    """Median seconds for --batches batches."""
    it = make_pipeline(
        source,
        batch_size=args.batch,
        resolution=args.resolution,
        low_resolution=args.low_resolution,
        seed=0,
        random_crop=True,
        worker_count=worker_count,
        read_threads=args.read_threads,
        process_index=0,
        process_count=1,
    )
    try:
        next(it)  # warm-up: worker start-up, first reads
        times = []
        for _ in range(args.repeats):
            start = time.perf_counter()
            for _ in range(args.batches):
                next(it)
            times.append(time.perf_counter() - start)
    finally:
        it.close()
    return statistics.median(times)


def bench_serial(source, args) -> float:
    """Seconds for --batches * --batch records, decoded and preprocessed one by one."""
    n = args.batches * args.batch
    start = time.perf_counter()
    for i in range(n):
        preprocess_record(
            source[i % len(source)], resolution=args.resolution, low_resolution=args.low_resolution
        )
    return time.perf_counter() - start


def _env():
    return dict(
        machine=platform.processor() or platform.machine(),
        cpu_count=os.cpu_count(),
        python=platform.python_version(),
        grain=grain.__version__,
        jax=jax.__version__,
        numpy=np.__version__,
        pillow=PIL.__version__,
    )


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--num_images", type=int, default=500)
    parser.add_argument("--image_size", type=int, default=256)
    parser.add_argument("--per_shard", type=int, default=100)
    parser.add_argument("--resolution", type=int, default=64)
    parser.add_argument("--low_resolution", type=int, default=None)
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--batches", type=int, default=20)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--workers", default="0", help="comma-separated worker counts")
    parser.add_argument("--read_threads", type=int, default=8)
    parser.add_argument(
        "--min_decode_size", type=int, default=None, help="JPEG reduced-scale decoding"
    )
    parser.add_argument("--sources", default=",".join(SOURCE_BUILDERS))
    args = parser.parse_args()

    with tempfile.TemporaryDirectory() as root:
        write_data(root, args)
        settings = dict(
            num_images=args.num_images,
            image_size=args.image_size,
            resolution=args.resolution,
            low_resolution=args.low_resolution,
            batch=args.batch,
            batches=args.batches,
            read_threads=args.read_threads,
            min_decode_size=args.min_decode_size,
        )
        for name in args.sources.split(","):
            source = SOURCE_BUILDERS[name](root, args)
            runs = [("serial", None)] + [("pipeline", int(w)) for w in args.workers.split(",")]
            for mode, worker_count in runs:
                if mode == "serial":
                    seconds = bench_serial(source, args)
                else:
                    seconds = bench_pipeline(source, args, worker_count)
                record = dict(
                    bench="data_pipeline",
                    source=name,
                    mode=mode,
                    worker_count=worker_count,
                    **settings,
                    seconds=seconds,
                    images_per_s=args.batches * args.batch / seconds,
                    **_env(),
                )
                print(json.dumps(record), flush=True)


if __name__ == "__main__":
    main()
