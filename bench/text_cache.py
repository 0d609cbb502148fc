"""What a text-embedding cache saves per train step: the live text encoder against cache
lookups, each followed by the trainer's jitted step, in one process.

The config's batches are drawn from its input pipeline once, before timing (both sides
would pay the same for them). Side "encoder" is the trainer without a cache: encode the
captions (`loop.device_batch`), then the step. Side "cache" is the trainer with
`text.cache`: look the captions up (`input.CachedText`), then the step. A cache of the
batches' captions is built first with the config's encoder; the two sides' text must agree
within float16 rounding before anything is timed.

    python bench/text_cache.py                                    # shapes_base, MiniLM, batch 32
    python bench/text_cache.py --config=shapes_base:res=32 --batch=64 --repeats=5
    python bench/text_cache.py --runlocal                         # a fast smoke run

Prints one JSON line: median ms per step of each side (host batch prep + step, the step
waited for, as the trainer keeps one step in flight), the prep alone, and the saving.
"""

from __future__ import annotations

import argparse
import importlib
import itertools
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

from imagen_jax import training  # noqa: E402
from imagen_jax.text.cache import EmbeddingCache, build_cache  # noqa: E402
from imagen_jax.training import input as input_lib  # noqa: E402
from imagen_jax.training import loop, trainer  # noqa: E402


def load_config(name: str, batch: int):
    module, _, arg = name.partition(":")
    config = importlib.import_module(f"configs.{module}").get_config(arg or None)
    if batch:
        config.data.batch_size = batch
    config.data.shuffle = False
    return config


def check_same_text(cache: EmbeddingCache, encoder, captions) -> float:
    """Max abs difference of the two sides' embeddings; exits if beyond float16 rounding."""
    cached, cached_mask, _ = cache.lookup(captions)
    live, live_mask, _ = (np.asarray(x) for x in encoder.encode(captions))
    diff = float(np.abs(cached - live).max())
    if not (cached_mask == live_mask).all() or not np.allclose(cached, live, rtol=1e-3, atol=1e-3):
        raise SystemExit(f"cache and encoder disagree (max abs {diff:.2e}); not timing")
    return diff


def bench(args) -> dict:
    config = load_config("shapes_base:runlocal" if args.runlocal else args.config, args.batch)
    mesh = loop.make_mesh(config)
    with jax.set_mesh(mesh):
        net = loop.make_stage_network(config, mesh)
        encoder = trainer.stage_text_encoder(config, net)
        data = training.make_input(config)
        batches = [next(data) for _ in range(args.batches)]
        data.close()
        captions = [c for b in batches for c in b["caption"]]
        with tempfile.TemporaryDirectory() as directory:
            start = time.perf_counter()
            build_cache(directory, captions, encoder, dtype=args.dtype)
            build_s = time.perf_counter() - start
            cache = EmbeddingCache.open(directory, expect_fingerprint=encoder.fingerprint())
            max_diff = check_same_text(cache, encoder, captions[: config.data.batch_size])
            tx, lr_schedule = training.make_optimizer(config.optim, config.train.steps)
            state, shardings, rest = training.create_train_state(config, net, tx, mesh)
            step = training.make_train_step(config, net, tx, lr_schedule, mesh, shardings, rest)
            prep = {
                "encoder": lambda b: loop.device_batch(b, encoder, mesh),
                "cache": lambda b: loop.device_batch(
                    input_lib.with_cached_text(b, cache), encoder, mesh
                ),
            }
            times = {side: {"prep": [], "total": []} for side in prep}
            cycle = itertools.cycle(batches)
            for i in range(args.warmup + args.repeats):
                for side, fn in prep.items():  # the sides take turns
                    start = time.perf_counter()
                    batch = jax.block_until_ready(fn(next(cycle)))
                    mid = time.perf_counter()
                    state, metrics = step(state, rest, batch)
                    jax.block_until_ready(metrics)
                    if i >= args.warmup:
                        times[side]["prep"].append(mid - start)
                        times[side]["total"].append(time.perf_counter() - start)
    ms = {s: {k: 1e3 * statistics.median(v) for k, v in t.items()} for s, t in times.items()}
    saving = ms["encoder"]["total"] - ms["cache"]["total"]
    return dict(
        bench="text_cache",
        config=args.config if not args.runlocal else "shapes_base:runlocal",
        text=config.text.kind,
        max_length=cache.max_length,
        text_dim=cache.dim,
        batch=config.data.batch_size,
        res=config.model.resolution,
        cache_dtype=args.dtype,
        cache_rows=len(cache),
        cache_build_s=round(build_s, 2),
        max_abs_diff=max_diff,
        repeats=args.repeats,
        encoder_step_ms=round(ms["encoder"]["total"], 1),
        cache_step_ms=round(ms["cache"]["total"], 1),
        encoder_prep_ms=round(ms["encoder"]["prep"], 2),
        cache_prep_ms=round(ms["cache"]["prep"], 2),
        saving_ms=round(saving, 1),
        saving_pct=round(100 * saving / ms["encoder"]["total"], 1),
        loss=float(metrics["loss"]),
        devices=mesh.devices.size,
        device=jax.devices()[0].device_kind,
        backend=jax.default_backend(),
        jax=jax.__version__,
        cpu_count=os.cpu_count(),
        machine=platform.machine(),
    )


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--config", default="shapes_base", help="configs/<name>.py[:arg]")
    parser.add_argument("--batch", type=int, default=0, help="global batch; 0 = the config's")
    parser.add_argument("--runlocal", action="store_true", help="shapes_base:runlocal (smoke)")
    parser.add_argument("--dtype", default="float16", help="of the cache: float16 | float32")
    parser.add_argument("--batches", type=int, default=4, help="distinct batches, cycled")
    parser.add_argument("--warmup", type=int, default=1, help="untimed steps of each side")
    parser.add_argument("--repeats", type=int, default=5, help="timed steps of each side")
    args = parser.parse_args()
    print(json.dumps(bench(args)), flush=True)


if __name__ == "__main__":
    main()
