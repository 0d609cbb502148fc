"""Fit a stage's token refiner so that its UNet reads a caption in any training wording as
it reads the grammar's caption of the same scene: paraphrase distillation, the UNet frozen.

    python -m imagen_jax.proj.shapes.wording_fit \
        --config=configs/shapes_base.py:shipped \
        --config.data.wordings=train --stage=checkpoints/shapes/base \
        --outdir=runs/base_wording [--steps=1000] [--batch=32] [--lr=3e-4] [--min_time=0.3] \
        [--binding_weight=0.1]

Why: the frozen text encoder's tokens carry the binding of a colour to its shape plainly in
the grammar's templates and much less in others (`text_probe --task=wordings`), and the
UNet reads the binding through fixed linear maps of those tokens, so it reads held-out
wordings worse; a refiner over the tokens, trained on labels, keeps the binding in held-out
wordings (`text_probe --task=refiner`). Training the whole base on more templates did not
close the gap (the shipped model's card, "Held-out wordings"). Here the stage itself is the
teacher: for a scene, its prediction from the grammar's caption is the target of its
prediction from another caption of the same scene in the training wordings (the grammar's
among them), read through the refiner, on the same noised image, time and noise:

    loss = mean || f(z_t, t, refine(tokens(caption))) - f(z_t, t, tokens(grammar caption)) ||^2

f is the stage's UNet (frozen: its own parameters and the layout head's never move), the
teacher the input stage (whose refiner, grown as the identity, is not there). Unit times are
drawn from U(min_time, 1), where the layout and the binding are decided. The two captions
come from two shapes sources that differ only in `wordings` (a record's scene is drawn
before its caption, so record i is the same scene in both). The refiner sits after the
text projection and before the learned null text, so the unconditional branch of guidance
is unchanged.

With `--binding_weight` w > 0 the loss has a second term, a binding anchor:

    loss += w * mean over shape nouns CE(reader(refine(tokens)[noun]), colour of the noun)

over the shape nouns of colour-attribution records (where a caption names the shape
once). The reader is a ridge classifier of a shape's colour, fitted once, before the fit,
on the stage's projected tokens (`text_proj`, the refiner's input) at the shape nouns of
grammar-worded colour-attribution captions, and then fixed; the refined noun token of a
caption in another wording must then read as the grammar's token of the same binding.
The distillation alone moves the prediction, not necessarily the tokens the UNet reads the
binding from; the anchor says where the binding is to be written. The result records the
reader's accuracy on the held-out records' refined nouns before and after.

The stage is written to `outdir` with the refiner in it and the input stage's sampling
settings; its identity records the loss before and after on held-out records (the last
`val` records of the fit's range, in training wordings).
"""

from __future__ import annotations

import json

import jax
import jax.numpy as jnp
import numpy as np
import optax
from absl import app, flags, logging
from flax import nnx

from imagen_jax.config_utils import define_config_file
from imagen_jax.diffusion import losses
from imagen_jax.diffusion.adapter import model_fn
from imagen_jax.diffusion.config import make_schedule
from imagen_jax.images import to_float_image
from imagen_jax.proj.shapes import refit, text_probe
from imagen_jax.shapes.spec import COLORS
from imagen_jax.text.config import encode_captions, make_text_encoder
from imagen_jax.training import input as input_lib


