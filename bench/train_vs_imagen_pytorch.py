"""One training step of our base ImagenUNet against imagen-pytorch's Unet of matched size.

Both sides train a text-conditioned 64 px-style base UNet on the same batch (images plus
text embeddings given directly, no text encoder), float32, with the same objective: eps
prediction, MSE, min-SNR-5 weighting (imagen-pytorch's default), classifier-free-guidance
dropout 0.1, and the continuous "linear" logSNR schedule, whose formula both implement
identically (imagen-pytorch's `beta_linear_log_snr`, our `LogSNRSchedule("linear")`); the
schedule costs nothing measurable, and being the same formula it lets the check below compare
the two losses exactly. The optimizer is AdamW on both sides (same lr, betas, eps, decay).

- ours: one jitted step (value_and_grad of `diffusion.diffusion_loss` with the trainer's
  `make_cond` for CFG dropout, then the optax AdamW update), parameters and optimizer state
  donated; no EMA, as on the other side.
- imagen_pytorch: eager PyTorch, `loss = Imagen(...)(images, text_embeds=..., text_masks=...)`
  (its own training forward: noising, time conditioning, CFG dropout, loss), `backward()`,
  `torch.optim.AdamW.step()`; one row per thread count in `--torch_threads` (default: the
  core count). With `--torch_compile` also the same with the Unet's forward under
  `torch.compile`, one more row per thread count.

Sizes (`--size`): the two designs differ (imagen-pytorch runs each level at the previous
level's width on the way down, uses multi-query attention, a Perceiver text pool and a
cross-attention inside the first block of a level; ours puts a transformer block after every
residual block of an attention level and keeps the text at the encoder's width), so at the
same base width, channel multipliers, levels, residual blocks per level, resolution and
attention levels, imagen-pytorch's text-conditioning width `cond_dim` is chosen to bring the
parameter counts within 10% (which also brings the matrix-product FLOPs within 10%):
  small: 32 px, batch 16: ours `shapes_base` (width 32, mults 1,2,4, 2 blocks, attention at
         16 and 8 px; 6.55 M) against Unet(dim=32, dim_mults=(1,2,4), 2 resnet blocks,
         attention and cross-attention at the same levels, cond_dim=128; 6.19 M).
  mid:   64 px, batch 8: ours `imagen_base_2b` at width 64 with 2 blocks (mults 1,2,3,4,
         attention at 32, 16, 8 px; 30.6 M) against BaseUnet64(dim=64, 2 resnet blocks,
         cond_dim=384; 31.4 M).

Correctness before timing: at initialisation both networks output exactly zero (both zero the
last convolution), so with the same x0, t and noise the two losses must agree; ours draws
(t, eps) from its key, and imagen-pytorch's `p_losses` is given the same ones.

    python bench/train_vs_imagen_pytorch.py --size small,mid --torch_threads 2,1 --profile

Prints one JSON line per side and one summary line per size (speed-up = ours' images/s over
theirs, per peer row; parameter counts; FLOPs; with `--profile`, the milliseconds of one step
per kind of operation on each side). Medians over --repeats steps per side after --warmup
steps, the sides taking turns step by step so that a drift in a shared machine's speed hits
all alike. FLOPs per step: ours from XLA's cost analysis of the compiled step (`flops_xla`);
for both, the matrix-product and convolution FLOPs alone (`matmul_conv_flops`: ours counted on
the step's jaxpr, theirs with `torch.utils.flop_counter`), the comparable number.

On a shared CPU, run it with OMP_WAIT_POLICY=PASSIVE: PyTorch's OpenMP threads otherwise
spin while they wait, and with other processes on the cores its 2-thread steps became 6-15x
slower here (the variable is recorded in every line).

Needs `pip install -e .[bench]`, or, in the test environment, see bench/README.md.
"""

from __future__ import annotations

import argparse
import collections
import contextlib
import glob
import gzip
import importlib
import importlib.metadata
import importlib.util
import json
import math
import os
import platform
import re
import statistics
import sys
import tempfile
import time
import types

