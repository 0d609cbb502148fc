"""The training loop (`train.py`) against its step alone: how much of the step's speed a
real run keeps, and where the host's time goes.

For each config, in one process:

- `step`: the trainer's jitted step (bench/train_step.py's: the same function `train.py`
  compiles) on one fixed synthetic batch already on the devices, one step in flight as
  the loop keeps it; images/s is the step's ceiling.
- `loop`: `training.train_and_evaluate` on the config's own data (the shapes renderer,
  the frozen text encoder encoding every batch's captions, or the text cache), as
  `train.py` runs it, for `--steps` steps with metrics written every `--log_every`;
  images/s from its metrics.jsonl over the intervals after the first (the first holds
  the compile), and the host's time per step by phase (`metrics.HostTimes`: `data` from
  the input pipeline, `prepare` tokenizing, encoding and sharding, `dispatch`, `wait` for
  the device). Checkpoints and the sample grid are off (`checkpoint_every` past the end),
  so the loop is measured, not the disk.

A latent stage (`shapes_latent`: the SD-style UNet, `shapes_mmdit`: the SD3-style MMDiT,
both on the shipped shapes VAE, squares only) adds the VAE's encoding of the batch to both
sides, as the trainer runs it before each step. `--text_cache=N` draws the run's scenes
from N records (`data.size`), builds the text-embedding cache of their captions with the
config's encoder before anything is timed (float16, as `training.text_cache` writes it),
and trains from it: the loop then runs no text encoder.

    python bench/train_loop.py --configs=shapes_base,shapes_sr --steps=30 --log_every=10
    python bench/train_loop.py --configs=shapes_latent,shapes_mmdit --text_cache=4096

Prints one JSON line per config with both sides and `loop_over_step` (the issue's
target on a GPU: at least 0.8).
"""

from __future__ import annotations

import argparse
import importlib
import json
import os
import platform
import statistics
import sys
import tempfile
import time

import jax
import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from train_step import CONFIGS, trainer_step  # noqa: E402

from imagen_jax import training  # noqa: E402
from imagen_jax.training import latent_space, loop, text_cache  # noqa: E402
from imagen_jax.training.config import is_latent_stage  # noqa: E402
from imagen_jax.training.metrics import HostTimes  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SHIPPED_VAE = os.path.join(ROOT, "checkpoints", "shapes", "latent", "vae")
LATENT_CONFIGS = {  # name -> (config file, arg): the latent stages on the shipped VAE
    "shapes_latent": ("shapes_latent", f"vae={SHIPPED_VAE}"),
    "shapes_mmdit": ("shapes_mmdit", f"vae={SHIPPED_VAE},buckets="),
}


def make_config(name: str, args):
    module, arg = {**CONFIGS, **LATENT_CONFIGS}[name]
    config = importlib.import_module(f"configs.{module}").get_config(arg)
    if args.batch:
        config.data.batch_size = args.batch
    config.train.steps = args.steps
    config.train.log_every = args.log_every
    config.train.checkpoint_every = args.steps + 1  # the final step's checkpoint only
    config.train.sample_every = 0
    config.train.progress = False
    if args.worker_count is not None:
        config.data.worker_count = args.worker_count
    if "evals" in config:
        config.evals.every = 0
    if args.text_cache:
        config.data.size = args.text_cache
    return config


def time_step(config, args) -> float:
    """Seconds per step of the trainer's step alone (a latent stage's: the VAE's encoding
    of the batch, then the step), one step in flight."""
    mesh = loop.make_mesh(config)
    with jax.set_mesh(mesh):
        net, step, state, rest, batch = trainer_step(config, mesh)
        prepare = lambda batch, _: batch  # noqa: E731
        if is_latent_stage(config.model):
            prepare = latent_space.LatentSpace.from_config(config, net, mesh).encode_batch
        state, metrics = step(state, rest, prepare(batch, 0))
        jax.block_until_ready(metrics)
        timings = []
        for _ in range(args.repeats):
            start = time.perf_counter()
            previous = None
            for i in range(args.log_every):
                state, metrics = step(state, rest, prepare(batch, i))
                if previous is not None:
                    jax.block_until_ready(previous)
                previous = metrics
            jax.block_until_ready(previous)
            timings.append((time.perf_counter() - start) / args.log_every)
    return statistics.median(timings)


def time_loop(config, workdir: str) -> dict:
    """The loop's images/s and host phases per step, from its metrics.jsonl."""
    training.train_and_evaluate(config, workdir)
    with open(os.path.join(workdir, "metrics.jsonl")) as f:
        records = [json.loads(line) for line in f if line.strip()]
    records = [r for r in records if "images_per_s" in r][1:]  # the first holds the compile
    if not records:
        raise SystemExit("--steps must cover at least two --log_every intervals")
    phases = {
        f"host_{p}_ms": round(statistics.mean(r[f"host_{p}_ms"] for r in records), 2)
        for p in HostTimes.PHASES
    }
    images = statistics.median(r["images_per_s"] for r in records)
    return dict(images_per_s=round(images, 3), intervals=len(records), **phases)


def bench(name: str, args) -> dict:
    config = make_config(name, args)
    with tempfile.TemporaryDirectory() as tmp:
        if args.text_cache:
            config.text.cache = os.path.join(tmp, "text_cache")
            text_cache.build_text_cache(config, config.text.cache)
        load_before = os.getloadavg()[0]
        step_s = time_step(config, args)
        looped = time_loop(config, os.path.join(tmp, "run"))
    step_images = config.data.batch_size / step_s
    return dict(
        bench="train_loop",
        config=name,
        variant=config.model.variant,
        batch=config.data.batch_size,
        res=config.model.resolution,
        text=config.text.kind if "kind" in config.text else "",
        text_cache=args.text_cache,
        latent=is_latent_stage(config.model),
        worker_count=config.data.worker_count,
        steps=args.steps,
        log_every=args.log_every,
        step=dict(step_ms=round(1e3 * step_s, 2), images_per_s=round(step_images, 3)),
        loop=looped,
        loop_over_step=round(looped["images_per_s"] / step_images, 3),
        devices=jax.device_count(),
        device=jax.devices()[0].device_kind,
        backend=jax.default_backend(),
        jax=jax.__version__,
        cpu_count=os.cpu_count(),
        machine=platform.machine(),
        load_avg_before=round(load_before, 2),
        load_avg_after=round(os.getloadavg()[0], 2),
        date=time.strftime("%Y-%m-%d"),
        note=args.note,
    )


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--configs", default="shapes_base,shapes_sr")
    parser.add_argument("--batch", type=int, default=0, help="global batch; 0 = the config's")
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--log_every", type=int, default=10)
    parser.add_argument("--repeats", type=int, default=3, help="timings of the step alone")
    parser.add_argument(
        "--worker_count", type=int, default=None, help="data workers; default the config's"
    )
    parser.add_argument(
        "--text_cache",
        type=int,
        default=0,
        help="records to draw from, trained from a cache of their captions; 0 = no cache",
    )
    parser.add_argument("--note", default="")
    args = parser.parse_args()
    np.set_printoptions(precision=3)
    for name in args.configs.split(","):
        print(json.dumps(bench(name, args)), flush=True)


if __name__ == "__main__":
    main()