class Paraphrases:
    """Record i of `config.data` (its wordings) with the grammar's caption of the same
    scene: batch(indices) -> {"x0" [B, H, W, 3] in [-1, 1], "text", "text_mask" (the
    record's caption), "teacher_text", "teacher_mask" (the grammar's)}, and with `binding`
    {"noun_sites", "noun_colors"} (`binding_labels`)."""

    def __init__(self, config, *, batch_size: int, binding: bool = False):
        data = config.data
        if data.source != "shapes":
            raise ValueError(
                f"wording_fit distils shapes captions; config.data.source is {data.source!r}"
            )
        if data.get("wordings", "grammar") == "grammar":
            raise ValueError(
                "config.data.wordings is 'grammar': the captions to distil would be the "
                "teacher's own; set --config.data.wordings=train"
            )
        self.student = input_lib.make_source(data)
        grammar = data.copy_and_resolve_references()
        grammar.wordings = "grammar"
        self.teacher = input_lib.make_source(grammar)
        self.encoder = make_text_encoder(config.text, batch_size=batch_size)
        self.binding = binding  # batches carry `binding_labels` (for the binding term)

    def __len__(self) -> int:
        return len(self.student)

    def captions(self, index: int) -> tuple[str, str]:
        """Record `index`'s caption and the grammar's caption of its scene."""
        return self.student[index]["caption"], self.teacher[index]["caption"]

    def batch(self, indices) -> dict:
        records = [self.student[int(i)] for i in indices]
        captions = [r["caption"] for r in records]
        grammar = [self.teacher[int(i)]["caption"] for i in indices]
        student = encode_captions(self.encoder, captions)
        teacher = encode_captions(self.encoder, grammar)
        batch = {
            "x0": to_float_image(np.stack([r["image"] for r in records])),
            "text": student["text"],
            "text_mask": student["text_mask"],
            "teacher_text": teacher["text"],
            "teacher_mask": teacher["text_mask"],
        }
        if self.binding:
            batch["noun_sites"], batch["noun_colors"] = self.binding_labels(indices, captions)
        return batch

    def binding_labels(self, indices, captions) -> tuple[np.ndarray, np.ndarray]:
        """(token index [B, 2] of each shape noun of a colour-attribution record's caption,
        -1 where the record is of another task or the shape's word is not in its caption
        once or the encoder has no tokenizer; the colour index [B, 2] bound to that shape)."""
        sites = -np.ones((len(captions), 2), np.int32)
        colors = np.zeros((len(captions), 2), np.int32)
        if getattr(self.encoder, "tokenizer", None) is None:
            return sites, colors
        ids = np.asarray(self.encoder.tokenizer(list(captions))[0])
        names = list(COLORS)
        for row, index in enumerate(indices):
            spec = self.student.example(int(index)).spec
            if spec.task != "color_attr":
                continue
            for k, obj in enumerate(spec.objects[:2]):
                try:
                    word = text_probe.word_id(self.encoder, obj.shape)
                except ValueError:  # a tokenizer that splits the word: not labelled
                    continue
                where = np.flatnonzero(ids[row] == word)
                if len(where) == 1:
                    sites[row, k] = where[0]
                    colors[row, k] = names.index(obj.color)
        return sites, colors


def distillation_loss(student, teacher, batch, key, *, schedule, min_time: float):
    """The mean squared difference of the two models' predictions (module docstring) on one
    noised image per row, the teacher's gradient stopped."""
    x0 = batch["x0"]
    b = x0.shape[0]
    key_t, key_eps = jax.random.split(key)
    u = jax.random.uniform(key_t, (b,), minval=min_time, maxval=1.0)
    t, alpha_t, sigma_t = losses.time_from_unit(u, schedule=schedule)
    eps = jax.random.normal(key_eps, x0.shape, jnp.float32)
    z_t = losses.add_noise(x0=x0, eps=eps, alpha_t=alpha_t, sigma_t=sigma_t)
    cond = {"text": batch["text"], "text_mask": batch["text_mask"].astype(bool)}
    target_cond = {"text": batch["teacher_text"], "text_mask": batch["teacher_mask"].astype(bool)}
    target = jax.lax.stop_gradient(model_fn(teacher, schedule=schedule)(z_t, t, target_cond))
    out = model_fn(student, schedule=schedule)(z_t, t, cond)
    return jnp.mean(jnp.square(out.astype(jnp.float32) - target.astype(jnp.float32)))


def grammar_reader(model, encoder, *, prompts: int = 2000, seed: int = 0, ridge: float = 0.3):
    """(W [D + 1, colours], mean [D]): a ridge reader of the colour bound to a shape noun,
    fitted on the stage's projected tokens (`text_proj`, before the refiner) of
    colour-attribution captions in the grammar's wordings, where the binding reads plainly
    (text_probe's binding reader: 0.98 on the frozen tokens); fixed during the fit.

    `ridge` is relative to the mean eigenvalue of the centred tokens' Gram matrix, so the
    reader is as smooth whatever the tokens' scale: a weak ridge gives large weights along
    directions in which the grammar's tokens barely vary, and the refiner then moves the
    scores a long way by moving its tokens a little along them."""
    pairs = text_probe.task_prompts("color_attr", prompts, seed, "train")
    text, sites, colors, _ = text_probe.shape_sites(encoder, pairs)
    projected = np.asarray(model.text_proj(jnp.asarray(text["text"])), np.float64)
    x = projected[sites[:, 0], sites[:, 1]]
    mean = x.mean(0)
    x = x - mean
    onehot = -np.ones((len(colors), len(COLORS)))
    onehot[np.arange(len(colors)), colors] = 1.0
    scale = np.sum(x * x) / x.shape[1]
    w = text_probe.ridge_fit(text_probe.with_bias(x), onehot, ridge * scale)
    return jnp.asarray(w, jnp.float32), jnp.asarray(mean, jnp.float32)


