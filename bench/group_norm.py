"""Group normalization alone: ours (`imagen_jax.models.norm.GroupNorm`, per-channel sums
first on the CPU) against flax's `nnx.GroupNorm` and torch's `group_norm`, float32, 32
groups, two-pass variance, forward and the gradient of a sum of squares, on the same inputs
and parameters. The shapes are the UNets' feature maps in the sampling and training
benches (the SD "mid" UNet at batch 2, the 64 px base at batch 8).

    OMP_WAIT_POLICY=PASSIVE python bench/group_norm.py --repeats 9

One JSON line per shape: milliseconds (median of --repeats, the sides taking turns) and the
speed-ups. The three must agree within 1e-4 before timing.
"""

from __future__ import annotations

import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import sd_unet_forward
import torch
from flax import nnx

from imagen_jax.models import norm

SHAPES = {  # name: (batch, side, channels)
    "sd_mid_32px": (2, 32, 64),
    "sd_mid_16px": (2, 16, 128),
    "sd_mid_8px": (2, 8, 256),
    "base_64px": (8, 64, 64),
    "base_32px": (8, 32, 128),
}
BENCH = "group_norm"
GROUPS = 32


def bench_shape(name, shape, args):
    b, side, c = shape
    rng = np.random.default_rng(0)
    x = (1 + rng.standard_normal((b, side, side, c))).astype(np.float32)
    scale = (1 + 0.1 * rng.standard_normal(c)).astype(np.float32)
    bias = (0.1 * rng.standard_normal(c)).astype(np.float32)
    modules = {
        "ours": norm.GroupNorm(c, num_groups=GROUPS, use_fast_variance=False, rngs=nnx.Rngs(0)),
        "flax": nnx.GroupNorm(c, num_groups=GROUPS, use_fast_variance=False, rngs=nnx.Rngs(0)),
    }
    fns, jx = {}, jax.device_put(x)
    for key, module in modules.items():
        module.scale[...], module.bias[...] = jnp.asarray(scale), jnp.asarray(bias)
        graph, params = nnx.split(module)
        fwd = jax.jit(lambda p, x, g=graph: nnx.merge(g, p)(x))
        grad = jax.jit(jax.grad(lambda p, x, g=graph: (nnx.merge(g, p)(x) ** 2).sum(), (0, 1)))
        fns[f"{key}_fwd"] = lambda f=fwd, p=params: jax.block_until_ready(f(p, jx))
        fns[f"{key}_grad"] = lambda f=grad, p=params: jax.block_until_ready(f(p, jx))
    tx = torch.from_numpy(x.transpose(0, 3, 1, 2).copy())
    tw, tb = torch.from_numpy(scale), torch.from_numpy(bias)
    gn = torch.nn.functional.group_norm
    ref = gn(tx, GROUPS, tw, tb, eps=1e-5).numpy().transpose(0, 2, 3, 1)
    for key in modules:
        err = float(np.abs(np.asarray(fns[f"{key}_fwd"]()) - ref).max())
        if err > 1e-4:
            raise SystemExit(f"{name}: {key} differs from torch by {err:.2e}")

    def torch_grad():
        xs, ws, bs = (t.detach().requires_grad_() for t in (tx, tw, tb))
        (gn(xs, GROUPS, ws, bs, eps=1e-5) ** 2).sum().backward()

    with torch.no_grad():
        fns["torch_fwd"] = lambda: gn(tx, GROUPS, tw, tb, eps=1e-5)
    fns["torch_grad"] = torch_grad
    for fn in fns.values():  # warm-up (compiles ours and flax's)
        fn()
    load_before = os.getloadavg()
    seconds = sd_unet_forward.time_interleaved(fns, args.repeats)
    ms = {key: round(s * 1e3, 3) for key, s in seconds.items()}
    speedups = sd_unet_forward.speedups(ms, "ours", ("flax", "torch"), ("fwd", "grad"))
    record = dict(bench=BENCH, shape=name, batch=b, side=side, channels=c, groups=GROUPS)
    record.update(ms=ms, **speedups, **sd_unet_forward._env(args, load_before))
    print(json.dumps(record), flush=True)


def main():
    sd_unet_forward.shapes_main(__doc__, SHAPES, bench_shape, repeats=9)


if __name__ == "__main__":
    main()
