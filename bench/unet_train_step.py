"""Train-step throughput and model FLOPs utilisation of the Imagen base UNet.

One jitted step: the diffusion loss (continuous cosine schedule, eps prediction, text
cross-attention, CFG dropout through `drop_text`), its gradient, and an AdamW update, with
the parameters in float32 and the compute in `--dtype`. FLOPs come from XLA's cost analysis
of the step's module as lowered with the one-piece attention, before the backend compiles
it: on a GPU the compiled module hands convolutions and matrix products to cuDNN / cuBLAS as
custom calls, which its cost analysis counts as zero FLOPs (`compiled_flops_per_step`, 13x
too low for the paper base), and a GPU plug-in gives no cost analysis of a lowered module,
so the count runs in a CPU-only child process (`--flops_only`). MFU divides achieved FLOP/s
by the device's peak (`--peak_tflops`, 989 for an H100 SXM in dense bf16). `--attention`
picks the attention implementation (models/attention.py).

    python bench/unet_train_step.py --variant=imagen_base_2b --channels=256 --batch=64 \\
        --res=64 --dtype=bfloat16 --peak_tflops=989

Prints one JSON line.
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import platform
import subprocess
import sys
import time
import zlib

import jax
import jax.numpy as jnp
import optax
from flax import nnx

from imagen_jax.diffusion import losses, schedules
from imagen_jax.models import attention, imagen_unet
from imagen_jax.models import unet_layers as layers


def make_step(graphdef, rest, optimizer, schedule):
    def loss_fn(params, batch, key):
        model = nnx.merge(graphdef, params, rest)
        return losses.diffusion_loss(
            lambda z, t, c: model(z, t, c), batch["image"], batch["cond"], key, schedule=schedule
        )[0]

    @jax.jit
    def step(params, opt_state, batch, key):
        loss, grads = jax.value_and_grad(loss_fn)(params, batch, key)
        updates, opt_state = optimizer.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state, loss

    return step


def _abstract_model(cfg, dtype):
    """(the UNet's constructor, its (graphdef, params, rest) as shapes alone)."""

    def build():
        return imagen_unet.ImagenUNet(cfg, rngs=nnx.Rngs(0), dtype=dtype)

    return build, nnx.split(nnx.eval_shape(build), nnx.Param, ...)


def random_model(cfg, dtype):
    """(graphdef, params, rest) of the UNet with small pseudo-random weights (norm scales 1,
    biases 0): only the step is timed, and compiling the layers' own initialisers (or any
    random-bit generation) takes minutes at the paper's size, while this compiles in
    seconds."""

    build, (graphdef, abstract, _) = _abstract_model(cfg, dtype)
    rest = jax.jit(lambda: nnx.split(build(), nnx.Param, ...)[2])()  # initialisers dropped

    @jax.jit
    def fill():
        def leaf(path, x):
            name = str(getattr(path[-1], "key", path[-1]))
            if name == "scale":
                return jnp.ones(x.shape, x.dtype)
            if name == "bias":
                return jnp.zeros(x.shape, x.dtype)
            # A deterministic pseudo-random pattern: XLA compiles the random-bit generator
            # slowly at this size, and only the step's speed is measured.
            phase = (zlib.crc32(jax.tree_util.keystr(path).encode()) % 997) / 997.0
            n = jnp.arange(x.size, dtype=jnp.float32)
            return (0.03 * jnp.sin(n * 12.9898 + phase * 78.233)).reshape(x.shape).astype(x.dtype)

        return jax.tree_util.tree_map_with_path(leaf, abstract)

    return graphdef, fill(), rest


def xla_flops(stage) -> float | None:
    """FLOPs of a jax.stages.Lowered or Compiled from XLA's cost analysis (None where the
    backend gives none: a GPU plug-in's lowered module)."""
    cost = stage.cost_analysis()
    cost = cost[0] if isinstance(cost, list) else cost
    return float(cost["flops"]) if cost and "flops" in cost else None


def _batch_shapes(cfg, args) -> dict:
    s = jax.ShapeDtypeStruct
    b, n = args.batch, args.text_len
    return dict(
        image=s((b, args.res, args.res, 3), jnp.float32),
        cond=dict(
            text=s((b, n, cfg.text_dim), jnp.float32),
            text_mask=s((b, n), jnp.bool_),
            drop_text=s((b,), jnp.bool_),
        ),
    )


def _fill(shape, key):
    """Data of the batch: uniform images in [-1, 1], normal text, 10% dropped, no padding."""
    if shape.dtype == jnp.bool_:
        if len(shape.shape) == 1:
            return jax.random.bernoulli(key, 0.1, shape.shape)
        return jnp.ones(shape.shape, bool)
    if len(shape.shape) == 4:
        return jax.random.uniform(key, shape.shape, minval=-1, maxval=1)
    return jax.random.normal(key, shape.shape)


def model_flops(cfg, dtype, optimizer, schedule, args) -> float:
    """The train step's FLOPs from XLA's cost analysis of its module as lowered (before the
    backend compiles it), with the one-piece attention: a fused kernel's custom call counts
    zero. Only shapes are used, nothing is initialised."""
    _use_attention("xla")
    graphdef, params, rest = _abstract_model(cfg, dtype)[1]
    opt_state = jax.eval_shape(optimizer.init, params)
    step = make_step(graphdef, rest, optimizer, schedule)
    flops = xla_flops(step.lower(params, opt_state, _batch_shapes(cfg, args), jax.random.key(0)))
    _use_attention(args.attention)
    if flops is None:
        raise RuntimeError(f"no cost analysis of the lowered step on {jax.default_backend()}")
    return flops


def model_flops_on_cpu(argv) -> float:
    """`model_flops` in a CPU-only process: a GPU plug-in gives no cost analysis of a lowered
    module, and its compiled one counts cuDNN / cuBLAS calls as zero."""
    env = dict(os.environ, JAX_PLATFORMS="cpu")
    cmd = [sys.executable, os.path.abspath(__file__), *argv, "--flops_only"]
    out = subprocess.run(cmd, env=env, check=True, capture_output=True, text=True).stdout
    return float(json.loads(out.strip().splitlines()[-1])["flops_per_step"])


def _use_attention(implementation: str) -> None:
    """The UNet's attention layers call `implementation` from now on."""
    layers.dot_product_attention = functools.partial(
        attention.dot_product_attention, implementation=implementation
    )


def phase(what: str, since: float) -> float:
    """Seconds since `since`, also printed to stderr (a run cut off by a time limit still
    shows how far it got)."""
    seconds = time.perf_counter() - since
    print(f"{what} in {seconds:.1f} s", file=sys.stderr, flush=True)
    return seconds


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--variant", default="shapes_base")
    parser.add_argument("--channels", type=int, default=0, help="override the width")
    parser.add_argument("--text_dim", type=int, default=0, help="override the text width")
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--res", type=int, default=32)
    parser.add_argument("--text_len", type=int, default=64)
    parser.add_argument("--dtype", default="float32")
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--peak_tflops", type=float, default=0.0)
    parser.add_argument("--attention", default="auto", choices=attention.IMPLEMENTATIONS)
    parser.add_argument("--flops_only", action="store_true", help="print the model's FLOPs alone")
    args = parser.parse_args()
    _use_attention(args.attention)

    overrides = {k: v for k, v in (("channels", args.channels), ("text_dim", args.text_dim)) if v}
    cfg = imagen_unet.make_config(args.variant, **overrides)
    dtype = jnp.dtype(args.dtype)
    schedule = schedules.LogSNRSchedule("cosine")
    optimizer = optax.adamw(1e-4)
    key = jax.random.key(0)
    if args.flops_only:
        print(json.dumps(dict(flops_per_step=model_flops(cfg, dtype, optimizer, schedule, args))))
        return
    flops = model_flops_on_cpu(sys.argv[1:]) if jax.default_backend() != "cpu" else None
    clock = time.perf_counter()
    graphdef, params, rest = random_model(cfg, dtype)
    opt_state = jax.jit(optimizer.init)(params)
    batch = jax.tree.map(lambda s: _fill(s, key), _batch_shapes(cfg, args))
    jax.block_until_ready(opt_state)
    init_s = phase("initialised", clock)
    step = make_step(graphdef, rest, optimizer, schedule)
    clock = time.perf_counter()
    lowered = step.lower(params, opt_state, batch, key)
    lower_s = phase("traced and lowered", clock)
    if flops is None:
        flops = model_flops(cfg, dtype, optimizer, schedule, args)
    clock = time.perf_counter()
    compiled = lowered.compile()
    compile_s = phase("compiled", clock)
    compiled_flops = xla_flops(compiled)

    params, opt_state, loss = step(params, opt_state, batch, key)  # warm-up
    jax.block_until_ready(loss)
    times = []
    for i in range(args.steps):
        start = time.perf_counter()
        params, opt_state, loss = step(params, opt_state, batch, jax.random.fold_in(key, i))
        jax.block_until_ready(loss)
        times.append(time.perf_counter() - start)
    sec = sorted(times)[len(times) // 2]
    record = dict(
        bench="unet_train_step",
        variant=args.variant,
        overrides=overrides,
        params=imagen_unet.count_params(cfg),
        batch=args.batch,
        res=args.res,
        dtype=args.dtype,
        init_s=init_s,
        lower_s=lower_s,
        compile_s=compile_s,
        step_seconds=sec,
        images_per_s=args.batch / sec,
        flops_per_step=flops,
        compiled_flops_per_step=compiled_flops,
        attention=args.attention,
        achieved_tflops=flops / sec / 1e12,
        loss=float(loss),
        device=str(jax.devices()[0].device_kind),
        backend=jax.default_backend(),
        jax=jax.__version__,
        machine=platform.machine(),
    )
    if args.peak_tflops:
        record["mfu"] = record["achieved_tflops"] / args.peak_tflops
    print(json.dumps(record))


if __name__ == "__main__":
    main()