def _noun_scores(model, batch, reader):
    """The reader's scores [B, 2, colours] of the refined tokens at `noun_sites`."""
    w, mean = reader
    mask = batch["text_mask"].astype(bool)
    refined = model.text_refiner(model.text_proj(batch["text"]), mask)
    sites = jnp.maximum(batch["noun_sites"], 0)
    tokens = jnp.take_along_axis(refined, sites[..., None], axis=1).astype(jnp.float32)
    x = jnp.concatenate([tokens - mean, jnp.ones(tokens.shape[:-1] + (1,))], axis=-1)
    return x @ w


def binding_loss(model, batch, reader):
    """The mean over the labelled nouns (`noun_sites` >= 0) of the cross-entropy of the
    grammar reader's scores of the refined noun token (as logits) against the colour bound
    to that shape: the refined token must carry the shape's colour where the grammar's
    tokens carry it. Cross-entropy, not the ridge fit's squared error: its gradient in the
    scores is bounded, so a reader with large weights cannot blow the refiner up."""
    scores = _noun_scores(model, batch, reader)
    labels = batch["noun_colors"]
    nll = optax.softmax_cross_entropy_with_integer_labels(scores, labels)
    valid = (batch["noun_sites"] >= 0).astype(jnp.float32)
    return jnp.sum(nll * valid) / jnp.maximum(jnp.sum(valid), 1.0)


def binding_accuracy(model, batches, reader) -> float:
    """The grammar reader's accuracy on the refined noun tokens of `batches`."""
    right = total = 0
    for b in batches:
        guess = np.asarray(_noun_scores(model, b, reader)).argmax(-1)
        valid = np.asarray(b["noun_sites"]) >= 0
        right += int(np.sum((guess == np.asarray(b["noun_colors"])) & valid))
        total += int(valid.sum())
    return right / max(total, 1)


