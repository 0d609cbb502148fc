"""SD 1.5 (512 px) and SDXL (1024 px) sampling at full size, each side in its own process:
ours against diffusers' eager loop, `torch.compile(unet)` (default mode) and
`torch.compile(unet, mode="reduce-overhead")` (CUDA graphs), on the same weights and inputs.

The driver builds the UNet of the real class (diffusers' `UNet2DConditionModel` with SD 1.5's
or SDXL base's configuration; random weights from a seed) on the CPU, saves it with
`save_pretrained` in the peer's dtype, and writes the inputs (initial noise, text tokens;
SDXL's pooled text and size ids) to the same folder. Then each side runs alone in a fresh
process (neither holds the other's memory, compiled graphs or allocator) under its own time
limit: it loads the weights, runs DPM-Solver++(2M) with SD's settings, `--steps` steps,
classifier-free guidance 7.5 as one network call on the doubled batch per step, and for each
batch size a first call (compilation) then `--repeats` timed calls. Each writes its final
latents; the driver prints one JSON line per side and batch (steps per second counted as a
diffusers pipeline's progress bar counts them, and how far its final latents are from
ours) and one per batch with our speedup over each side and over the fastest of them
(`ours_speedup_vs_strongest`, the target's ratio). In float32 on both sides the latents
must agree within 1e-3 (relative L2) or the run stops.

    python bench/sampling_sides.py --unet sd15 --batch 1,8                  # on a GPU
    python bench/sampling_sides.py --unet sdxl --batch 1 --side_timeout 240
    python bench/sampling_sides.py --unet sd15 --batch 1,2 --latent 8 --steps 2 \\
        --repeats 1 --dtype float32 --peer_dtype float32                    # CPU smoke
    python bench/sampling_sides.py --unet sdxl_smoke --batch 1,2 --latent 16 --steps 2 \\
        --repeats 1 --dtype float32 --peer_dtype float32                    # CPU smoke

On a CPU, `reduce-overhead` has no CUDA graphs to capture; its row is torch.compile's.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time

import numpy as np
import sd_unet_forward
from sd_sampling import GUIDANCE, SCHEDULERS, SD_BETAS, TOL
from sd_unet_forward import SD15_BLOCKS

UNETS = {  # name: UNet2DConditionModel arguments (sample_size = the latent side)
    "sd15": dict(
        sample_size=64,
        block_out_channels=(320, 640, 1280, 1280),
        cross_attention_dim=768,
        **SD15_BLOCKS,
    ),
    "sdxl": dict(  # stabilityai/stable-diffusion-xl-base-1.0's unet/config.json
        sample_size=128,
        block_out_channels=(320, 640, 1280),
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
        layers_per_block=2,
        transformer_layers_per_block=(1, 2, 10),
        attention_head_dim=(5, 10, 20),
        cross_attention_dim=2048,
        use_linear_projection=True,
        addition_embed_type="text_time",
        addition_time_embed_dim=256,
        projection_class_embeddings_input_dim=2816,
        norm_num_groups=32,
    ),
}
# SDXL's blocks, micro-conditioning and text widths at a tenth of its width and depth: the
# CPU smoke of the SDXL path (not a measurement).
UNETS["sdxl_smoke"] = dict(
    UNETS["sdxl"],
    block_out_channels=(32, 64, 128),
    transformer_layers_per_block=(1, 1, 2),
    attention_head_dim=(1, 2, 4),
)
POOLED = 1280  # SDXL's pooled text width
SIDES = ("imagen_jax", "diffusers_eager", "diffusers_compile", "diffusers_reduce_overhead")
COMPILE_MODES = {"diffusers_compile": "default", "diffusers_reduce_overhead": "reduce-overhead"}
# Published diffusers figures on an H100, fp16, SD 1.5 at 512 px, batch 1 (chengzeyi/
# stable-fast README): steps per second.
PUBLISHED_H100_IT_S = {
    "sd15": {"diffusers_eager": 54.5, "torch_compile": 66.0, "stable_fast": 104.6}
}
TOKENS = 77


# ----------------------------------------------------------------------------------------------
# Inputs


def write_inputs(folder: str, unet: str, batches, latent: int, seed: int = 0) -> None:
    """The inputs of the largest batch (smaller batches take its first rows), float32."""
    rng = np.random.default_rng(seed)
    b = max(batches)
    dim = UNETS[unet]["cross_attention_dim"]
    arrays = dict(
        noise=rng.standard_normal((b, latent, latent, 4)),
        cond=rng.standard_normal((b, TOKENS, dim)),
        uncond=rng.standard_normal((b, TOKENS, dim)),
    )
    if unet.startswith("sdxl"):
        size = 8 * latent
        ids = np.tile(np.asarray([[size, size, 0, 0, size, size]], np.float64), (b, 1))
        arrays.update(
            pooled=rng.standard_normal((b, POOLED)),
            uncond_pooled=rng.standard_normal((b, POOLED)),
            time_ids=ids,
        )
    np.savez(
        os.path.join(folder, "inputs.npz"), **{k: v.astype(np.float32) for k, v in arrays.items()}
    )


def read_inputs(folder: str, batch: int) -> dict:
    with np.load(os.path.join(folder, "inputs.npz")) as f:
        return {k: f[k][:batch] for k in f.files}


# ----------------------------------------------------------------------------------------------
# The sides (each in its own process)


def ours(folder: str, dtype: str, steps: int):
    """A function of the inputs -> final latents [B, h, w, 4], ours (one compiled program)."""
    import jax
    import jax.numpy as jnp
    from flax import nnx

    from imagen_jax.diffusion import config as diffusion_config
    from imagen_jax.diffusion import samplers
    from imagen_jax.models import sd_unet

    model, _ = sd_unet.load_unet(os.path.join(folder, "unet"), jnp.dtype(dtype))
    graph, state = nnx.split(model)

    def apply_fn(state, z, t, cond):
        return nnx.merge(graph, state)(z, t, cond["text"], added_cond=cond.get("added"))

    diffusion = diffusion_config.diffusion_config(
        schedule=SD_BETAS["beta_schedule"],
        beta_start=SD_BETAS["beta_start"],
        beta_end=SD_BETAS["beta_end"],
    )
    sample = diffusion_config.sample_config(
        sampler="dpmpp_2m", steps=steps, steps_offset=1, guidance_scale=GUIDANCE
    )
    sampling = diffusion_config.make_sampling(diffusion, sample)
    run = samplers.compile_sampler(
        apply_fn,
        sampler=sampling.sampler,
        sampler_options=sampling.sampler_options,
        **sampling.denoiser_options,
    )

    def call(x: dict) -> np.ndarray:
        cond = {"text": jnp.asarray(x["cond"], dtype)}
        uncond = {"text": jnp.asarray(x["uncond"], dtype)}
        if "pooled" in x:
            cond["added"] = dict(text_embeds=x["pooled"], time_ids=x["time_ids"])
            uncond["added"] = dict(text_embeds=x["uncond_pooled"], time_ids=x["time_ids"])
        z = sampling.grid.init_sigma * jnp.asarray(x["noise"])
        out = run(state, z, sampling.grid, cond, uncond, jnp.float32(GUIDANCE))
        return np.asarray(out, np.float32)

    return call, jax.devices()[0].device_kind


def theirs(folder: str, dtype: str, steps: int, side: str):
    """The StableDiffusion(XL)Pipeline's denoising loop from embeddings: one UNet call on the
    CFG-doubled batch per step, latents float32, the UNet eager or under torch.compile."""
    import diffusers
    import torch

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    torch_dtype = getattr(torch, dtype)
    unet = diffusers.UNet2DConditionModel.from_pretrained(
        os.path.join(folder, "unet"), torch_dtype=torch_dtype
    )
    unet = unet.to(device).eval()
    if side in COMPILE_MODES:
        unet = torch.compile(unet, mode=COMPILE_MODES[side])
    scheduler = SCHEDULERS["dpmpp_2m"]()
    graphs = side == "diffusers_reduce_overhead" and device.type == "cuda"

    def put(*arrays):
        return torch.from_numpy(np.concatenate(arrays)).to(device, torch_dtype)

    @torch.no_grad()
    def call(x: dict) -> np.ndarray:
        text = put(x["uncond"], x["cond"])
        added = None
        if "pooled" in x:
            added = dict(
                text_embeds=put(x["uncond_pooled"], x["pooled"]),
                time_ids=put(x["time_ids"], x["time_ids"]),
            )
        scheduler.set_timesteps(steps, device=device)
        z = torch.from_numpy(np.ascontiguousarray(x["noise"].transpose(0, 3, 1, 2))).to(device)
        latents = z * scheduler.init_noise_sigma
        for t in scheduler.timesteps:
            if graphs:  # a new step: CUDA graphs may reuse the last call's output memory
                torch.compiler.cudagraph_mark_step_begin()
            inp = torch.cat([latents] * 2).to(torch_dtype)
            eps = unet(
                inp, t, encoder_hidden_states=text, added_cond_kwargs=added, return_dict=False
            )[0].to(torch.float32, copy=True)
            eps_uncond, eps_cond = eps.chunk(2)
            latents = scheduler.step(
                eps_uncond + GUIDANCE * (eps_cond - eps_uncond), t, latents, return_dict=False
            )[0]
        if device.type == "cuda":
            torch.cuda.synchronize()
        return latents.cpu().numpy().transpose(0, 2, 3, 1)

    name = torch.cuda.get_device_name() if device.type == "cuda" else "cpu"
    return call, name


def run_side(args) -> None:
    """One side: per batch, a first call then --repeats timed calls; JSON lines out."""
    start = time.perf_counter()
    if args.side == "imagen_jax":
        call, device = ours(args.folder, args.dtype, args.steps)
    else:
        call, device = theirs(args.folder, args.peer_dtype, args.steps, args.side)
    load_s = time.perf_counter() - start
    for batch in args.batch:
        x = read_inputs(args.folder, batch)
        start = time.perf_counter()
        out = call(x)
        first_s = time.perf_counter() - start
        times = []
        for _ in range(args.repeats):
            start = time.perf_counter()
            out = call(x)
            times.append(time.perf_counter() - start)
        np.save(os.path.join(args.folder, f"{args.side}_{batch}.npy"), out)
        seconds = float(np.median(times))
        record = dict(side=args.side, batch=batch, seconds=seconds, it_per_s=args.steps / seconds)
        record.update(first_call_s=first_s, load_s=load_s, device=device)
        record["finite"] = bool(np.isfinite(out).all())
        print(json.dumps(record), flush=True)


# ----------------------------------------------------------------------------------------------
# The driver


def build_weights(folder: str, unet: str, latent: int, dtype: str) -> int:
    """diffusers' random UNet (seed 3) saved as `folder/unet`; its parameter count."""
    import diffusers
    import torch

    torch.manual_seed(3)
    config = dict(UNETS[unet], sample_size=latent)
    model = diffusers.UNet2DConditionModel(in_channels=4, out_channels=4, **config).eval()
    params = sum(p.numel() for p in model.parameters())
    model.to(getattr(torch, dtype)).save_pretrained(os.path.join(folder, "unet"))
    return params


