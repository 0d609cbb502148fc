"""A convolution's gradient alone: ours (`imagen_jax.models.conv`, the matrix-product weight
gradient) against autodiff of `lax.conv_general_dilated` and PyTorch's (oneDNN) conv2d
backward, on the same inputs, float32, stride 1, "same" padding.

The shapes are the convolutions of bench/train_vs_imagen_pytorch.py's "mid" training step
(imagen_base_2b at width 64, batch 8, 64 px; widths 64 / 128 / 192 / 256 at 64 / 32 / 16 /
8 px, skip-concatenated inputs on the way up, 1x1 skip projections) and of its "small" one:

    OMP_WAIT_POLICY=PASSIVE python bench/conv_grad.py --repeats 5

One JSON line per shape: milliseconds for the weight gradient alone (`dw_*`) and for both
gradients of a sum of squares (`grad_*`; median of --repeats, the sides taking turns), and
whether the shape is one where ours takes the matrix-product path (`custom`: else ours is
lax's). All sides must agree within 1e-4 of the largest weight gradient before timing.
"""

from __future__ import annotations

import json
import os

import jax
import numpy as np
import sd_unet_forward
import torch
from jax import lax

from imagen_jax.models import conv

SHAPES = {  # name: (batch, side, in channels, out channels, kernel)
    "mid_64px_64_64": (8, 64, 64, 64, 3),
    "mid_64px_128_64": (8, 64, 128, 64, 3),
    "mid_64px_192_64": (8, 64, 192, 64, 3),
    "mid_32px_128_128": (8, 32, 128, 128, 3),
    "mid_32px_256_128": (8, 32, 256, 128, 3),
    "mid_16px_192_192": (8, 16, 192, 192, 3),
    "mid_16px_320_192": (8, 16, 320, 192, 3),
    "mid_8px_256_256": (8, 8, 256, 256, 3),
    "mid_64px_128_64_1x1": (8, 64, 128, 64, 1),
    "small_32px_32_32": (16, 32, 32, 32, 3),
    "small_16px_64_64": (16, 16, 64, 64, 3),
}
BENCH = "conv_grad"
NHWC = ("NHWC", "HWIO", "NHWC")


def bench_shape(name, shape, args):
    b, side, cin, cout, k = shape
    rng = np.random.default_rng(0)
    x = rng.standard_normal((b, side, side, cin)).astype(np.float32)
    w = (rng.standard_normal((k, k, cin, cout)) / np.sqrt(k * k * cin)).astype(np.float32)
    jx, jw = jax.device_put(x), jax.device_put(w)
    tx = torch.from_numpy(x.transpose(0, 3, 1, 2).copy())
    tw = torch.from_numpy(w.transpose(3, 2, 0, 1).copy())  # [O, I, kh, kw]

    def jax_side(fn):
        def loss(x, w):
            return (fn(x, w, (1, 1), "SAME", dimension_numbers=NHWC) ** 2).sum()

        grad = jax.jit(jax.grad(loss, argnums=(0, 1)))
        dw = jax.jit(jax.grad(loss, argnums=1))
        return grad, dw

    sides = {"ours": jax_side(conv.conv_general_dilated), "lax": jax_side(lax.conv_general_dilated)}

    def torch_grads(need_x=True):
        xs = tx.detach().requires_grad_(need_x)
        ws = tw.detach().requires_grad_()
        (torch.nn.functional.conv2d(xs, ws, padding=k // 2) ** 2).sum().backward()
        return ws.grad

    ref = torch_grads().numpy().transpose(2, 3, 1, 0)
    scale = float(np.abs(ref).max())
    for key, (_, dw) in sides.items():
        err = float(np.abs(np.asarray(dw(jx, jw)) - ref).max()) / scale
        if err > 1e-4:
            raise SystemExit(f"{name}: {key}'s weight gradient differs from torch by {err:.2e}")

    fns = {}
    for key, (grad, dw) in sides.items():
        fns[f"dw_{key}"] = lambda f=dw: jax.block_until_ready(f(jx, jw))
        fns[f"grad_{key}"] = lambda f=grad: jax.block_until_ready(f(jx, jw))
    fns["dw_torch"] = lambda: torch_grads(need_x=False)
    fns["grad_torch"] = torch_grads
    for fn in fns.values():  # warm-up (compiles ours)
        fn()
    load_before = os.getloadavg()
    seconds = sd_unet_forward.time_interleaved(fns, args.repeats)
    ms = {key: round(s * 1e3, 3) for key, s in seconds.items()}
    speedups = sd_unet_forward.speedups(
        ms, "ours", ("lax", "torch"), ("dw", "grad"), key="{kind}_{side}"
    )
    gflop = 2 * b * side * side * k * k * cin * cout / 1e9  # one pass (forward or either grad)
    custom = conv._matmul_weight_grad_pays(x.shape, w.shape)
    record = dict(bench=BENCH, shape=name, batch=b, side=side, cin=cin, cout=cout, kernel=k)
    record.update(gflop_per_pass=round(gflop, 3), custom=custom, ms=ms, **speedups)
    record.update(sd_unet_forward._env(args, load_before))
    print(json.dumps(record), flush=True)


def main():
    sd_unet_forward.shapes_main(__doc__, SHAPES, bench_shape, repeats=5)


if __name__ == "__main__":
    main()