def fit_refiner(
    model,
    data: Paraphrases,
    *,
    schedule,
    steps: int,
    batch: int,
    lr: float,
    min_time: float,
    val: int,
    seed: int = 0,
    binding_weight: float = 0.0,
    reader_prompts: int = 2000,
    log=None,
) -> dict:
    """Fits `model.text_refiner` in place on records [0, len - val) of `data`, the teacher a
    copy of `model` as it is now; returns {"train_loss", "val_loss", "val_loss_before"} (the
    distillation loss on the last `val` records, the same noise each time) and, with a
    `binding_weight`, {"binding_before", "binding"} (the grammar reader's accuracy on those
    records' refined shape nouns). The binding term holds fixed a `grammar_reader` fitted
    on `model` as it is now, on `reader_prompts` captions."""
    if model.text_refiner is None:
        raise ValueError("model.text_refiner is 0: the config has no token refiner to fit")
    n_train = len(data) - val
    if n_train < batch or val < 1:
        raise ValueError(
            f"{len(data)} records for batch {batch} and {val} held out: raise data.size"
        )
    teacher = nnx.clone(model)
    refiner = nnx.All(nnx.Param, nnx.PathContains("text_refiner"))
    opt = nnx.Optimizer(model, optax.adamw(lr, weight_decay=1e-4), wrt=refiner)
    if binding_weight and getattr(data.encoder, "tokenizer", None) is None:
        raise ValueError("binding_weight needs a text encoder with a tokenizer (config.text)")
    if binding_weight and not data.binding:
        raise ValueError("binding_weight needs Paraphrases(..., binding=True)")
    reader = None
    if binding_weight:
        reader = grammar_reader(model, data.encoder, prompts=reader_prompts, seed=seed)
    held_out_fn = lambda m, teacher, b, key: distillation_loss(  # noqa: E731
        m, teacher, b, key, schedule=schedule, min_time=min_time
    )

    def loss_fn(m, teacher, b, key):
        loss = held_out_fn(m, teacher, b, key)
        if binding_weight:
            loss = loss + binding_weight * binding_loss(m, b, reader)
        return loss

    @nnx.jit
    def step(model, opt, teacher, b, key):
        diff = nnx.DiffState(0, refiner)
        loss, grads = nnx.value_and_grad(loss_fn, argnums=diff)(model, teacher, b, key)
        opt.update(model, grads)
        return loss

    held_out = nnx.jit(held_out_fn)
    val_batches = [
        data.batch(range(start, min(len(data), start + batch)))
        for start in range(n_train, len(data), batch)
    ]

    def val_loss():
        keys = jax.random.split(jax.random.key(seed + 1), len(val_batches))
        pairs = zip(val_batches, keys, strict=True)
        return float(np.mean([held_out(model, teacher, b, k) for b, k in pairs]))

    before = val_loss()
    binding_before = binding_accuracy(model, val_batches, reader) if reader else None
    if log is not None:
        log(0, float("nan"), before)
    rng = np.random.default_rng(seed)
    key = jax.random.key(seed)
    recent = []
    for s in range(1, steps + 1):
        key, sub = jax.random.split(key)
        recent.append(step(model, opt, teacher, data.batch(rng.integers(0, n_train, batch)), sub))
        recent = recent[-100:]
        if log is not None and (s % max(1, steps // 20) == 0 or s == steps):
            log(s, float(jnp.mean(jnp.stack(recent))), val_loss())
    result = dict(
        train_loss=float(jnp.mean(jnp.stack(recent))), val_loss=val_loss(), val_loss_before=before
    )
    if reader is not None:
        result.update(
            binding_before=binding_before,
            binding=binding_accuracy(model, val_batches, reader),
            binding_weight=binding_weight,
        )
    return result


def wording_fit(
    config,
    stage: str,
    outdir: str,
    *,
    steps: int,
    batch: int,
    lr: float,
    min_time: float,
    val: int,
    binding_weight: float = 0.0,
) -> dict:
    """Reads `stage`, grows and fits its token refiner, writes the stage to `outdir`;
    returns the fit's numbers (also in the written stage.json's identity)."""
    if not config.model.get("text_refiner", 0):
        raise ValueError("model.text_refiner is 0: the config has no token refiner to fit")
    net, model = refit.grown_stage(config, stage)
    data = Paraphrases(config, batch_size=batch, binding=binding_weight > 0)

    def log(s, train, held):
        logging.info("wording_fit: step %d, train loss %.5f, held-out loss %.5f", s, train, held)

    result = fit_refiner(
        model,
        data,
        schedule=make_schedule(config.diffusion),
        steps=steps,
        batch=batch,
        lr=lr,
        min_time=min_time,
        val=val,
        binding_weight=binding_weight,
        log=log,
    )
    result.update(steps=steps, batch=batch, lr=lr, min_time=min_time, val=val)
    refit.save_refit(config, net, model, stage, outdir, fit="wording_fit", result=result)
    return result


def _define_flags() -> None:
    """The command line's flags (defined only when run as a program, not on import)."""
    define_config_file("config", None, "configs/<stage>.py[:arg]: the stage, with text_refiner.")
    flags.DEFINE_string("stage", None, "The stage directory to start from.")
    flags.DEFINE_string("outdir", None, "The stage directory to write.")
    flags.DEFINE_integer("steps", 1000, "AdamW steps.")
    flags.DEFINE_integer("batch", 32, "Scenes a step.")
    flags.DEFINE_float("lr", 3e-4, "Learning rate.")
    flags.DEFINE_float("min_time", 0.3, "Unit times ~ U(min_time, 1).")
    flags.DEFINE_integer("val", 256, "Held-out records (the last of config.data).")
    flags.DEFINE_float(
        "binding_weight", 0.0, "Weight of the binding term (grammar reader on refined nouns)."
    )
    flags.mark_flags_as_required(["config", "stage", "outdir"])


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
    f = flags.FLAGS
    result = wording_fit(
        f.config,
        f.stage,
        f.outdir,
        steps=f.steps,
        batch=f.batch,
        lr=f.lr,
        min_time=f.min_time,
        val=f.val,
        binding_weight=f.binding_weight,
    )
    print(json.dumps(result, indent=1))


if __name__ == "__main__":
    _define_flags()
    app.run(main)