import jax
import jax.numpy as jnp
import numpy as np
import optax
import sd_unet_forward
import torch
from flax import nnx
from torch.utils import flop_counter

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from imagen_jax import logs  # noqa: E402
from imagen_jax.diffusion import losses, schedules  # noqa: E402
from imagen_jax.diffusion.adapter import model_fn  # noqa: E402
from imagen_jax.models import imagen_unet  # noqa: E402
from imagen_jax.training import step as step_lib  # noqa: E402

COND_DROP_PROB = 0.1
MIN_SNR_GAMMA = 5.0
ADAMW = dict(lr=1e-4, b1=0.9, b2=0.999, eps=1e-8, weight_decay=1e-2)

SIZES = {
    "small": dict(
        res=32,
        batch=16,
        ours=("shapes_base", {}),
        theirs=dict(
            cls="Unet",
            dim=32,
            dim_mults=(1, 2, 4),
            num_resnet_blocks=2,
            layer_attns=(False, True, True),
            layer_cross_attns=(False, True, True),
            cond_dim=128,
        ),
    ),
    "mid": dict(
        res=64,
        batch=8,
        ours=("imagen_base_2b", dict(channels=64, num_res_blocks=2)),
        theirs=dict(cls="BaseUnet64", dim=64, num_resnet_blocks=2, cond_dim=384),
    ),
}


# ------------------------------------------------------------------------------------------
# Importing imagen-pytorch's Unet offline and without its trainer's dependencies
# ------------------------------------------------------------------------------------------


def import_imagen_pytorch():
    """imagen_pytorch.imagen_pytorch (Unet, BaseUnet64, Imagen), imported without running the
    package's __init__, which also imports its trainer and data modules (accelerate,
    datasets, pytorch-warmup, ema-pytorch), none of which the Unet or the loss use. Its
    Unet3D's default text width asks the Hugging Face hub for T5's config at import time; it
    is seeded with the public value (t5-v1_1-base, d_model 768) so that nothing is fetched.
    Every model here is built with an explicit text_embed_dim."""
    sd_unet_forward.import_torchvision_without_operators()
    if "imagen_pytorch.imagen_pytorch" in sys.modules:
        return sys.modules["imagen_pytorch.imagen_pytorch"]
    spec = importlib.util.find_spec("imagen_pytorch")
    if spec is None:
        raise SystemExit("imagen-pytorch is not installed; see bench/README.md")
    package = types.ModuleType("imagen_pytorch")
    package.__path__ = list(spec.submodule_search_locations)
    sys.modules["imagen_pytorch"] = package
    t5 = importlib.import_module("imagen_pytorch.t5")
    import transformers

    t5.T5_CONFIGS.setdefault(t5.DEFAULT_T5_NAME, dict(config=transformers.T5Config(d_model=768)))
    return importlib.import_module("imagen_pytorch.imagen_pytorch")


# ------------------------------------------------------------------------------------------
# FLOP counting
# ------------------------------------------------------------------------------------------


def _sub_jaxprs(params):
    for value in params.values():
        for v in value if isinstance(value, (tuple, list)) else (value,):
            if isinstance(v, jax.extend.core.ClosedJaxpr):
                yield v.jaxpr
            elif isinstance(v, jax.extend.core.Jaxpr):
                yield v


def matmul_conv_flops(jaxpr) -> float:
    """2 x multiply-adds of every dot_general and conv_general_dilated in a jaxpr (forward
    and, in a gradient's jaxpr, backward), the quantity torch's FlopCounterMode counts."""
    total = 0.0
    for eqn in jaxpr.eqns:
        name = eqn.primitive.name
        out = math.prod(eqn.outvars[0].aval.shape) if eqn.outvars else 0
        if name == "dot_general":
            (contract, _), _ = eqn.params["dimension_numbers"]
            lhs = eqn.invars[0].aval.shape
            total += 2.0 * out * math.prod(lhs[d] for d in contract)
        elif name == "conv_general_dilated":
            rhs, spec = eqn.invars[1].aval.shape, eqn.params["dimension_numbers"].rhs_spec
            total += 2.0 * out * rhs[spec[1]] * math.prod(rhs[d] for d in spec[2:])
        times = eqn.params.get("length", 1) if name == "scan" else 1
        total += times * sum(matmul_conv_flops(sub) for sub in _sub_jaxprs(eqn.params))
    return total


