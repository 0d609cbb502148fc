"""Captioning throughput: our compiled GIT generation (`pipelines.captioning`, one
`lax.while_loop` over a key/value cache) against transformers' `GitForCausalLM.generate`
(eager PyTorch, torch.no_grad), same random weights, same preprocessed images, same CPU.

The default model has GIT-base's decoder (6 layers of width 768, 12 heads, BERT's 30522-token
vocabulary) and a smaller image tower than GIT-base's ViT-B/16 (width 384, 6 layers, 224 px
in 32 px patches: 50 image tokens), so that batch 32 with 3 beams runs in a few minutes on
a 2-core CPU; `--vision base` takes GIT-base's tower. Random weights rarely produce [SEP],
so every caption runs to max_length: the worst case for both sides.

    python bench/git_generate.py --batches 1,32 --max_length 20 --num_beams 3 --repeats 3

Prints one JSON line per (batch, strategy, side) and one with the ratio. Medians of
--repeats runs after a warm-up (which compiles ours), the two sides taking turns. Both sides
must give the same token ids before anything is timed.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import tempfile
import time

import jax
import numpy as np
import sd_unet_forward
import torch
import transformers

from imagen_jax.images import ImageProcessor
from imagen_jax.models import git
from imagen_jax.pipelines import captioning

VISION = {
    "small": dict(hidden_size=384, intermediate_size=1536, num_hidden_layers=6,
                  num_attention_heads=6, image_size=224, patch_size=32),
    "base": dict(hidden_size=768, intermediate_size=3072, num_hidden_layers=12,
                 num_attention_heads=12, image_size=224, patch_size=16),
}  # fmt: skip


def time_interleaved(fns: dict, repeats: int) -> dict[str, float]:
    """Median seconds of each function, run in turns (a shared CPU's drift hits both)."""
    for fn in fns.values():
        fn()  # warm-up (compiles ours)
    times = {name: [] for name in fns}
    for _ in range(repeats):
        for name, fn in fns.items():
            start = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - start)
    return {name: statistics.median(t) for name, t in times.items()}


def make_model(path: str, vision: str) -> transformers.GitForCausalLM:
    torch.manual_seed(0)
    config = transformers.GitConfig(vision_config=VISION[vision], initializer_range=0.05)
    hf = transformers.GitForCausalLM(config).eval()
    hf.save_pretrained(path)
    return hf


def bench(batch: int, num_beams: int, args, hf, ours, pixels: np.ndarray):
    x = pixels[:batch]
    x_t = torch.from_numpy(x).permute(0, 3, 1, 2).contiguous()
    settings = dict(max_length=args.max_length, num_beams=num_beams, do_sample=False)
    if num_beams > 1:
        settings["length_penalty"] = args.length_penalty
    decoding = captioning.Decoding(
        max_length=args.max_length,
        num_beams=num_beams,
        length_penalty=settings.get("length_penalty", 1.0),
        eos_token_id=(hf.config.eos_token_id,),
        pad_token_id=hf.config.pad_token_id,
    )
    captioner = captioning.Captioner(
        ours, ImageProcessor(), tokenizer=None, decoding=decoding, batch_size=batch
    )

    @torch.no_grad()
    def theirs():
        return hf.generate(pixel_values=x_t, **settings).numpy()

    def mine():
        return captioner.generate(x).crop()

    same = bool(np.array_equal(theirs(), mine()))
    if not same and not args.allow_mismatch:
        raise SystemExit(f"batch {batch}, {num_beams} beams: the token ids differ; not timing")
    seconds = time_interleaved({"transformers": theirs, "imagen_jax": mine}, args.repeats)
    strategy = "greedy" if num_beams == 1 else f"beam{num_beams}"
    common = dict(
        bench="git_generate",
        batch=batch,
        strategy=strategy,
        max_length=args.max_length,
        vision=args.vision,
        same_ids=same,
        **_env(),
    )
    for side, sec in seconds.items():
        record = dict(side=side, ms_per_batch=1e3 * sec, captions_per_s=batch / sec, **common)
        print(json.dumps(record), flush=True)
    speedup = seconds["transformers"] / seconds["imagen_jax"]
    print(json.dumps(dict(speedup=speedup, **common)), flush=True)


def _env():
    return dict(
        model="GIT-base decoder, random weights",
        machine=platform.processor() or platform.machine(),
        cpus=os.cpu_count(),
        jax_backend=jax.default_backend(),
        jax=jax.__version__,
        torch=torch.__version__,
        transformers=transformers.__version__,
        torch_threads=torch.get_num_threads(),
        jax_device=str(jax.devices()[0].device_kind),
        load_avg_1min=os.getloadavg()[0],  # other work on a shared machine slows both sides
    )


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--batches", default="1,32")
    parser.add_argument("--max_length", type=int, default=20)
    parser.add_argument("--num_beams", type=int, default=3, help="0: greedy only")
    parser.add_argument("--length_penalty", type=float, default=1.0)
    parser.add_argument("--vision", default="small", choices=sorted(VISION))
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--allow_mismatch", action="store_true")
    args = parser.parse_args()
    sd_unet_forward.import_torchvision_without_operators()
    batches = [int(b) for b in args.batches.split(",")]
    with tempfile.TemporaryDirectory() as path:
        hf = make_model(path, args.vision)
        ours = git.load_git(path)
    size = hf.config.vision_config.image_size
    pixels = np.random.default_rng(0).normal(size=(max(batches), size, size, 3))
    pixels = pixels.astype(np.float32)
    strategies = [1] + ([args.num_beams] if args.num_beams > 1 else [])
    for batch in batches:
        for num_beams in strategies:
            bench(batch, num_beams, args, hf, ours, pixels)


if __name__ == "__main__":
    main()
