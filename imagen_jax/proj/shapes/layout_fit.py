"""Fit the layout head of a stage (`model.layout_grid`) on its data, the UNet frozen.

    python -m imagen_jax.proj.shapes.layout_fit \
        --config=configs/shapes_base.py:layout_grid=4 --stage=checkpoints/shapes/base \
        --outdir=runs/base_layout [--examples=40000] [--steps=3000] [--batch=128]

The head (`imagen_jax.models.layout_head.LayoutHead`) reads the frozen text tokens and predicts
the image pooled to a grid; it learns from the caption alone, so it trains on encoded
captions and pooled images without running the UNet, at thousands of examples a second
where a train step of the whole network manages tens. It is what makes a head worth
fitting: its regression learns which object goes where after a phase of a thousand or so
steps at chance, which the train loop, at the UNet's pace, would take hours to reach.

The stage's weights are read as `train.init_from` reads them (the head and the convolution
that feeds its prediction to the UNet grown when the stage has none: that convolution
starts at zero, so the written stage samples as the input stage did). The head is fitted
with AdamW on `examples` records of `config.data` (the last tenth held out), and the stage
is written to `outdir` with the head in it and the input stage's sampling settings, ready
for sample.py and for `train.init_from`, where the train loop goes on fitting the head
(`train.aux_losses.layout`) while the UNet learns to read it.
"""

from __future__ import annotations

import json

import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
from absl import app, flags, logging
from flax import nnx

from imagen_jax.config_utils import define_config_file
from imagen_jax.images import to_float_image
from imagen_jax.models.layout_head import layout_target
from imagen_jax.proj.shapes import refit
from imagen_jax.text.config import encode_captions, make_text_encoder
from imagen_jax.training import input as input_lib


def layout_examples(config: ml_collections.ConfigDict, count: int, *, chunk: int = 512):
    """(text [N, L, D], mask [N, L], target [N, g, g, C]) of the first `count` records of
    `config.data`: the captions encoded by `config.text`'s encoder, the images pooled to the
    layout grid (`layout_head.layout_target`)."""
    source = input_lib.make_source(config.data)
    if count > len(source):
        raise ValueError(f"--examples={count} but config.data has only {len(source)} records")
    encoder = make_text_encoder(config.text, batch_size=chunk)
    grid = config.model.layout_grid
    texts, masks, targets = [], [], []
    for start in range(0, count, chunk):
        records = [source[i] for i in range(start, min(count, start + chunk))]
        enc = encode_captions(encoder, [r["caption"] for r in records])
        images = to_float_image(np.stack([r["image"] for r in records]))
        texts.append(enc["text"])
        masks.append(enc["text_mask"])
        targets.append(np.asarray(layout_target(images, grid)))
        logging.info("layout_fit: %d / %d examples", start + len(records), count)
    return np.concatenate(texts), np.concatenate(masks), np.concatenate(targets)


def fit_layout_head(model, data, *, steps: int, batch: int, lr: float, seed: int = 0, log=None):
    """Fits `model.layout` in place on data = (text, mask, target), the last tenth held out;
    returns {"train_mse", "val_mse", "val_mse_before"}. Only the head's parameters move."""
    text, mask, target = data
    n_val = max(1, len(text) // 10)
    n_train = len(text) - n_val
    if n_train < batch:
        raise ValueError(f"{n_train} training examples for batch {batch}: raise --examples")
    head = model.layout
    opt = nnx.Optimizer(head, optax.adamw(lr, weight_decay=1e-4), wrt=nnx.Param)

    def mse(head, t, m, y):
        return jnp.mean(jnp.square(head(t, m) - y))

    @nnx.jit
    def step(head, opt, t, m, y):
        loss, grads = nnx.value_and_grad(mse)(head, t, m, y)
        opt.update(head, grads)
        return loss

    held_out = nnx.jit(mse)

    def val_mse():
        sl = slice(n_train, None)
        return float(held_out(head, text[sl], mask[sl], target[sl]))

    def recent(losses):  # the mean of the last 100 steps' losses (one device-to-host copy)
        return float(jnp.mean(jnp.stack(losses[-100:])))

    before = val_mse()
    rng = np.random.default_rng(seed)
    losses = []
    for s in range(1, steps + 1):
        i = rng.integers(0, n_train, batch)
        losses.append(step(head, opt, text[i], mask[i], target[i]))  # stays on the device
        if log is not None and (s % max(1, steps // 10) == 0 or s == steps):
            log(s, recent(losses), val_mse())
    return dict(train_mse=recent(losses), val_mse=val_mse(), val_mse_before=before)


def layout_fit(config, stage: str, outdir: str, *, examples: int, steps: int, batch: int, lr):
    """Reads `stage`, fits its layout head, writes the stage to `outdir`; returns the fit's
    numbers (also in the written stage.json's identity)."""
    if not config.model.get("layout_grid", 0):
        raise ValueError("model.layout_grid is 0: the config has no layout head to fit")
    net, model = refit.grown_stage(config, stage)
    data = layout_examples(config, examples)

    def log(s, train, val):
        logging.info("layout_fit: step %d, train mse %.5f, held-out mse %.5f", s, train, val)

    result = fit_layout_head(model, data, steps=steps, batch=batch, lr=lr, log=log)
    result.update(examples=examples, steps=steps, batch=batch, lr=lr)
    refit.save_refit(config, net, model, stage, outdir, fit="layout_fit", result=result)
    return result


def _define_flags() -> None:
    """The command line's flags (defined only when run as a program, not on import)."""
    define_config_file("config", None, "configs/<stage>.py[:arg]: the stage.")
    flags.DEFINE_string("stage", None, "The stage directory to start from.")
    flags.DEFINE_string("outdir", None, "The stage directory to write.")
    flags.DEFINE_integer("examples", 40000, "Records of config.data to fit on (a tenth held out).")
    flags.DEFINE_integer("steps", 3000, "AdamW steps.")
    flags.DEFINE_integer("batch", 128, "Examples a step.")
    flags.DEFINE_float("lr", 1e-3, "Learning rate.")
    flags.mark_flags_as_required(["config", "stage", "outdir"])


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
    f = flags.FLAGS
    result = layout_fit(
        f.config, f.stage, f.outdir, examples=f.examples, steps=f.steps, batch=f.batch, lr=f.lr
    )
    print(json.dumps(result, indent=1))


if __name__ == "__main__":
    _define_flags()
    app.run(main)