def torch_matmul_conv_flops(fn) -> float:
    with flop_counter.FlopCounterMode(display=False) as counter:
        fn()
    return float(counter.get_total_flops())


# ------------------------------------------------------------------------------------------
# The two sides
# ------------------------------------------------------------------------------------------


def make_inputs(batch: int, res: int, text_len: int, text_dim: int, seed: int = 0):
    """Images in [-1, 1] [B, H, W, 3], text embeddings [B, L, D] and a mask with 4..L tokens."""
    rng = np.random.default_rng(seed)
    image = rng.uniform(-1, 1, (batch, res, res, 3)).astype(np.float32)
    text = rng.normal(size=(batch, text_len, text_dim)).astype(np.float32)
    lengths = rng.integers(4, text_len + 1, (batch, 1))
    return dict(image=image, text=text, text_mask=np.arange(text_len)[None] < lengths)


class Ours:
    def __init__(self, size: dict, inputs: dict, schedule):
        variant, overrides = size["ours"]
        self.cfg = imagen_unet.make_config(variant, text_dim=inputs["text"].shape[-1], **overrides)
        model = nnx.jit(lambda: imagen_unet.ImagenUNet(self.cfg, rngs=nnx.Rngs(0)))()
        graphdef, self.params, rest = nnx.split(model, nnx.Param, ...)
        self.params_count = sum(x.size for x in jax.tree.leaves(self.params))
        kw = ADAMW
        self.tx = optax.adamw(
            kw["lr"], kw["b1"], kw["b2"], kw["eps"], weight_decay=kw["weight_decay"]
        )
        self.opt_state = jax.jit(self.tx.init)(self.params)
        self.batch = {k: jnp.asarray(v) for k, v in inputs.items()}
        self.schedule = schedule

        def loss_fn(params, batch, key):
            key_cond, key_loss = jax.random.split(key)
            net = nnx.merge(graphdef, params, rest)
            cond = step_lib.make_cond(
                batch, key_cond, cond_drop_prob=COND_DROP_PROB, max_aug=None, schedule=schedule
            )
            return losses.diffusion_loss(
                model_fn(net, schedule=schedule),
                batch["image"],
                cond,
                key_loss,
                schedule=schedule,
                prediction="eps",
                weighting="min_snr",
                min_snr_gamma=MIN_SNR_GAMMA,
            )

        def train_step(params, opt_state, batch, key):
            (loss, _), grads = jax.value_and_grad(loss_fn, has_aux=True)(params, batch, key)
            updates, opt_state = self.tx.update(grads, opt_state, params)
            return optax.apply_updates(params, updates), opt_state, loss

        self.loss_fn = jax.jit(loss_fn)
        self.key = jax.random.key(0)
        step = jax.jit(train_step, donate_argnums=(0, 1))
        args = (self.params, self.opt_state, self.batch, self.key)
        start = time.perf_counter()
        self.compiled = step.lower(*args).compile()
        self.compile_s = time.perf_counter() - start
        cost = self.compiled.cost_analysis()
        cost = cost[0] if isinstance(cost, list) else cost
        self.flops_xla = float(cost.get("flops", 0.0))
        self.matmul_conv_flops = matmul_conv_flops(jax.make_jaxpr(train_step)(*args).jaxpr)
        self.steps = 0

    def time_and_noise(self):
        """(t [B], eps [B, H, W, 3]) that the loss draws from `self.key` (the split order is
        the documented contract of `diffusion_loss`)."""
        _, key_loss = jax.random.split(self.key)
        key_t, key_eps = jax.random.split(key_loss)
        image = self.batch["image"]
        t = losses.sample_time(key_t, image.shape[0], schedule=self.schedule)[0]
        return np.array(t), np.array(jax.random.normal(key_eps, image.shape, jnp.float32))

    def initial_loss(self) -> float:
        return float(self.loss_fn(self.params, self.batch, self.key)[0])

    def step(self) -> float:
        key = jax.random.fold_in(self.key, self.steps)
        self.params, self.opt_state, loss = self.compiled(
            self.params, self.opt_state, self.batch, key
        )
        self.steps += 1
        return float(loss)  # waits for the step


