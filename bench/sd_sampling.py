"""Stable Diffusion sampling: our LatentPipeline (one compiled program for the denoising loop)
against diffusers' StableDiffusionPipeline (eager PyTorch), on the same pipeline directory.

A diffusers pipeline of random components of the real classes (CLIP text encoder and
tokenizer, UNet2DConditionModel, AutoencoderKL) is built from seeds and saved with
`save_pretrained` once per scheduler (DDIM and DPM-Solver++(2M) with SD's settings); ours
loads the directory with `load_latent_pipeline`. Both sample the same prompts from the same
initial latents, 20 steps, classifier-free guidance 7.5 (one network call on the doubled
batch per step on both sides). Configs (the UNets of bench/sd_unet_forward.py):

  tiny  UNet tiny (16x16 latents), CLIP 2 layers of 32, VAE (16, 32): 32 px images.
  mid   UNet mid (SD 1.5's blocks at widths (64, 128, 256, 256), 32x32 latents), CLIP of
        SD 1.5's width (768, 12 heads) but 4 layers instead of 12, VAE of SD's 4 levels at
        widths (32, 64, 128, 128): 256 px images.

Two things are timed, on both sides:
  loop  the denoising loop alone: from text embeddings and initial latents to the final
        latents (ours: the pipeline's compiled sampler; diffusers: the pipeline called with
        prompt_embeds and output_type="latent").
  full  prompts to images: text encoding, the loop, the VAE decode, to numpy.
`unet_ms` is one CFG-batched UNet call alone on each side, so that a loop's own overhead
is ms_per_step - unet_ms.

    OMP_WAIT_POLICY=PASSIVE python bench/sd_sampling.py --configs tiny --batch 2 --torch_1thread_row
    OMP_WAIT_POLICY=PASSIVE python bench/sd_sampling.py --configs mid --batch 1 --torch_1thread_row

(--torch_1thread_row adds diffusers' loop on one PyTorch thread; see sd_unet_forward.py on
OMP_WAIT_POLICY.)

The final images must agree within 1e-3 (values in [0, 1]) before anything is timed. Medians
of --repeats rounds after a warm-up (which compiles ours), the sides taking turns.

SD 1.5 and SDXL at full size, on a GPU, each side in its own process: bench/sampling_sides.py.
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import time

import diffusers
import jax
import jax.numpy as jnp
import numpy as np
import sd_unet_forward
import torch
import transformers
from flax import nnx
from tokenizers import pre_tokenizers

from imagen_jax.diffusion import config as diffusion_config
from imagen_jax.pipelines.public import load_latent_pipeline

SD_BETAS = dict(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012)
SCHEDULERS = {  # our sampler name: SD's scheduler settings in diffusers
    "ddim": lambda: diffusers.DDIMScheduler(
        **SD_BETAS, clip_sample=False, set_alpha_to_one=False, steps_offset=1
    ),
    "dpmpp_2m": lambda: diffusers.DPMSolverMultistepScheduler(**SD_BETAS, steps_offset=1),
}
TEXT = {  # CLIPTextConfig sizes per config
    "tiny": dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4),
    "mid": dict(
        hidden_size=768, intermediate_size=3072, num_hidden_layers=4, num_attention_heads=12
    ),
}
VAE = {  # AutoencoderKL sizes per config
    "tiny": dict(block_out_channels=(16, 32), layers_per_block=1, norm_num_groups=8),
    "mid": dict(block_out_channels=(32, 64, 128, 128), layers_per_block=2, norm_num_groups=32),
}
PROMPTS = [
    "a red circle above a blue square",
    "two green stars next to a yellow triangle",
    "a purple hexagon on a white background",
    "three orange crosses below a black circle",
]
GUIDANCE = 7.5
TOL = 1e-3


# ----------------------------------------------------------------------------------------------
# The diffusers pipeline of random components


def clip_tokenizer():
    """A CLIP BPE tokenizer over the byte alphabet (every word is spelled out in characters,
    apart from a few merges): real tokenization code, no vocabulary file to download."""
    alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())
    vocab = {ch: i for i, ch in enumerate(alphabet)}
    vocab |= {ch + "</w>": len(vocab) + i for i, ch in enumerate(alphabet)}
    merges = [("r", "e"), ("re", "d</w>"), ("t", "w"), ("tw", "o</w>"), ("s", "t")]
    for a, b in merges:
        vocab[a + b] = len(vocab)
    vocab["<|startoftext|>"] = len(vocab)
    vocab["<|endoftext|>"] = len(vocab)
    return transformers.CLIPTokenizer(vocab=vocab, merges=merges, model_max_length=77)


def build_pipeline(name: str, scheduler) -> diffusers.StableDiffusionPipeline:
    tokenizer = clip_tokenizer()
    text_config = transformers.CLIPTextConfig(
        vocab_size=len(tokenizer),
        max_position_embeddings=77,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        **TEXT[name],
    )
    torch.manual_seed(1)
    text_encoder = transformers.CLIPTextModel(text_config).eval()
    unet_config = sd_unet_forward.CONFIGS[name]
    unet = sd_unet_forward.build_diffusers_unet(unet_config, seed=3)
    with torch.no_grad():  # random weights give a faint output; make the images vary more
        unet.conv_out.weight.mul_(4.0)
    torch.manual_seed(2)
    scale = 2 ** (len(VAE[name]["block_out_channels"]) - 1)
    vae = diffusers.AutoencoderKL(
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D",) * len(VAE[name]["block_out_channels"]),
        up_block_types=("UpDecoderBlock2D",) * len(VAE[name]["block_out_channels"]),
        latent_channels=4,
        sample_size=unet_config["sample_size"] * scale,
        **VAE[name],
    ).eval()
    pipe = diffusers.StableDiffusionPipeline(
        vae=vae,
        text_encoder=text_encoder,
        tokenizer=tokenizer,
        unet=unet,
        scheduler=scheduler,
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )
    pipe.set_progress_bar_config(disable=True)
    return pipe


def count_params(pipe) -> dict:
    return {
        f"params_{part}": sum(p.numel() for p in getattr(pipe, part).parameters())
        for part in ("unet", "text_encoder", "vae")
    }


# ----------------------------------------------------------------------------------------------
# The two sides


def diffusers_side(pipe, prompts, noise, steps):
    """(loop, full): the denoising loop from text embeddings, and prompts -> images."""
    latents = torch.from_numpy(np.ascontiguousarray(noise.transpose(0, 3, 1, 2)))
    with torch.no_grad():
        embeds, negative = pipe.encode_prompt(
            prompts, "cpu", 1, True, negative_prompt=[""] * len(prompts)
        )
    common = dict(num_inference_steps=steps, guidance_scale=GUIDANCE, latents=latents)

    @torch.no_grad()
    def loop():
        out = pipe(
            prompt_embeds=embeds, negative_prompt_embeds=negative, output_type="latent", **common
        )
        return out.images.numpy().transpose(0, 2, 3, 1)

    @torch.no_grad()
    def full():
        return pipe(prompts, output_type="np", **common).images

    return loop, full


def ours_side(pipe, prompts, noise, steps):
    """(loop, full), as diffusers_side. The loop is the compiled sampler that
    `LatentPipeline.__call__` runs, called with the same arguments (checked below)."""
    sample = pipe.settings(steps=steps, guidance_scale=GUIDANCE)
    sampling = diffusion_config.make_sampling(pipe.diffusion, sample)
    h, w = noise.shape[1:3]
    cond, uncond = pipe.conditioning(prompts, height=h * pipe.vae_scale, width=w * pipe.vae_scale)
    keys = jax.vmap(lambda i: jax.random.fold_in(jax.random.key(0), i))(jnp.arange(len(prompts)))
    run = pipe._sampler(sampling)
    z = sampling.grid.init_sigma * jnp.asarray(noise)
    scale = jnp.float32(GUIDANCE)

    def loop():
        out = run(pipe._unet_state, z, sampling.grid, cond, uncond, scale, keys)
        return out.block_until_ready()

    def full():
        return pipe(prompts, noise=noise, steps=steps, guidance_scale=GUIDANCE).images

    return loop, full


def unet_calls(ref, ours, name: str, batch: int):
    """One CFG-batched UNet call (batch 2B) on each side, same inputs."""
    z, t, text = sd_unet_forward.make_inputs(sd_unet_forward.CONFIGS[name], 2 * batch)
    z_t = torch.from_numpy(np.ascontiguousarray(z.transpose(0, 3, 1, 2)))
    t_t, text_t = torch.from_numpy(t), torch.from_numpy(text)
    graph, state = nnx.split(ours.unet)
    forward = jax.jit(lambda state, *a: nnx.merge(graph, state)(*a))
    args = [jnp.asarray(a) for a in (z, t, text)]

    @torch.no_grad()
    def theirs():
        return ref.unet(z_t, t_t, encoder_hidden_states=text_t, return_dict=False)[0]

    return {"diffusers": theirs, "imagen_jax": lambda: forward(state, *args).block_until_ready()}


# ----------------------------------------------------------------------------------------------
# The benchmark


def bench_config(name: str, args, tmp: str) -> None:
    prompts = (PROMPTS * args.batch)[: args.batch]
    side = sd_unet_forward.CONFIGS[name]["sample_size"]
    noise = np.random.default_rng(0).standard_normal((args.batch, side, side, 4))
    noise = noise.astype(np.float32)
    for scheduler in args.schedulers:
        ref = build_pipeline(name, SCHEDULERS[scheduler]())
        path = os.path.join(tmp, f"{name}_{scheduler}")
        ref.save_pretrained(path)
        ours = load_latent_pipeline(path)
        assert ours.sample.sampler == scheduler, ours.sample.sampler
        fns = {}
        fns["diffusers_loop"], fns["diffusers_full"] = diffusers_side(
            ref, prompts, noise, args.steps
        )
        fns["imagen_jax_loop"], fns["imagen_jax_full"] = ours_side(ours, prompts, noise, args.steps)
        checks = check_sides(f"{name}/{scheduler}", fns, ours, prompts, noise, args.steps)
        # The calls in check_sides were the warm-ups (and compiled ours).
        unet_fns = unet_calls(ref, ours, name, args.batch)
        if args.torch_1thread_row:
            one = sd_unet_forward.with_torch_threads
            fns["diffusers_1thread_loop"] = one(fns["diffusers_loop"], 1)
            unet_fns["diffusers_1thread"] = one(unet_fns["diffusers"], 1)
            fns["diffusers_1thread_loop"]()
        for fn in unet_fns.values():
            fn()
        load_before = os.getloadavg()
        seconds = sd_unet_forward.time_interleaved(fns, args.repeats)
        unet_s = sd_unet_forward.time_interleaved(unet_fns, args.repeats)
        common = dict(
            bench="sd_sampling",
            config=name,
            scheduler=scheduler,
            steps=args.steps,
            batch=args.batch,
            guidance_scale=GUIDANCE,
            image_size=side * ours.vae_scale,
            latent=side,
            repeats=args.repeats,
            **count_params(ref),
            **sd_unet_forward._env(args, load_before),
        )
        report(common, seconds, unet_s, checks, args)


def check_sides(what, fns, ours, prompts, noise, steps) -> dict:
    """The two sides' final images (and latents) agree; the timed loop of ours is what
    `LatentPipeline.__call__` runs. Returns the differences and ours' first-call time."""
    start = time.perf_counter()
    ours_images = fns["imagen_jax_full"]()
    compile_s = time.perf_counter() - start
    image_err = max_diff(what, ours_images, fns["diffusers_full"](), "images", TOL)
    ours_latents = np.asarray(fns["imagen_jax_loop"]())
    call_latents = ours(prompts, noise=noise, steps=steps, output="latent").latents
    if not np.array_equal(ours_latents, np.asarray(call_latents)):
        raise SystemExit(f"{what}: the timed loop is not what LatentPipeline.__call__ runs")
    ref_latents = fns["diffusers_loop"]()
    scale = float(np.abs(ref_latents).max())
    latent_err = max_diff(what, ours_latents, ref_latents, "latents", TOL * scale)
    return dict(
        compile_s=compile_s,
        max_abs_diff_images=image_err,
        max_abs_diff_latents=latent_err,
        ref_latents_max_abs=scale,
    )