def drive(args) -> None:
    with tempfile.TemporaryDirectory() as folder:
        start = time.perf_counter()
        params = build_weights(folder, args.unet, args.latent, args.peer_dtype)
        write_inputs(folder, args.unet, args.batch, args.latent)
        common = dict(
            bench="sampling_sides",
            unet=args.unet,
            unet_params=params,
            latent=args.latent,
            image_size=8 * args.latent,
            steps=args.steps,
            sampler="dpmpp_2m",
            guidance_scale=GUIDANCE,
            repeats=args.repeats,
            build_s=time.perf_counter() - start,
            **sd_unet_forward._env(args, os.getloadavg()),
        )
        if args.unet in PUBLISHED_H100_IT_S and args.latent == UNETS[args.unet]["sample_size"]:
            common["published_h100_it_per_s"] = PUBLISHED_H100_IT_S[args.unet]
        records = {}
        for side in args.sides:
            command = [sys.executable, os.path.abspath(__file__), "--side", side, "--folder",
                       folder, "--unet", args.unet, "--batch", ",".join(map(str, args.batch)),
                       "--steps", str(args.steps), "--repeats", str(args.repeats),
                       "--dtype", args.dtype, "--peer_dtype", args.peer_dtype]  # fmt: skip
            try:
                done = subprocess.run(
                    command, capture_output=True, text=True, timeout=args.side_timeout
                )
            except subprocess.TimeoutExpired:
                print(json.dumps(dict(common, side=side, timed_out=args.side_timeout)), flush=True)
                continue
            if done.returncode:
                sys.stderr.write(done.stderr[-4000:])
                print(json.dumps(dict(common, side=side, exit=done.returncode)), flush=True)
                continue
            for line in done.stdout.splitlines():
                if line.startswith("{"):
                    record = json.loads(line)
                    records[(side, record["batch"])] = record
        report(args, folder, common, records)


