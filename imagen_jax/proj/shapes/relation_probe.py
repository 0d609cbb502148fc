"""Does a shapes base stage read the relation word, or which colour goes with which shape,
and at which noise levels?

For scenes of one task of the shapes domain, compares the stage's denoising loss given the
true caption with its loss given a counterfactual caption, on the same image, time and noise:

* position: the opposite relation ("a red circle above a blue square" against "... below ...");
* color_attr: the two objects' colours exchanged ("a red circle and a blue square" against
  "a blue circle and a red square").

A stage that reads what differs has a lower loss with the true caption wherever the image is
still undecided; where the two losses agree, the difference carries nothing the stage uses.

    python -m imagen_jax.proj.shapes.relation_probe --stage=checkpoints/shapes/base
    python -m imagen_jax.proj.shapes.relation_probe --stage=runs/export/base --scenes=128
    python -m imagen_jax.proj.shapes.relation_probe --task=color_attr --split=heldout
    python -m imagen_jax.proj.shapes.relation_probe --split=heldout --wordings=heldout

Prints, per unit time t (1 = pure noise), the mean v-prediction loss with each caption, and
the fraction of scenes whose true caption has the lower loss (0.5 = the difference is
ignored). Everything is seeded: the same stage gives the same table.

For a stage with a layout head (`model.layout_grid`) and the position task it also prints
how often the head, from the caption alone, puts the two objects on the right sides
(`layout_side_accuracy`).
"""

from __future__ import annotations

import json

import jax
import jax.numpy as jnp
import numpy as np
from absl import app, flags

from imagen_jax import stages
from imagen_jax.diffusion import config as diffusion_config
from imagen_jax.diffusion import losses
from imagen_jax.diffusion import parameterization as param_lib
from imagen_jax.diffusion.adapter import model_fn
from imagen_jax.images import to_float_image
from imagen_jax.models.layout_head import layout_target
from imagen_jax.shapes import tasks
from imagen_jax.shapes import wordings as wordings_lib
from imagen_jax.shapes.render import render
from imagen_jax.text.config import encode_captions, make_text_encoder, text_config

TIMES = (0.2, 0.4, 0.6, 0.7, 0.8, 0.85, 0.9, 0.95)
TASKS = ("position", "color_attr")


def probe_scenes(
    n: int,
    seed: int,
    split: str,
    resolution: int,
    task: str = "position",
    wordings: str = "grammar",
):
    """n scenes of `task`: images uint8 [n, r, r, 3], true and counterfactual captions (in
    one template each, from the wording set `wordings`: grammar | train | heldout), and
    the scenes' specs."""
    if task not in TASKS:
        raise ValueError(f"the probe takes task one of {TASKS}, got {task!r}")
    images, true, other, specs = [], [], [], []
    for i in range(n):
        rng = np.random.default_rng([seed, i])
        example = tasks.sample_example(rng, task=task, split=split, rich=False)
        images.append(render(example.scene, resolution))
        specs.append(example.spec)
        for caption_of, captions in (
            (example.spec, true),
            (tasks.counterfactual(example.spec), other),
        ):
            captions.append(
                wordings_lib.caption(caption_of, np.random.default_rng([seed, i, 1]), wordings)
            )
    return np.stack(images), true, other, specs


def relation_probe(
    stage_dir: str,
    *,
    scenes: int = 32,
    seed: int = 0,
    split: str = "train",
    task="position",
    wordings: str = "grammar",
):
    """Per time: mean loss with the true and the counterfactual caption, and the fraction of
    scenes where the true caption's loss is lower."""
    stage = stages.load_stage(stage_dir)
    if stage.low_resolution:
        raise ValueError(f"{stage_dir} is a super-resolution stage; the probe takes a base")
    encoder = make_text_encoder(text_config(**stage.text))
    schedule = diffusion_config.make_schedule(stage.diffusion)
    prediction = stage.diffusion.prediction
    images, true, other, _ = probe_scenes(scenes, seed, split, stage.resolution, task, wordings)
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

    batches = [encode_captions(encoder, c) for c in (true, other)]
    rows = []
    for k, time in enumerate(TIMES):
        eps = jax.random.normal(jax.random.key(seed * 1000 + k), x0.shape, jnp.float32)
        t_unit = jnp.full((scenes,), time, jnp.float32)
        loss_true, loss_other = (
            np.asarray(per_example_loss(b["text"], b["text_mask"], t_unit, eps)) for b in batches
        )
        rows.append(
            dict(
                t=time,
                loss_true=float(loss_true.mean()),
                loss_counterfactual=float(loss_other.mean()),
                true_lower=float(np.mean(loss_true < loss_other)),
            )
        )
    return rows