def max_diff(what, ours, ref, name, tol) -> float:
    err = float(np.abs(np.asarray(ours) - ref).max())
    if ref.std() < 0.01 or err > tol:
        raise SystemExit(
            f"{what}: {name} disagree (max abs {err:.2e}, reference std {ref.std():.3f}); "
            "not timing"
        )
    return err


def report(common, seconds, unet_s, checks, args) -> None:
    """One JSON line per side, one with the ratios and the checks."""
    steps, batch = args.steps, args.batch
    for who in unet_s:
        loop_s, full_s = seconds[f"{who}_loop"], seconds.get(f"{who}_full")
        record = dict(
            common,
            side=who,
            loop_ms_per_step=1e3 * loop_s / steps,
            full_ms_per_step=full_s and 1e3 * full_s / steps,
            unet_ms=1e3 * unet_s[who],
            loop_s=loop_s,
            full_s=full_s,
            images_per_s=full_s and batch / full_s,
            loop_images_per_s=batch / loop_s,
            compile_s=checks["compile_s"] if who == "imagen_jax" else None,
        )
        print(json.dumps(record), flush=True)
    ratios = dict(
        speedup_loop=seconds["diffusers_loop"] / seconds["imagen_jax_loop"],
        speedup_full=seconds["diffusers_full"] / seconds["imagen_jax_full"],
        speedup_unet=unet_s["diffusers"] / unet_s["imagen_jax"],
    )
    if "diffusers_1thread" in unet_s:
        ratios["speedup_loop_vs_1thread"] = (
            seconds["diffusers_1thread_loop"] / seconds["imagen_jax_loop"]
        )
        ratios["speedup_unet_vs_1thread"] = unet_s["diffusers_1thread"] / unet_s["imagen_jax"]
    print(json.dumps(dict(common, **ratios, **checks)), flush=True)


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--configs", default="tiny,mid")
    parser.add_argument("--schedulers", default=",".join(SCHEDULERS))
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--torch_threads", type=int, default=0, help="0: torch's default")
    parser.add_argument(
        "--torch_1thread_row", action="store_true", help="add diffusers' loop on one thread"
    )
    parser.add_argument("--note", default="", help="e.g. what else the machine was running")
    args = parser.parse_args()
    if args.torch_threads:
        torch.set_num_threads(args.torch_threads)
    args.schedulers = args.schedulers.split(",")
    sd_unet_forward.import_torchvision_without_operators()
    with tempfile.TemporaryDirectory() as tmp:
        for name in args.configs.split(","):
            bench_config(name, args, tmp)


if __name__ == "__main__":
    main()