class Theirs:
    def __init__(self, size: dict, inputs: dict, *, threads: int, compile_unet: bool = False):
        ip = import_imagen_pytorch()
        self.threads = threads
        torch.set_num_threads(threads)
        kw = dict(size["theirs"])
        cls = getattr(ip, kw.pop("cls"))
        torch.manual_seed(0)
        text_len, text_dim = inputs["text"].shape[1:]
        with contextlib.redirect_stdout(sys.stderr):  # its advice on widths below 128
            self.unet = cls(text_embed_dim=text_dim, max_text_len=text_len, channels=3, **kw)
        self.imagen = ip.Imagen(
            unets=self.unet,
            image_sizes=size["res"],
            text_embed_dim=text_dim,
            channels=3,
            cond_drop_prob=COND_DROP_PROB,
            noise_schedules="linear",
            pred_objectives="noise",
            min_snr_loss_weight=True,
            min_snr_gamma=MIN_SNR_GAMMA,
        )
        assert self.imagen.get_unet(1) is self.unet
        self.params_count = sum(p.numel() for p in self.unet.parameters())
        k = ADAMW
        self.optimizer = torch.optim.AdamW(
            self.unet.parameters(),
            lr=k["lr"],
            betas=(k["b1"], k["b2"]),
            eps=k["eps"],
            weight_decay=k["weight_decay"],
        )
        to_nchw = lambda x: torch.from_numpy(x).permute(0, 3, 1, 2).contiguous()  # noqa: E731
        self.image01 = (to_nchw(inputs["image"]) + 1) / 2  # Imagen normalizes [0, 1] itself
        self.text = torch.from_numpy(inputs["text"])
        self.text_mask = torch.from_numpy(inputs["text_mask"])
        self.to_nchw = to_nchw
        self.compile_s = None
        if compile_unet:
            start = time.perf_counter()
            # Imagen calls `unet.forward` directly, bypassing `Module.compile()`'s __call__.
            self.unet.forward = torch.compile(self.unet.forward)
            self.step()  # compiles forward and backward
            self.compile_s = time.perf_counter() - start

    def initial_loss(self, t, eps) -> float:
        with torch.no_grad():
            loss = self.imagen.p_losses(
                self.unet,
                self.image01,
                torch.from_numpy(t),
                noise_scheduler=self.imagen.noise_schedulers[0],
                text_embeds=self.text,
                text_mask=self.text_mask,
                noise=self.to_nchw(eps),
                pred_objective="noise",
                min_snr_gamma=MIN_SNR_GAMMA,
            )
        return float(loss)

    def step(self) -> float:
        torch.set_num_threads(self.threads)
        loss = self.imagen(
            self.image01, text_embeds=self.text, text_masks=self.text_mask, unet_number=1
        )
        loss.backward()
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        return float(loss.detach())


# ------------------------------------------------------------------------------------------


# Per-operation profiles of one step (--profile): where each side's time goes.

_XLA_MATMUL_CONV = re.compile(r"^(ynn_fusion|dot|convolution|conv)")
_TORCH_MATMUL_CONV = re.compile(r"^aten::(mm|bmm|addmm|baddbmm|matmul|linear|.*convolution.*)$")
_TORCH_COPY = re.compile(r"^aten::(copy_|cat|clone|contiguous|_to_copy)$")