def report(args, folder: str, common: dict, records: dict) -> None:
    exact = args.dtype == "float32" and args.peer_dtype == "float32"
    for batch in args.batch:
        ours_record = records.get(("imagen_jax", batch))
        ref = None
        if ours_record is not None:
            ref = np.load(os.path.join(folder, f"imagen_jax_{batch}.npy"))
        speedups = {}
        for side in args.sides:
            record = records.get((side, batch))
            if record is None:
                continue
            line = dict(
                common, **record, dtype=args.dtype if side == "imagen_jax" else args.peer_dtype
            )
            if ref is not None and side != "imagen_jax":
                other = np.load(os.path.join(folder, f"{side}_{batch}.npy"))
                rel = float(np.linalg.norm(ref - other) / np.linalg.norm(other))
                line.update(
                    final_latents_rel_l2=rel,
                    final_latents_max_abs_diff=float(np.abs(ref - other).max()),
                )
                if exact and rel > TOL:
                    raise SystemExit(f"{side} and ours disagree in float32 (batch {batch}): {rel}")
                speedups[side] = record["seconds"] / ours_record["seconds"]
                line["ours_speedup"] = speedups[side]
            print(json.dumps(line), flush=True)
        if speedups:
            strongest = min(speedups, key=speedups.get)
            summary = dict(common, batch=batch, summary=True, strongest_peer=strongest)
            summary.update({f"ours_speedup_vs_{k}": v for k, v in speedups.items()})
            summary["ours_speedup_vs_strongest"] = speedups[strongest]
            print(json.dumps(summary), flush=True)


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--unet", default="sd15", choices=sorted(UNETS))
    parser.add_argument("--batch", default="1,8", type=lambda s: [int(b) for b in s.split(",")])
    parser.add_argument("--latent", type=int, default=0, help="latent side (0: the UNet's)")
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--dtype", default="bfloat16", help="ours: float32 | bfloat16")
    parser.add_argument("--peer_dtype", default="float16", help="float32 | float16 | bfloat16")
    parser.add_argument("--sides", default=",".join(SIDES), type=lambda s: s.split(","))
    parser.add_argument("--side_timeout", type=int, default=300, help="seconds for each side")
    parser.add_argument("--note", default="")
    parser.add_argument("--side", default="", help=argparse.SUPPRESS)  # a side's own process
    parser.add_argument("--folder", default="", help=argparse.SUPPRESS)
    args = parser.parse_args()
    args.latent = args.latent or UNETS[args.unet]["sample_size"]
    unknown = set(args.sides) - set(SIDES)
    if unknown:
        parser.error(f"--sides: unknown {sorted(unknown)}; the sides are {', '.join(SIDES)}")
    sd_unet_forward.import_torchvision_without_operators()
    if args.side:
        run_side(args)
    else:
        drive(args)


if __name__ == "__main__":
    main()
