"""How well a shapes VAE keeps what the prompts state: scenes of the six tasks (held-out
split, grammar captions) rendered, encoded and decoded (the posterior's mean), then scored
by the shapes scorer against their own specs, with the PSNR of the round trip, per image
size. The renders themselves pass every time, so the pass rate is the ceiling the VAE puts
on a latent model sampled at that size.

    python tools/shapes_vae_eval.py --vae=runs/shapes_vae/vae [--sizes=64x64,48x88] [--n=48]

One JSON line per size on stdout (and appended to --results).
"""

import json
from collections import Counter

import jax.numpy as jnp
import numpy as np
from absl import app, flags
from flax import nnx

from imagen_jax.data.buckets import parse_buckets
from imagen_jax.models import vae as vae_lib
from imagen_jax.shapes import scorer, tasks
from imagen_jax.shapes.render import render
from imagen_jax.shapes.spec import TASKS, canvas_of

flags.DEFINE_string("vae", None, "A diffusers AutoencoderKL directory.", required=True)
flags.DEFINE_string("sizes", "64x64,48x88", "Image sizes HxW.")
flags.DEFINE_integer("n", 48, "Scenes per size (the six tasks in turn).")
flags.DEFINE_integer("seed", 0, "Scene seed.")
flags.DEFINE_string("results", None, "Also append the JSON lines to this file.")


@nnx.jit
def _round_trip(model, x):
    return model.decode(model.encode(x).mean)


def main(argv):
    del argv
    f = flags.FLAGS
    model, _ = vae_lib.load_vae(f.vae)
    for h, w in parse_buckets(f.sizes):
        rng = np.random.default_rng(f.seed)
        examples = [
            tasks.sample_example(
                rng, task=TASKS[i % 6], split="heldout", rich=False, canvas=canvas_of(h, w)
            )
            for i in range(f.n)
        ]
        images = np.stack([render(e.scene, min(h, w)) for e in examples])
        x = jnp.asarray(images, jnp.float32) / 127.5 - 1
        y = np.asarray(_round_trip(model, x))
        out = np.clip(np.rint((y + 1) * 127.5), 0, 255).astype(np.uint8)
        mse = float(np.mean((out.astype(np.float64) - images) ** 2))
        results = [scorer.score(o, e.spec) for o, e in zip(out, examples, strict=True)]
        line = dict(
            vae=f.vae,
            size=[h, w],
            images=f.n,
            psnr=round(10 * np.log10(255**2 / mse), 2),
            passed=float(np.mean([r.passed for r in results])),
            failures=dict(Counter(scorer.failure_kind(r) for r in results if not r.passed)),
        )
        print(json.dumps(line))
        if f.results:
            with open(f.results, "a", encoding="utf-8") as out_file:
                out_file.write(json.dumps(line) + "\n")


if __name__ == "__main__":
    app.run(main)
