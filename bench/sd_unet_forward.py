"""One forward pass of a Stable Diffusion UNet: our SDUNet (jitted) against diffusers'
UNet2DConditionModel (eager, torch.no_grad; optionally also under torch.compile), on the
same random weights.

The UNet is built with diffusers from a seed, saved with `save_pretrained` and loaded back
through `imagen_jax.models.sd_unet.load_unet`, so both sides hold the same tensors. Configs:

  tiny  SD's block types at toy size: block_out_channels (32, 64), one layer per block,
        cross_attention_dim 32, 16x16 latents.
  mid   SD 1.5's block structure (3 cross-attention down blocks + 1 plain, 2 layers per
        block, 8 heads, 77 text tokens of 768) at a fifth of its width: block_out_channels
        (64, 128, 256, 256), 32x32 latents.

    OMP_WAIT_POLICY=PASSIVE python bench/sd_unet_forward.py --configs tiny,mid \
        --batches 1,8 --repeats 5 --torch_1thread_row --torch_compile

--torch_compile adds a row for torch.compile (skipped for a shape whose first call takes over
--compile_budget_s), --torch_1thread_row one for eager PyTorch on one thread. On a shared
CPU, set OMP_WAIT_POLICY=PASSIVE (recorded in each line): with PyTorch's default spinning
OpenMP waits and other processes on the cores, its 2-thread runs were up to 25x slower.

Prints one JSON line per (config, batch, side) and one with the ratios. The two sides must
agree (max abs difference within 1e-3 of the reference's largest value) before anything
is timed. Medians of --repeats runs after a warm-up (which compiles ours), the sides
taking turns so that a drift in a shared machine's speed hits them alike.
"""

from __future__ import annotations

import argparse
import functools
import importlib.util
import json
import os
import platform
import signal
import statistics
import sys
import tempfile
import time
import types

import diffusers
import flax
import jax
import jax.numpy as jnp
import numpy as np
import torch
from flax import nnx

from imagen_jax.models import sd_unet