def _categorize(durations: dict[str, float], matmul_conv, copy) -> dict[str, float]:
    out = dict(matmul_conv=0.0, copy_transpose=0.0, other=0.0)
    for name, seconds in durations.items():
        kind = "matmul_conv" if matmul_conv(name) else "copy_transpose" if copy(name) else "other"
        out[kind] += seconds
    return {k: round(1e3 * v, 1) for k, v in out.items()}


def profile_ours(ours: Ours) -> dict[str, float]:
    """Milliseconds per kind of XLA operation in one step, from JAX's profiler trace: the
    summed durations of the compiled program's operations (named `<op>.<id>`)."""
    with tempfile.TemporaryDirectory() as logdir:
        with jax.profiler.trace(logdir, create_perfetto_trace=True):
            ours.step()
        (path,) = glob.glob(os.path.join(logdir, "**", "perfetto_trace.json.gz"), recursive=True)
        with gzip.open(path) as f:
            trace = json.load(f)
    events = trace["traceEvents"] if isinstance(trace, dict) else trace
    durations = collections.Counter()
    for event in events:
        name = event.get("name", "")
        if event.get("ph") == "X" and re.fullmatch(r"[a-z][\w\-]*\.\d+", name):
            durations[name.rsplit(".", 1)[0]] += event.get("dur", 0) / 1e6
    return _categorize(durations, _XLA_MATMUL_CONV.match, lambda n: "copy" in n or "transpose" in n)


def profile_theirs(theirs: Theirs) -> dict[str, float]:
    """Milliseconds per kind of aten operation in one step (self CPU time)."""
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        theirs.step()
    durations = {e.key: e.self_cpu_time_total / 1e6 for e in prof.key_averages()}
    return _categorize(durations, _TORCH_MATMUL_CONV.match, _TORCH_COPY.match)


# ------------------------------------------------------------------------------------------


def time_interleaved(sides: dict, warmup: int, repeats: int) -> dict[str, list[float]]:
    for fn in sides.values():
        for _ in range(warmup):
            fn()
    times = {name: [] for name in sides}
    for _ in range(repeats):
        for name, fn in sides.items():
            start = time.perf_counter()
            loss = fn()
            times[name].append(time.perf_counter() - start)
            if not math.isfinite(loss):
                raise SystemExit(f"{name}: non-finite loss {loss}")
    return times


def _versions():
    def version(dist):
        try:
            return importlib.metadata.version(dist)
        except importlib.metadata.PackageNotFoundError:
            return None

    return {
        d: version(d)
        for d in ("jax", "jaxlib", "flax", "optax", "torch", "imagen-pytorch", "einops")
    }


def _env():
    return dict(
        machine=platform.processor() or platform.machine(),
        cpus=os.cpu_count(),
        jax_backend=jax.default_backend(),
        jax_device=str(jax.devices()[0].device_kind),
        omp_wait_policy=os.environ.get("OMP_WAIT_POLICY"),
        allocator=logs.allocator(),  # moves both sides (bench/README.md)
        loadavg_1m=round(os.getloadavg()[0], 2),
        versions=_versions(),
    )


def _peer_sides(size, inputs, args) -> dict[str, Theirs]:
    """imagen-pytorch at each thread count of --torch_threads, eager and (--torch_compile)
    compiled; a compiled instance per thread count, as inductor's C++ kernels are generated
    for the thread count current at compile time."""
    sides = {}
    for threads in args.torch_threads:
        sides[f"imagen_pytorch_t{threads}"] = Theirs(size, inputs, threads=threads)
        if args.torch_compile:
            sides[f"imagen_pytorch_compiled_t{threads}"] = Theirs(
                size, inputs, threads=threads, compile_unet=True
            )
    return sides


