"""Images/s of the contrastive train step, and the contrastive losses' cost against the
global batch, beside PyTorch computing the same loss on the same embeddings.

Two parts, one JSON line per setting:

* `step`: the jitted step exactly as `train.py` runs a two_towers config
  (`training.contrastive_step`: both towers, the SigLIP or CLIP loss over the global batch,
  hard-negative captions, AdamW, the EMA, donated state) on a mesh of all local devices, at
  each --batches global batch. The batch is synthetic (random images and frozen-encoder
  token embeddings of the config's shapes): the frozen text encoder's own cost is
  bench/text_encode.py's.
* `loss`: the loss alone, value and gradient with respect to both embeddings
  (`training.contrastive.contrastive_loss`), at each --loss_batches global batch, for the
  sigmoid and the softmax loss, against the same formula in PyTorch (SigLIP's Algorithm 1
  and CLIP's symmetric cross-entropy, eager, float32) on the same embeddings; the two losses
  are checked to agree before either is timed. The logits are [B, B]: time and memory grow
  with B squared, which the lines show.

    python bench/contrastive_step.py                           # shapes_embedding, CPU sizes
    python bench/contrastive_step.py --parts=loss --loss_batches=1024,4096,16384

Timings are medians over --repeats of --steps calls, after a compiled warm-up call.
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
import jax.numpy as jnp
import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from imagen_jax import parallel, training  # noqa: E402
from imagen_jax.training import contrastive_step, loop  # noqa: E402
from imagen_jax.training.contrastive import contrastive_loss  # noqa: E402


def machine() -> dict:
    return dict(
        device=jax.devices()[0].device_kind,
        backend=jax.default_backend(),
        devices=jax.device_count(),
        jax=jax.__version__,
        cpu_count=os.cpu_count(),
        machine=platform.machine(),
    )


def timed(fn, steps: int, repeats: int) -> tuple[float, float]:
    """(first call's seconds, median seconds per call over the repeats)."""
    start = time.perf_counter()
    jax.block_until_ready(fn())
    first = time.perf_counter() - start
    timings = []
    for _ in range(repeats):
        start = time.perf_counter()
        for _ in range(steps):
            jax.block_until_ready(fn())
        timings.append((time.perf_counter() - start) / steps)
    return first, statistics.median(timings)


def synthetic_batch(config, net, batch: int, mesh, seed: int = 0):
    rng = np.random.default_rng(seed)
    res, length, dim = config.model.resolution, config.text.max_length, net.text_dim

    def tokens():
        mask = np.arange(length)[None] < rng.integers(4, length + 1, (batch, 1))
        return rng.normal(size=(batch, length, dim)).astype(np.float32), mask

    local = {"image": rng.integers(0, 256, (batch, res, res, 3), np.uint8)}
    local["text"], local["text_mask"] = tokens()
    if config.contrastive.hard_negatives:
        local["counter_text"], local["counter_mask"] = tokens()
        local["has_counterfactual"] = rng.random(batch) < 0.8
    return parallel.global_batch(local, mesh)


def bench_step(args, batch: int) -> dict:
    module, _, arg = args.config.partition(":")
    config = importlib.import_module(f"configs.{module}").get_config(arg or None)
    config.data.batch_size = batch
    mesh = loop.make_mesh(config)
    with jax.set_mesh(mesh):
        net = training.make_network(config.model)
        tx, lr_schedule = contrastive_step.make_optimizer(config, net)
        state, shardings, rest = training.create_train_state(config, net, tx, mesh)
        data = synthetic_batch(config, net, batch, mesh)
        step = contrastive_step.make_contrastive_train_step(
            config, net, tx, lr_schedule, mesh, shardings, rest
        )
        holder = {"state": state}

        def call():
            holder["state"], metrics = step(holder["state"], rest, data)
            return metrics

        first, step_s = timed(call, args.steps, args.repeats)
        metrics = call()
    params = sum(x.size for x in jax.tree.leaves(net.abstract_params))
    return dict(
        bench="contrastive_step",
        part="step",
        config=args.config,
        loss_kind=config.contrastive.loss,
        hard_negatives=bool(config.contrastive.hard_negatives),
        params=int(params),
        batch=batch,
        res=config.model.resolution,
        text_len=config.text.max_length,
        compile_s=round(first, 2),
        step_ms=round(1000 * step_s, 2),
        images_per_s=round(batch / step_s, 1),
        loss=float(metrics["loss"]),
        **machine(),
    )


def torch_loss(kind: str, image, text, scale: float, bias: float):
    """The same loss in PyTorch (value and gradient with respect to both embeddings)."""
    import torch

    x = torch.tensor(image, requires_grad=True)
    y = torch.tensor(text, requires_grad=True)

    def run():
        x.grad = y.grad = None
        logits = np.exp(scale) * x @ y.T
        if kind == "sigmoid":
            labels = 2 * torch.eye(len(x)) - 1
            loss = -torch.nn.functional.logsigmoid(labels * (logits + bias)).sum() / len(x)
        else:
            target = torch.arange(len(x))
            ce = torch.nn.functional.cross_entropy
            loss = 0.5 * (ce(logits, target) + ce(logits.T, target))
        loss.backward()
        return loss.detach()

    return run


def bench_loss(args, kind: str, batch: int, dim: int = 128) -> dict:
    import torch

    torch.set_num_threads(os.cpu_count() or 1)
    rng = np.random.default_rng(batch)

    def unit(a):
        return (a / np.linalg.norm(a, axis=-1, keepdims=True)).astype(np.float32)

    image = unit(rng.normal(size=(batch, dim)))
    text = unit(image + 0.5 * rng.normal(size=(batch, dim)))
    scale, bias = float(np.log(10.0)), -10.0
    mesh = parallel.make_mesh([("data", -1)])
    sharding = parallel.batch_sharding(mesh)
    x, y = jax.device_put(image, sharding), jax.device_put(text, sharding)
    s, b = jnp.asarray([scale]), jnp.asarray([bias]) if kind == "sigmoid" else None

    def objective(x, y):
        return contrastive_loss(kind, x, y, logit_scale=s, logit_bias=b, mesh=mesh)

    grad = jax.jit(jax.value_and_grad(objective, argnums=(0, 1)))
    start = time.perf_counter()
    ours = float(grad(x, y)[0])
    compile_s = time.perf_counter() - start
    peer_fn = torch_loss(kind, image, text, scale, bias)
    peer = float(peer_fn())
    if abs(ours - peer) > 1e-4 * max(1.0, abs(peer)):
        raise SystemExit(f"{kind} loss at batch {batch}: ours {ours} != torch {peer}")
    _, ours_s = timed(lambda: grad(x, y), args.steps, args.repeats)
    _, peer_s = timed(peer_fn, args.steps, args.repeats)
    return dict(
        bench="contrastive_step",
        part="loss",
        loss_kind=kind,
        batch=batch,
        dim=dim,
        loss=round(ours, 6),
        torch_loss=round(peer, 6),
        compile_s=round(compile_s, 2),
        ours_ms=round(1000 * ours_s, 3),
        torch_ms=round(1000 * peer_s, 3),
        speedup=round(peer_s / ours_s, 3),
        torch=torch.__version__,
        **machine(),
    )


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--parts", default="step,loss")
    parser.add_argument("--config", default="shapes_embedding:hard_negatives")
    parser.add_argument("--batches", default="32,128")
    parser.add_argument("--loss_batches", default="256,1024,4096")
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    parts = args.parts.split(",")
    if "step" in parts:
        for batch in args.batches.split(","):
            print(json.dumps(bench_step(args, int(batch))), flush=True)
    if "loss" in parts:
        for kind in ("sigmoid", "softmax"):
            for batch in args.loss_batches.split(","):
                print(json.dumps(bench_loss(args, kind, int(batch))), flush=True)


if __name__ == "__main__":
    main()