SD15_BLOCKS = dict(
    down_block_types=("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
    up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3,
    layers_per_block=2,
    attention_head_dim=8,
    norm_num_groups=32,
)
CONFIGS = {  # name: UNet2DConditionModel arguments (sample_size = the latent side)
    "tiny": dict(
        sample_size=16,
        block_out_channels=(32, 64),
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        layers_per_block=1,
        norm_num_groups=8,
        cross_attention_dim=32,
        attention_head_dim=4,
    ),
    "mid": dict(
        sample_size=32,
        block_out_channels=(64, 128, 256, 256),
        cross_attention_dim=768,
        **SD15_BLOCKS,
    ),
}
TEXT_TOKENS = 77
BENCH = "sd_unet_forward"
TOL = 1e-3  # relative to the reference output's largest magnitude


def import_torchvision_without_operators() -> None:
    """transformers (which diffusers' UNet imports) imports torchvision when it is installed;
    PyPI's torchvision is a CUDA build whose compiled operators do not register against the
    CPU torch here, so its import fails. Nothing here uses those operators: in that case the
    module that registers them is replaced by an empty one (as tests/conftest.py does)."""
    if importlib.util.find_spec("torchvision") is None:
        return
    try:
        import torchvision  # noqa: F401
    except RuntimeError as e:
        if "torchvision::" not in str(e):
            raise
        for name in [m for m in sys.modules if m.split(".")[0] == "torchvision"]:
            del sys.modules[name]
        stub = "torchvision._meta_registrations"
        sys.modules[stub] = types.ModuleType(stub)
        import torchvision  # noqa: F401


def build_diffusers_unet(config: dict, seed: int = 0) -> diffusers.UNet2DConditionModel:
    torch.manual_seed(seed)
    return diffusers.UNet2DConditionModel(in_channels=4, out_channels=4, **config).eval()


def torch_params(model: torch.nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def jax_params(model: nnx.Module) -> int:
    return sum(x.size for x in jax.tree.leaves(nnx.state(model, nnx.Param)))


def make_inputs(config: dict, batch: int, seed: int = 1):
    """(latents [B, H, W, 4], timesteps [B], text [B, 77, D]) as float32 numpy arrays."""
    rng = np.random.default_rng(seed)
    side = config["sample_size"]
    z = rng.standard_normal((batch, side, side, 4)).astype(np.float32)
    t = rng.integers(1, 1000, size=batch).astype(np.float32)
    text = rng.standard_normal((batch, TEXT_TOKENS, config["cross_attention_dim"]))
    return z, t, text.astype(np.float32)


def shapes_main(doc: str, shapes: dict, bench_shape, *, repeats: int, add_arguments=None):
    """The command line of the one-operation benches (attention.py, conv_grad.py,
    group_norm.py): --shapes (names from `shapes`), --repeats, --note, and whatever
    `add_arguments(parser)` adds; then `bench_shape(name, shape, args)` for each shape."""
    parser = argparse.ArgumentParser(description=doc.split("\n")[0])
    parser.add_argument("--shapes", default=",".join(shapes))
    parser.add_argument("--repeats", type=int, default=repeats)
    parser.add_argument("--note", default="", help="e.g. what else the machine was running")
    if add_arguments is not None:
        add_arguments(parser)
    args = parser.parse_args()
    import_torchvision_without_operators()
    for name in args.shapes.split(","):
        bench_shape(name, shapes[name], args)


def speedups(ms: dict, ours: str, peers, kinds, key: str = "{side}_{kind}") -> dict:
    """{f"{kind}_speedup_vs_{peer}": peer's ms / ours'} from ms keyed `key` (of side, kind);
    kinds that ours did not time are left out."""

    def at(side, kind):
        return ms.get(key.format(side=side, kind=kind))

    return {
        f"{kind}_speedup_vs_{peer}": round(at(peer, kind) / at(ours, kind), 3)
        for kind in kinds
        for peer in peers
        if at(ours, kind) is not None
    }


def time_interleaved(fns: dict, repeats: int) -> dict[str, float]:
    """Median seconds of each function over `repeats` rounds in which each runs once."""
    times = {name: [] for name in fns}
    for _ in range(repeats):
        for name, fn in fns.items():
            start = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - start)
    return {name: statistics.median(t) for name, t in times.items()}


class _Timeout(Exception):
    pass


def _first_call_within(fn, seconds: int):
    """(output, seconds) of fn's first call, or (None, None) if it takes longer than
    `seconds` (torch.compile's first call on a 2-core CPU can take minutes)."""

    def on_alarm(signum, frame):
        raise _Timeout

    old = signal.signal(signal.SIGALRM, on_alarm)
    signal.alarm(seconds)
    start = time.perf_counter()
    try:
        out = fn()
        return out, time.perf_counter() - start
    except _Timeout:
        return None, None
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, old)


def bench_config(name: str, args) -> None:
    config = CONFIGS[name]
    ref = build_diffusers_unet(config)
    with tempfile.TemporaryDirectory() as tmp:
        ref.save_pretrained(tmp)
        ours, _ = sd_unet.load_unet(tmp)
    ours.eval()
    graph, state = nnx.split(ours)

    @jax.jit
    def forward(state, z, t, text):
        return nnx.merge(graph, state)(z, t, text)

    sizes = dict(params_diffusers=torch_params(ref), params_ours=jax_params(ours))
    print(json.dumps(dict(bench=BENCH, config=name, **config, **sizes)), flush=True)
    compiled = torch.compile(ref, dynamic=False) if args.torch_compile else None
    for batch in args.batches:
        bench_batch(name, batch, args, ref, compiled, functools.partial(forward, state), sizes)


def torch_call(model, inputs, threads=None):
    """`model` on NCHW torch inputs, eager under no_grad (on `threads` threads if given)."""
    z, t, text = (torch.from_numpy(np.ascontiguousarray(a)) for a in inputs)
    z = z.permute(0, 3, 1, 2)

    @torch.no_grad()
    def call():
        return model(z, t, encoder_hidden_states=text, return_dict=False)[0]

    return with_torch_threads(call, threads) if threads else call


def with_torch_threads(fn, threads: int):
    """fn run with torch on `threads` intra-op threads (then back to the previous count).

    On a shared, oversubscribed CPU, PyTorch's OpenMP parallel regions wait at barriers for
    threads that the OS has descheduled, and two threads can be many times slower than one;
    a one-thread row shows how much of a ratio comes from that."""

    def call():
        default = torch.get_num_threads()
        torch.set_num_threads(threads)
        try:
            return fn()
        finally:
            torch.set_num_threads(default)

    return call


