"""How well a VAE keeps what the shapes prompts state: scenes of the six tasks (held-out
split, grammar captions) rendered at a size, encoded and decoded (the posterior's mean),
then scored by the shapes scorer against their own specs, with the round trip's PSNR. The
renders themselves pass every time, so the pass rate is the ceiling the VAE puts on a
latent model sampled at that size (`tools/shapes_vae_eval.py` runs it per size). With
`latent_noise` = s the decoder is given the means plus s std n (n ~ N(0, I), std that of the
batch's means, so s is in the units a latent stage samples in): how far off a sampler's
latents may land before what the prompts state is lost."""

from __future__ import annotations

from collections import Counter

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from imagen_jax.shapes import scorer, tasks
from imagen_jax.shapes.render import render
from imagen_jax.shapes.spec import TASKS, canvas_of


@nnx.jit
def _round_trip(model, x, latent_noise, key):
    z = model.encode(x).mean
    return model.decode(z + latent_noise * jnp.std(z) * jax.random.normal(key, z.shape))


def round_trip(
    model, height: int, width: int, n: int, seed: int = 0, latent_noise: float = 0.0
) -> dict:
    """{"size": [h, w], "images", "psnr" (dB), "passed" (the fraction of round trips the
    scorer passes), "failures" (counts by kind)} over n scenes (the six tasks in turn),
    decoded from latents noised by `latent_noise` (with "latent_noise" in the result when
    it is not 0)."""
    rng = np.random.default_rng(seed)
    examples = [
        tasks.sample_example(
            rng, task=TASKS[i % 6], split="heldout", rich=False, canvas=canvas_of(height, width)
        )
        for i in range(n)
    ]
    images = np.stack([render(e.scene, min(height, width)) for e in examples])
    x = jnp.asarray(images, jnp.float32) / 127.5 - 1
    y = np.asarray(_round_trip(model, x, latent_noise, jax.random.key(seed)))
    out = np.clip(np.rint((y + 1) * 127.5), 0, 255).astype(np.uint8)
    mse = float(np.mean((out.astype(np.float64) - images) ** 2))
    results = [scorer.score(o, e.spec) for o, e in zip(out, examples, strict=True)]
    return dict(
        size=[height, width],
        **({"latent_noise": latent_noise} if latent_noise else {}),
        images=n,
        psnr=round(10 * np.log10(255**2 / mse), 2),
        passed=float(np.mean([r.passed for r in results])),
        failures=dict(Counter(scorer.failure_kind(r) for r in results if not r.passed)),
    )
