"""Attention alone: our blockwise attention (`imagen_jax.models.attention`, the CPU default)
against `jax.nn.dot_product_attention` (the "xla" path) and PyTorch's fused
`scaled_dot_product_attention`, forward and gradient, on the same inputs.

The shapes are the attention calls of the models benchmarked elsewhere in bench/:

  sd_mid_self   an SD-1.5-shaped UNet's first-level self-attention at 32x32 latents
                (1024 tokens, 8 heads of 40), batch 2 (classifier-free guidance)
  sd512_self    the same at SD 1.5's 64x64 latents (4096 tokens), batch 2
  sd_cross      its cross-attention to 77 text tokens
  shapes_self   the shapes base UNet's 16x16 self-attention at its training batch
                (32 x 256 tokens, 2 heads of 32)

    OMP_WAIT_POLICY=PASSIVE python bench/attention.py --repeats 5

One JSON line per shape: milliseconds per call (median of --repeats, the three sides
taking turns) and the speed-ups. All three must agree within 1e-4 before timing.
"""

from __future__ import annotations

import json
import os

import jax
import numpy as np
import sd_unet_forward
import torch

from imagen_jax.models import attention

SHAPES = {  # name: (batch, query tokens, key tokens, heads, head dim)
    "sd_mid_self": (2, 1024, 1024, 8, 40),
    "sd_mid_unet_self": (2, 1024, 1024, 8, 8),  # bench/sd_unet_forward.py's "mid", level 0
    "sd512_self": (2, 4096, 4096, 8, 40),
    "sd_cross": (2, 1024, 77, 8, 40),
    "shapes_self": (32, 256, 256, 2, 32),
}
BENCH = "attention"


def bench_shape(name, shape, args):
    b, lq, lk, n, d = shape
    rng = np.random.default_rng(0)
    q = rng.standard_normal((b, lq, n, d)).astype(np.float32)
    k, v = (rng.standard_normal((b, lk, n, d)).astype(np.float32) for _ in range(2))
    jq, jk, jv = (jax.device_put(x) for x in (q, k, v))
    tq, tk, tv = (torch.from_numpy(x.copy()).transpose(1, 2) for x in (q, k, v))  # [B, N, L, D]

    def ours_fn(impl):
        fwd = jax.jit(lambda q, k, v: attention.dot_product_attention(q, k, v, implementation=impl))
        loss = lambda q, k, v: (fwd(q, k, v) ** 2).sum()  # noqa: E731
        grad = jax.jit(jax.grad(loss, argnums=(0, 1, 2)))
        return fwd, grad

    sides = {"blockwise": ours_fn("blockwise"), "xla": ours_fn("xla")}
    sdpa = torch.nn.functional.scaled_dot_product_attention
    ref = sdpa(tq, tk, tv).transpose(1, 2).numpy()
    for side, (fwd, _) in sides.items():
        err = float(np.abs(np.asarray(fwd(jq, jk, jv)) - ref).max())
        if err > 1e-4:
            raise SystemExit(f"{name}: {side} differs from torch SDPA by {err:.2e}")

    def torch_grad():
        xs = [x.detach().requires_grad_() for x in (tq, tk, tv)]
        (sdpa(*xs) ** 2).sum().backward()

    fns = {}
    for side, (fwd, grad) in sides.items():
        fns[f"{side}_fwd"] = lambda f=fwd: jax.block_until_ready(f(jq, jk, jv))
        fns[f"{side}_grad"] = lambda g=grad: jax.block_until_ready(g(jq, jk, jv))
    with torch.no_grad():
        fns["torch_fwd"] = lambda: sdpa(tq, tk, tv)
    fns["torch_grad"] = torch_grad
    if not args.grad:
        fns = {key: fn for key, fn in fns.items() if key.endswith("_fwd")}
    for fn in fns.values():  # warm-up (compiles ours)
        fn()
    load_before = os.getloadavg()
    seconds = sd_unet_forward.time_interleaved(fns, args.repeats)
    ms = {key: round(s * 1e3, 3) for key, s in seconds.items()}
    speedups = sd_unet_forward.speedups(ms, "blockwise", ("xla", "torch"), ("fwd", "grad"))
    record = dict(bench=BENCH, shape=name, batch=b, lq=lq, lk=lk, heads=n, head_dim=d)
    record.update(ms=ms, **speedups, **sd_unet_forward._env(args, load_before))
    print(json.dumps(record), flush=True)


def main():
    def add_arguments(parser):
        parser.add_argument("--no_grad", dest="grad", action="store_false", help="forward only")

    sd_unet_forward.shapes_main(
        __doc__, SHAPES, bench_shape, repeats=5, add_arguments=add_arguments
    )


if __name__ == "__main__":
    main()
