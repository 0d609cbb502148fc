"""Speed of the shapes domain on one CPU core: scene sampling, rendering and scoring.

    python bench/shapes_render.py --res 32 64 128 256 --images 500 --repeats 5

Draws a fixed set of scenes from the training mixture (seeded), then times, per resolution,
rendering every scene (`render`) and reading every rendered image back (`read_image`, the
scorer's cost; its templates are built in a warm-up pass first). Prints one JSON line per
resolution with medians over --repeats passes, and one for scene sampling. There is no
peer to compare with: the numbers say whether the renderer can feed a training job and
how long an evaluation of N images takes.

Single-threaded on purpose (a data loader runs one renderer per worker); the BLAS thread
count is pinned to 1 before numpy is imported.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import time

os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")
os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("MKL_NUM_THREADS", "1")

import numpy as np  # noqa: E402

from imagen_jax.shapes import scorer, tasks  # noqa: E402
from imagen_jax.shapes.render import render  # noqa: E402


def _cpu() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _median_seconds(fn, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--res", type=int, nargs="+", default=[32, 64, 128, 256])
    parser.add_argument("--images", type=int, default=500)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--score_images", type=int, default=200)
    args = parser.parse_args()
    common = {
        "bench": "shapes_render",
        "machine": _cpu(),
        "python": platform.python_version(),
        "numpy": np.__version__,
    }

    rng = np.random.default_rng(0)
    start = time.perf_counter()
    scenes = [tasks.sample_scene(rng)[0] for _ in range(args.images)]
    sample_s = time.perf_counter() - start  # includes one-off outline caches
    print(
        json.dumps({**common, "what": "sample_scene", "ms_per_scene": 1e3 * sample_s / len(scenes)})
    )

    for res in args.res:
        render_s = _median_seconds(lambda r=res: [render(s, r) for s in scenes], args.repeats)
        images = [render(s, res) for s in scenes[: args.score_images]]
        for image in images:  # warm-up: builds the templates for this resolution's sizes
            scorer.read_image(image)
        score_s = _median_seconds(
            lambda ims=images: [scorer.read_image(im) for im in ims], max(1, args.repeats // 2)
        )
        objects = sum(len(s.objects) for s in scenes) / len(scenes)
        print(
            json.dumps(
                {
                    **common,
                    "what": "render+read",
                    "res": res,
                    "images": len(scenes),
                    "objects_per_image": round(objects, 2),
                    "render_images_per_s": round(len(scenes) / render_s, 1),
                    "render_ms_per_image": round(1e3 * render_s / len(scenes), 3),
                    "read_images_per_s": round(len(images) / score_s, 1),
                    "read_ms_per_image": round(1e3 * score_s / len(images), 3),
                }
            )
        )


if __name__ == "__main__":
    main()