def bench_batch(name, batch, args, ref, compiled, forward, sizes):
    config = CONFIGS[name]
    inputs = make_inputs(config, batch)
    z_j, t_j, text_j = (jnp.asarray(a) for a in inputs)
    sides = {
        "diffusers": torch_call(ref, inputs),
        "imagen_jax": lambda: forward(z_j, t_j, text_j).block_until_ready(),
    }
    start = time.perf_counter()
    ours_out = np.asarray(sides["imagen_jax"]())  # compiles
    compile_s = {"imagen_jax": time.perf_counter() - start}
    ref_out = sides["diffusers"]().numpy().transpose(0, 2, 3, 1)
    scale = float(np.abs(ref_out).max())
    errors = {"imagen_jax": float(np.abs(ours_out - ref_out).max())}
    if args.torch_1thread_row:
        sides["diffusers_1thread"] = torch_call(ref, inputs, threads=1)
    if compiled is not None:
        call = torch_call(compiled, inputs)
        out, seconds = _first_call_within(call, args.compile_budget_s)
        if out is None:
            skipped = f"skipped: first call over {args.compile_budget_s} s"
            print(json.dumps(dict(bench=BENCH, config=name, batch=batch, torch_compile=skipped)))
        else:
            errors["diffusers_compile"] = float(
                np.abs(out.numpy().transpose(0, 2, 3, 1) - ref_out).max()
            )
            compile_s["diffusers_compile"] = seconds
            sides["diffusers_compile"] = call
    for side, err in errors.items():
        if err > TOL * scale:
            raise SystemExit(
                f"{name}, batch {batch}: {side} disagrees with diffusers (max abs "
                f"{err:.2e}, reference max {scale:.2e}); not timing"
            )
    for fn in sides.values():
        fn()  # warm-up
    load_before = os.getloadavg()
    seconds = time_interleaved(sides, args.repeats)
    env = _env(args, load_before)
    for side, sec in seconds.items():
        record = dict(
            bench=BENCH,
            config=name,
            side=side,
            batch=batch,
            latent=config["sample_size"],
            ms_per_forward=1e3 * sec,
            samples_per_s=batch / sec,
            compile_s=compile_s.get(side),
            max_abs_diff=errors.get(side, 0.0),
            ref_max_abs=scale,
            repeats=args.repeats,
            **sizes,
            **env,
        )
        print(json.dumps(record), flush=True)
    ratios = {f"speedup_vs_{s}": seconds[s] / seconds["imagen_jax"] for s in seconds}
    ratios.pop("speedup_vs_imagen_jax")
    print(json.dumps(dict(bench=BENCH, config=name, batch=batch, **ratios, **env)), flush=True)


def _env(args, load_before) -> dict:
    return dict(
        machine=platform.processor() or platform.machine(),
        cpus=os.cpu_count(),
        load_avg_before=round(load_before[0], 2),
        load_avg_after=round(os.getloadavg()[0], 2),
        jax_backend=jax.default_backend(),
        jax=jax.__version__,
        flax=flax.__version__,
        torch=torch.__version__,
        diffusers=diffusers.__version__,
        torch_threads=torch.get_num_threads(),
        omp_wait_policy=os.environ.get("OMP_WAIT_POLICY"),
        xla_flags=os.environ.get("XLA_FLAGS"),
        note=args.note,
    )


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--configs", default="tiny,mid")
    parser.add_argument("--batches", default="1,8")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--torch_compile", action="store_true", help="add a torch.compile row")
    parser.add_argument(
        "--torch_1thread_row", action="store_true", help="add diffusers on one torch thread"
    )
    parser.add_argument("--compile_budget_s", type=int, default=120)
    parser.add_argument("--torch_threads", type=int, default=0, help="0: torch's default")
    parser.add_argument("--note", default="", help="e.g. what else the machine was running")
    args = parser.parse_args()
    args.batches = [int(b) for b in args.batches.split(",")]
    import_torchvision_without_operators()
    if args.torch_threads:
        torch.set_num_threads(args.torch_threads)
    for name in args.configs.split(","):
        bench_config(name, args)


if __name__ == "__main__":
    main()