def bench_size(name: str, args) -> list[dict]:
    size = dict(SIZES[name])
    size["res"] = args.res or size["res"]
    batch = args.batch or size["batch"]
    inputs = make_inputs(batch, size["res"], args.text_len, args.text_dim)
    schedule = schedules.LogSNRSchedule("linear")
    ours = Ours(size, inputs, schedule)
    peers = _peer_sides(size, inputs, args)
    theirs = next(iter(peers.values()))

    # Same objective first: both networks output zero at initialisation.
    t, eps = ours.time_and_noise()
    loss_ours, loss_theirs = ours.initial_loss(), theirs.initial_loss(t, eps)
    rel_diff = abs(loss_ours - loss_theirs) / abs(loss_theirs)
    if not rel_diff < 1e-5:
        raise SystemExit(f"losses differ: ours {loss_ours}, theirs {loss_theirs}; not timing")
    theirs_flops = torch_matmul_conv_flops(theirs.step)

    sides = {"imagen_jax": ours.step, **{k: peer.step for k, peer in peers.items()}}
    times = time_interleaved(sides, args.warmup, args.repeats)

    common = dict(
        bench="train_vs_imagen_pytorch",
        size=name,
        batch=batch,
        res=size["res"],
        text_len=args.text_len,
        text_dim=args.text_dim,
        dtype="float32",
    )
    info = {
        "imagen_jax": dict(
            side="imagen_jax",
            params=int(ours.params_count),
            model=dict(variant=size["ours"][0], **size["ours"][1]),
            compile_s=round(ours.compile_s, 2),
            flops_xla=ours.flops_xla,
            matmul_conv_flops=ours.matmul_conv_flops,
        )
    }
    for key, peer in peers.items():
        info[key] = dict(
            side="imagen_pytorch",
            torch_threads=peer.threads,
            torch_compile=peer.compile_s is not None,
            params=int(peer.params_count),
            model=size["theirs"],
            matmul_conv_flops=theirs_flops,
        )
        if peer.compile_s is not None:
            info[key]["compile_s"] = round(peer.compile_s, 2)
    records, median = [], {}
    for key, ts in times.items():
        median[key] = statistics.median(ts)
        records.append(
            dict(
                **common,
                **info[key],
                step_ms=round(1e3 * median[key], 1),
                step_ms_all=[round(1e3 * x, 1) for x in ts],
                images_per_s=round(batch / median[key], 3),
                **_env(),
            )
        )
    speedups = {k: round(median[k] / median["imagen_jax"], 3) for k in peers}
    summary = dict(
        **common,
        params_ours=int(ours.params_count),
        params_theirs=int(theirs.params_count),
        params_ratio=round(ours.params_count / theirs.params_count, 3),
        matmul_conv_flops_ratio=round(ours.matmul_conv_flops / theirs_flops, 3),
        speedup=speedups,  # ours images/s over theirs, per peer setting
        speedup_vs_fastest_peer=min(speedups.values()),
        initial_loss=dict(ours=loss_ours, theirs=loss_theirs, rel_diff=rel_diff),
        repeats=args.repeats,
        warmup=args.warmup,
        **_env(),
    )
    if args.profile:
        summary["profile_ms"] = {"imagen_jax": profile_ours(ours)}
        for key, peer in peers.items():
            summary["profile_ms"][key] = profile_theirs(peer)
    return [*records, summary]


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--size", default="small,mid", help="small | mid | small,mid")
    parser.add_argument("--res", type=int, default=0, help="0 = the size's (32 | 64)")
    parser.add_argument("--batch", type=int, default=0, help="0 = the size's (16 | 8)")
    parser.add_argument("--text_len", type=int, default=32)
    parser.add_argument("--text_dim", type=int, default=384, help="all-MiniLM-L6-v2's width")
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument(
        "--torch_threads",
        default=str(os.cpu_count()),
        help="comma-separated torch thread counts, one peer row each (e.g. 2,1)",
    )
    parser.add_argument("--torch_compile", action="store_true", help="also time torch.compile")
    parser.add_argument("--profile", action="store_true", help="per-op profile of one step")
    args = parser.parse_args()
    args.torch_threads = [int(n) for n in args.torch_threads.split(",")]
    for name in args.size.split(","):
        for record in bench_size(name, args):
            print(json.dumps(record), flush=True)


if __name__ == "__main__":
    main()
