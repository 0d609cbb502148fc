"""Images/s of the trainer's jitted train step (`imagen_jax.training.make_train_step`).

The step exactly as `train.py` runs it: CFG dropout, noise-conditioning augmentation for
super-resolution stages, the diffusion loss, gradient clipping, AdamW, the EMA, donated
state, on a mesh of all local devices. The batch is synthetic (random images and text
embeddings of the config's shapes), so the text encoder and the input pipeline are not
timed; see bench/text_encode.py and bench/data_pipeline.py for those.

    python bench/train_step.py                                # runlocal, shapes_base, shapes_sr
    python bench/train_step.py --configs=shapes_base --batch=64 --steps=20
    python bench/train_step.py --configs=shapes_mmdit      # the latent MMDiT, random latents
    python bench/train_step.py --configs=shapes_base_w22,shapes_mmdit,shapes_latent_w32  # same size

Prints one JSON line per config: the median over --repeats timings of --steps steps,
after a compiled warm-up step (`compile_s` is the first call: trace, compile, run).
"""

from __future__ import annotations

import argparse
import importlib
import json
import os
import platform
import statistics
import sys
import time

import jax
import numpy as np
from unet_train_step import xla_flops

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from imagen_jax import parallel, training  # noqa: E402
from imagen_jax.training import loop  # noqa: E402

LATENT_FACTOR = 4  # the shapes VAE's downsampling: 64 px scenes, 16 x 16 latents
CONFIGS = {  # name -> (config file, arg)
    "runlocal": ("shapes_base", "runlocal"),
    "runlocal_sr": ("shapes_sr", "runlocal"),
    "shapes_base": ("shapes_base", ""),
    "shapes_sr": ("shapes_sr", ""),
    "shapes_mmdit": ("shapes_mmdit", ""),
    "shapes_base_w22": ("shapes_base", "width=22"),  # the plain UNet of the MMDiT's size
    # the latent UNet of the MMDiT's size, with its objective (random latents)
    "shapes_latent_w32": ("shapes_latent", "width=32,layers=1,objective=flow"),
}


def synthetic_batch(config, net, batch: int, mesh, seed: int = 0):
    rng = np.random.default_rng(seed)
    res, low = config.model.resolution, config.model.low_resolution
    length = config.text.max_length or 77
    local = {
        "image": rng.integers(0, 256, (batch, res, res, 3), np.uint8),
        "text": rng.normal(size=(batch, length, net.cfg.text_dim)).astype(np.float32),
        "text_mask": np.arange(length)[None] < rng.integers(1, length + 1, (batch, 1)),
    }
    if low:
        local["low_res"] = rng.integers(0, 256, (batch, low, low, 3), np.uint8)
    if config.get("latent") is not None:  # a latent stage: the VAE's latents, as the
        side = res // LATENT_FACTOR  # trainer passes them (the shapes VAE's factor)
        shape = (batch, side, side, net.cfg.in_channels)
        local["latents"] = rng.normal(size=shape).astype(np.float32)
    return parallel.global_batch(local, mesh)


def trainer_step(config, mesh):
    """(network, the trainer's jitted step, a fresh state, rest, a synthetic global batch)
    of `config` on `mesh` (call inside `jax.set_mesh(mesh)`)."""
    net = training.make_network(config.model)
    tx, lr_schedule = training.make_optimizer(config.optim, config.train.steps)
    state, shardings, rest = training.create_train_state(config, net, tx, mesh)
    batch = synthetic_batch(config, net, config.data.batch_size, mesh)
    step = training.make_train_step(config, net, tx, lr_schedule, mesh, shardings, rest)
    return net, step, state, rest, batch


def bench(name: str, args) -> dict:
    module, arg = CONFIGS[name]
    config = importlib.import_module(f"configs.{module}").get_config(arg)
    if args.batch:
        config.data.batch_size = args.batch
    if args.dtype:
        config.model.dtype = args.dtype
    mesh = loop.make_mesh(config)
    with jax.set_mesh(mesh):
        net, step, state, rest, batch = trainer_step(config, mesh)
        start = time.perf_counter()
        state, metrics = step(state, rest, batch)
        jax.block_until_ready(metrics)
        compile_s = time.perf_counter() - start
        timings = []
        for _ in range(args.repeats):
            start = time.perf_counter()
            for _ in range(args.steps):
                state, metrics = step(state, rest, batch)
                jax.block_until_ready(metrics)  # as the trainer: one step in flight
            timings.append((time.perf_counter() - start) / args.steps)
        flops = xla_flops(step.lower(state, rest, batch))  # after the timed first call
    step_s = statistics.median(timings)
    params = sum(x.size for x in jax.tree.leaves(net.abstract_params))
    return dict(
        bench="train_step",
        config=name,
        variant=config.model.variant,
        params=int(params),
        batch=config.data.batch_size,
        res=config.model.resolution,
        low_res=config.model.low_resolution,
        text_len=int(batch["text"].shape[1]),
        dtype=config.model.dtype,
        devices=mesh.devices.size,
        compile_s=round(compile_s, 2),
        step_ms=round(1000 * step_s, 2),
        images_per_s=round(config.data.batch_size / step_s, 2),
        # XLA's cost analysis of the lowered step (every op, not only products), per image
        gflop_per_image=None if flops is None else round(flops / config.data.batch_size / 1e9, 3),
        loss=float(metrics["loss"]),
        device=jax.devices()[0].device_kind,
        backend=jax.default_backend(),
        jax=jax.__version__,
        cpu_count=os.cpu_count(),
        machine=platform.machine(),
    )


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--configs", default="runlocal,shapes_base,shapes_sr")
    parser.add_argument("--batch", type=int, default=0, help="global batch; 0 = the config's")
    parser.add_argument("--dtype", default="", help="model compute dtype; '' = the config's")
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    for name in args.configs.split(","):
        print(json.dumps(bench(name, args)), flush=True)


if __name__ == "__main__":
    main()