def layout_side_accuracy(pred, target, horizontal, *, min_difference=0.05) -> tuple[float, int]:
    """(fraction, count): of the scenes where the image's two halves along the relation's
    axis differ (target [N, g, g, C], `layers.layout_target`; horizontal [N] bool: left of /
    right of), the fraction whose predicted layout pred differs between them the same way
    (a positive inner product of the two half-differences); a head blind to the caption,
    whose one layout suits half the scenes, scores about 0.5."""

    def halves(a):
        g = a.shape[1] // 2
        across = a[:, :, :g].mean(axis=(1, 2)) - a[:, :, g:].mean(axis=(1, 2))
        down = a[:, :g].mean(axis=(1, 2)) - a[:, g:].mean(axis=(1, 2))
        return np.where(np.asarray(horizontal)[:, None], across, down)

    true, ours = halves(np.asarray(target)), halves(np.asarray(pred))
    keep = np.linalg.norm(true, axis=1) > min_difference
    return float(np.mean((true * ours).sum(axis=1)[keep] > 0)), int(keep.sum())


def layout_probe(
    stage_dir: str,
    *,
    scenes: int = 32,
    seed: int = 0,
    split: str = "train",
    wordings: str = "grammar",
):
    """`layout_side_accuracy` of a stage's layout head on position scenes; None for a stage
    without one."""
    stage = stages.load_stage(stage_dir)
    if not stage.unet.layout_grid:
        return None
    encoder = make_text_encoder(text_config(**stage.text))
    images, true, _, specs = probe_scenes(
        scenes, seed, split, stage.resolution, "position", wordings
    )
    batch = encode_captions(encoder, true)
    pred = stage.model.layout_prediction(
        jnp.asarray(batch["text"]), jnp.asarray(batch["text_mask"])
    )
    target = layout_target(to_float_image(images), stage.unet.layout_grid)
    horizontal = [spec.relation in ("left of", "right of") for spec in specs]
    return layout_side_accuracy(pred, target, horizontal)


def _define_flags() -> None:
    """The command line's flags (defined only when run as a program, not on import)."""
    flags.DEFINE_string("stage", "checkpoints/shapes/base", "A base stage directory.")
    flags.DEFINE_integer("scenes", 32, "Scenes to probe.")
    flags.DEFINE_integer("seed", 0, "Seed of the scenes, times and noise.")
    flags.DEFINE_enum("split", "train", ["train", "heldout"], "The shapes split.")
    flags.DEFINE_enum("task", "position", list(TASKS), "The counterfactual's kind.")
    flags.DEFINE_enum(
        "wordings", "grammar", list(wordings_lib.WORDINGS), "The captions' wording set."
    )
    flags.DEFINE_string("json", "", "Also write the rows to this file.")


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
    args = flags.FLAGS
    where = dict(scenes=args.scenes, seed=args.seed, split=args.split, wordings=args.wordings)
    rows = relation_probe(args.stage, task=args.task, **where)
    print(f"{args.stage}: {args.scenes} {args.split} {args.task} scenes, {args.wordings} wordings")
    print("t      loss(true)  loss(counter.)  true lower")
    for r in rows:
        t, ours, other, lower = (
            r[k] for k in ("t", "loss_true", "loss_counterfactual", "true_lower")
        )
        print(f"{t:<6} {ours:<11.5f} {other:<15.5f} {lower:.2f}")
    layout = None
    if args.task == "position":
        layout = layout_probe(args.stage, **where)
    if layout is not None:
        print(f"layout head: the objects' sides right in {layout[0]:.3f} of {layout[1]} scenes")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(dict(stage=args.stage, task=args.task, rows=rows, **where), f, indent=1)


if __name__ == "__main__":
    _define_flags()
    app.run(main)
