"""Does a shapes base stage read the relation word, and at which noise levels?

For position scenes of the shapes domain, compares the stage's denoising loss given the true
caption ("a red circle above a blue square") with the loss given the same caption with the
opposite relation ("... below ..."), on the same image, time and noise. A stage that has
learnt the relation has a lower loss with the true caption wherever the layout is still
undecided; where the two losses agree, the relation word carries nothing the stage uses.

    python -m imagen_jax.shapes.relation_probe --stage=checkpoints/shapes/base
    python -m imagen_jax.shapes.relation_probe --stage=runs/export/base --scenes=64

Prints, per unit time t (1 = pure noise), the mean v-prediction loss with each caption, and
the fraction of scenes whose true caption has the lower loss (0.5 = the relation word is
ignored). Everything is seeded: the same stage gives the same table.
"""

from __future__ import annotations

import argparse
import dataclasses
import json

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from imagen_jax.diffusion import config as diffusion_config
from imagen_jax.diffusion import losses
from imagen_jax.diffusion import parameterization as param_lib
from imagen_jax.pipelines import stages
from imagen_jax.shapes import grammar, tasks
from imagen_jax.shapes.render import render
from imagen_jax.shapes.spec import INVERSE_RELATION
from imagen_jax.training.step import model_fn, to_float_image
from imagen_jax.training.text import encode_captions, make_text_encoder

TIMES = (0.2, 0.4, 0.6, 0.7, 0.8, 0.85, 0.9, 0.95)


def probe_scenes(n: int, seed: int, split: str, resolution: int):
    """n position scenes: images uint8 [n, r, r, 3], true and relation-inverted captions."""
    images, true, inverted = [], [], []
    for i in range(n):
        rng = np.random.default_rng([seed, i])
        example = tasks.sample_example(rng, task="position", split=split, rich=False)
        flipped = dataclasses.replace(
            example.spec, relation=INVERSE_RELATION[example.spec.relation]
        )
        images.append(render(example.scene, resolution))
        true.append(grammar.caption(example.spec, np.random.default_rng([seed, i, 1])))
        inverted.append(grammar.caption(flipped, np.random.default_rng([seed, i, 1])))
    return np.stack(images), true, inverted


def relation_probe(stage_dir: str, *, scenes: int = 32, seed: int = 0, split: str = "train"):
    """Per time: mean loss with the true and the inverted caption, and the fraction of scenes
    where the true caption's loss is lower."""
    stage = stages.load_stage(stage_dir)
    if stage.low_resolution:
        raise ValueError(f"{stage_dir} is a super-resolution stage; the probe takes a base")
    encoder = make_text_encoder(ml_collections.ConfigDict(stage.text))
    schedule = diffusion_config.make_schedule(stage.diffusion)
    prediction = stage.diffusion.prediction
    images, true, inverted = probe_scenes(scenes, seed, split, stage.resolution)
    x0 = to_float_image(images)
    denoise = model_fn(stage.model, schedule=schedule)

    @jax.jit
    def per_example_loss(text, mask, t_unit, eps):
        t, alpha, sigma = losses.time_from_unit(t_unit, schedule=schedule)
        z_t = losses.add_noise(x0=x0, eps=eps, alpha_t=alpha, sigma_t=sigma)
        cond = {"text": text, "text_mask": mask, "drop_text": jnp.zeros(len(mask), bool)}
        out = denoise(z_t, t, cond)
        a, s = (a[:, None, None, None] for a in (alpha, sigma))
        target = param_lib.target(prediction, x0=x0, eps=eps, alpha_t=a, sigma_t=s)
        return jnp.mean((out - target) ** 2, axis=(1, 2, 3))

    batches = [encode_captions(encoder, c) for c in (true, inverted)]
    rows = []
    for k, time in enumerate(TIMES):
        eps = jax.random.normal(jax.random.key(seed * 1000 + k), x0.shape, jnp.float32)
        t_unit = jnp.full((scenes,), time, jnp.float32)
        loss_true, loss_inv = (
            np.asarray(per_example_loss(b["text"], b["text_mask"], t_unit, eps)) for b in batches
        )
        rows.append(
            dict(
                t=time,
                loss_true=float(loss_true.mean()),
                loss_inverted=float(loss_inv.mean()),
                true_lower=float(np.mean(loss_true < loss_inv)),
            )
        )
    return rows


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--stage", default="checkpoints/shapes/base", help="a base stage dir")
    parser.add_argument("--scenes", type=int, default=32)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--split", default="train", choices=("train", "heldout"))
    parser.add_argument("--json", default="", help="also write the rows to this file")
    args = parser.parse_args(argv)
    rows = relation_probe(args.stage, scenes=args.scenes, seed=args.seed, split=args.split)
    print(f"{args.stage}: {args.scenes} {args.split} position scenes")
    print("t      loss(true)  loss(inverted)  true lower")
    for r in rows:
        print(
            f"{r['t']:<6} {r['loss_true']:<11.5f} {r['loss_inverted']:<15.5f} {r['true_lower']:.2f}"
        )
    if args.json:
        with open(args.json, "w") as f:
            json.dump(dict(stage=args.stage, split=args.split, rows=rows), f, indent=1)


if __name__ == "__main__":
    main()
