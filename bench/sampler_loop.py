"""The sampler loop, ours (one compiled lax.scan) against the diffusers scheduler loop (eager
PyTorch), driving the same small network with the same weights and classifier-free guidance.

The network is a per-pixel MLP with a time embedding (no convolutions); `network_ms_per_call`
times one CFG-batched call of it alone on each side, so that the loop's own cost (scheduler
arithmetic, CFG batching, dispatch) is ms_per_step minus that. On the CPU the eager PyTorch
MLP itself is the larger part of the diffusers side; XLA fuses ours.

    python bench/sampler_loop.py --steps=50 --batch=2 --res=64 > results.jsonl

Prints one JSON line per (sampler, side) and one with the ratios. Medians of --repeats runs,
after a warm-up run (which also compiles ours).
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import time

import diffusers
import jax
import jax.numpy as jnp
import numpy as np
import torch

from imagen_jax.diffusion import samplers, schedules, time_grids

SD = dict(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012)
CASES = {  # name: (diffusers scheduler, our sampler, our grid)
    "ddim": (
        lambda: diffusers.DDIMScheduler(**SD, clip_sample=False, timestep_spacing="leading"),
        "ddim",
        lambda s, n: time_grids.ddim_grid(s, n, spacing="leading"),
    ),
    "dpmpp_2m": (
        lambda: diffusers.DPMSolverMultistepScheduler(**SD),
        "dpmpp_2m",
        lambda s, n: time_grids.sigma_grid(s, n, space="vp", dpm_spacing=True),
    ),
}


def make_weights(channels, hidden, cond_dim, seed=0):
    rng = np.random.default_rng(seed)
    f = lambda *s: (rng.normal(size=s) / np.sqrt(s[0])).astype(np.float32)  # noqa: E731
    return dict(
        w1=f(channels, hidden), w2=f(hidden, channels), wt=f(1, hidden), wc=f(cond_dim, hidden)
    )


def jax_net(p):
    def apply(params, z, t, cond):  # z [B, H, W, C]
        h = jnp.einsum("bhwc,cd->bhwd", z, params["w1"])
        h = h + (jnp.cos(t / 1000.0)[:, None] @ params["wt"])[:, None, None]
        h = h + (cond @ params["wc"])[:, None, None]
        return jnp.einsum("bhwd,dc->bhwc", jax.nn.silu(h), params["w2"])

    return apply


def torch_net(p, device):
    w = {k: torch.from_numpy(v).to(device) for k, v in p.items()}

    def apply(x, t, cond):  # x [B, C, H, W]
        h = x.permute(0, 2, 3, 1) @ w["w1"]  # [B, H, W, D]
        tt = torch.as_tensor(t, dtype=torch.float32, device=device).reshape(1, 1)
        tt = torch.cos(tt / 1000.0)
        h = h + (tt @ w["wt"])[:, None, None] + (cond @ w["wc"])[:, None, None]
        return (torch.nn.functional.silu(h) @ w["w2"]).permute(0, 3, 1, 2)

    return apply


def _sync(out, device):
    if device != "cpu":
        torch.cuda.synchronize()
    return out


def time_it(fn, repeats):
    fn()  # warm-up (and compilation for ours)
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def bench_case(name, args, p):
    make_ref, sampler, make_grid = CASES[name]
    shape = (args.batch, args.res, args.res, 4)
    cond = np.random.default_rng(1).normal(size=(args.batch, args.cond_dim)).astype(np.float32)
    x = np.random.default_rng(2).normal(size=shape).astype(np.float32)

    dev = args.torch_device
    net_t = torch_net(p, dev)
    cond_t = torch.cat([torch.zeros(args.batch, args.cond_dim), torch.from_numpy(cond)]).to(dev)
    x_t = torch.from_numpy(x).permute(0, 3, 1, 2).contiguous().to(dev)

    @torch.no_grad()
    def run_diffusers():
        sched = make_ref()
        sched.set_timesteps(args.steps)
        lat = x_t * sched.init_noise_sigma
        for t in sched.timesteps:
            inp = sched.scale_model_input(torch.cat([lat, lat]), t)
            out = net_t(inp, t, cond_t)
            out = out[: args.batch] + 7.5 * (out[args.batch :] - out[: args.batch])
            lat = sched.step(out, t, lat).prev_sample
        if dev != "cpu":
            torch.cuda.synchronize()
        return lat

    run = samplers.compile_sampler(jax_net(p), sampler=sampler)
    grid = make_grid(schedules.DiscreteSchedule.from_config(**_sched_kw()), args.steps)
    params = jax.tree.map(jnp.asarray, p)
    z, c, u = jnp.asarray(x), jnp.asarray(cond), jnp.zeros_like(jnp.asarray(cond))

    def run_ours():
        return run(params, z, grid, c, u, jnp.float32(7.5)).block_until_ready()

    # Same answer first: a benchmark of two different computations would mean nothing.
    ours_out = np.asarray(run_ours())
    ref_out = run_diffusers().permute(0, 2, 3, 1).cpu().numpy()
    max_err = float(np.abs(ours_out - ref_out).max())

    # The network alone, one CFG-batched call, to separate it from the loop around it.
    lat2 = torch.cat([x_t, x_t])
    jit_net = jax.jit(jax_net(p))
    z2, c2 = jnp.concatenate([z, z]), jnp.concatenate([u, c])
    t2 = jnp.full((2 * args.batch,), 500.0)
    net_only = {
        "diffusers": torch.no_grad()(lambda: _sync(net_t(lat2, 500.0, cond_t), dev)),
        "imagen_jax": lambda: jit_net(params, z2, t2, c2).block_until_ready(),
    }

    results = {}
    for side, fn in (("diffusers", run_diffusers), ("imagen_jax", run_ours)):
        sec = time_it(fn, args.repeats)
        results[side] = sec
        record = dict(
            bench="sampler_loop",
            sampler=name,
            side=side,
            steps=args.steps,
            batch=args.batch,
            res=args.res,
            seconds=sec,
            ms_per_step=1e3 * sec / args.steps,
            network_ms_per_call=1e3 * time_it(net_only[side], 4 * args.repeats),
            images_per_s=args.batch / sec,
            **_env(),
        )
        print(json.dumps(record))
    print(
        json.dumps(
            dict(
                bench="sampler_loop",
                sampler=name,
                speedup=results["diffusers"] / results["imagen_jax"],
                max_abs_diff=max_err,
                ref_max_abs=float(np.abs(ref_out).max()),
                **_env(),
            )
        )
    )


def _sched_kw():
    return dict(name="scaled_linear", beta_start=0.00085, beta_end=0.012)


def _env():
    return dict(
        machine=platform.processor() or platform.machine(),
        jax_backend=jax.default_backend(),
        jax=jax.__version__,
        torch=torch.__version__,
        diffusers=diffusers.__version__,
        torch_threads=torch.get_num_threads(),
        torch_device=str(torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu"),
    )


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--steps", type=int, default=50)
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--res", type=int, default=64)
    parser.add_argument("--hidden", type=int, default=64)
    parser.add_argument("--cond_dim", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--cases", default=",".join(CASES))
    parser.add_argument("--torch_device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = parser.parse_args()
    p = make_weights(4, args.hidden, args.cond_dim)
    for name in args.cases.split(","):
        bench_case(name, args, p)


if __name__ == "__main__":
    main()
