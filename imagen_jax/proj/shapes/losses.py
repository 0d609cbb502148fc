"""The shapes research's auxiliary loss terms, plugged into the generic train step by name
(`imagen_jax/training/aux_losses.py`):

    config.train.aux_losses.layout = losses.layout_config()
    config.train.aux_losses.counterfactual = losses.counterfactual_config(weight=0.05)

`counterfactual`: on the scenes whose caption has a counterfactual (the relation inverted,
or the two colours exchanged; the shapes source writes them with `data.counterfactuals`),
one noised image per scene at unit time ~ U(min_time, 1) is denoised with the true and with
the counterfactual caption, and softplus(beta * (L_true - L_counter) /
stop_gradient((L_true + L_counter) / 2)) is the loss; with margin m > 0 the hinge
relu((L_true - L_counter) / stop_gradient(...) + m) instead, which is 0 once the
counterfactual's loss is m of their mean above the true one. The two losses share the image,
the time and the noise, so everything in their gradients that does not depend on the
captions' difference cancels: what is left is how much the network uses the words that
differ. Metrics: `counterfactual_loss` and `counterfactual_true_lower` (the fraction of those
scenes whose true caption has the lower loss; 0.5 = the words are ignored).

`layout`: a network with a layout head (`model.layout_grid` > 0,
`models/layout_head.py`) is fitted by regression: the mean squared error of the head's
prediction from the caption against the image average-pooled to its grid, minus the image's
mean (metric `layout_loss`). The UNet sees the prediction with the gradient stopped, so this
term alone trains the head, and the denoising loss alone the rest.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import ml_collections

from imagen_jax.diffusion import losses
from imagen_jax.diffusion import parameterization as param_lib
from imagen_jax.diffusion.adapter import model_fn
from imagen_jax.models.layout_head import layout_target
from imagen_jax.training.loop import COUNTERFACTUAL_KEYS  # what device_batch writes


def counterfactual_config(**overrides) -> ml_collections.ConfigDict:
    """The `train.aux_losses.counterfactual` group (unknown keys raise). The data must
    write counterfactual captions: `data.counterfactuals` (e.g. "colors")."""
    cfg = ml_collections.ConfigDict(
        dict(
            fn="imagen_jax.proj.shapes.losses:counterfactual",
            weight=0.0,  # 0 = off
            beta=5.0,
            min_time=0.4,  # its unit times ~ U(min_time, 1): where the layout is decided
            # > 0: the term sees at most this many rows of each (micro-)batch, those with a
            # counterfactual first (it costs two extra passes over the rows it sees).
            rows=0,
            # > 0: the hinge form, relu((L_true - L_counter) / their mean + margin); 0: softplus.
            margin=0.0,
        )
    )
    _update(cfg, overrides, "counterfactual")
    return cfg


def layout_config(**overrides) -> ml_collections.ConfigDict:
    """The `train.aux_losses.layout` group (unknown keys raise)."""
    cfg = ml_collections.ConfigDict(dict(fn="imagen_jax.proj.shapes.losses:layout", weight=1.0))
    _update(cfg, overrides, "layout")
    return cfg


def _update(cfg, overrides, name):
    unknown = sorted(set(overrides) - set(cfg.keys()))
    if unknown:
        raise KeyError(
            f"unknown train.aux_losses.{name} keys {unknown}; allowed: {sorted(cfg.keys())}"
        )
    cfg.update(overrides)


def counterfactual_loss(
    denoise, x0, batch, key, *, schedule, prediction, beta, min_time, rows=0, margin=0.0
):
    """(loss, metrics) of the counterfactual term (module docstring) over the rows of
    `batch["has_counterfactual"]`; 0 when there are none. rows > 0: only the first `rows`
    rows that have a counterfactual (in batch order) are denoised, the rest skipped.
    margin > 0: the hinge relu(relative difference + margin) instead of the softplus."""
    b = x0.shape[0]
    if 0 < rows < b:
        keys = ("text", "text_mask", *COUNTERFACTUAL_KEYS)
        # Rows with a counterfactual first, in batch order (a stable sort on "has none").
        take = jnp.argsort(~batch["has_counterfactual"].astype(bool), stable=True)[:rows]
        x0, batch, b = x0[take], {k: batch[k][take] for k in keys}, rows
    key_t, key_eps = jax.random.split(key)
    u = jax.random.uniform(key_t, (b,), minval=min_time, maxval=1.0)
    t, alpha_t, sigma_t = losses.time_from_unit(u, schedule=schedule)
    eps = jax.random.normal(key_eps, x0.shape, jnp.float32)
    z_t = losses.add_noise(x0=x0, eps=eps, alpha_t=alpha_t, sigma_t=sigma_t)
    twice = lambda a, c: jnp.concatenate([a, c], axis=0)  # noqa: E731
    cond = {
        "text": twice(batch["text"], batch["counter_text"]),
        "text_mask": twice(batch["text_mask"], batch["counter_mask"]).astype(bool),
        "drop_text": jnp.zeros((2 * b,), bool),
    }
    out = denoise(twice(z_t, z_t), twice(t, t), cond)
    shape = (b,) + (1,) * (x0.ndim - 1)
    target = param_lib.target(
        prediction, x0=x0, eps=eps, alpha_t=alpha_t.reshape(shape), sigma_t=sigma_t.reshape(shape)
    )
    per_example = losses.per_example_loss("l2", pred=out, target=twice(target, target))
    true, other = per_example[:b], per_example[b:]
    rel = (true - other) / jax.lax.stop_gradient((true + other) / 2 + 1e-12)
    w = batch["has_counterfactual"].astype(jnp.float32)
    n = jnp.maximum(w.sum(), 1.0)
    per_row = jax.nn.relu(rel + margin) if margin > 0 else jax.nn.softplus(beta * rel)
    loss = jnp.sum(w * per_row) / n
    true_lower = jnp.sum(w * (true < other)) / n
    return loss, dict(counterfactual_loss=loss, counterfactual_true_lower=true_lower)


def counterfactual(net, *, schedule, diffusion, beta, min_time, rows=0, margin=0.0):
    """The counterfactual term of a base pixel stage (an aux-loss factory)."""
    if net.low_res or diffusion.model_space != "vp":
        raise ValueError(
            "train.aux_losses.counterfactual is for base pixel stages (vp model space); "
            "this stage is a super-resolution stage or a flow model"
        )
    options = dict(
        schedule=schedule,
        prediction=diffusion.prediction,
        beta=float(beta),
        min_time=float(min_time),
        rows=int(rows),
        margin=float(margin),
    )

    def term(model, x0, batch, key):
        missing = [k for k in COUNTERFACTUAL_KEYS if k not in batch]
        if missing:
            raise ValueError(
                f"train.aux_losses.counterfactual is on but the batch has no {missing}: it "
                "needs data.source='shapes' with data.counterfactuals set, and captions "
                "encoded in the loop (not text.cache)"
            )
        return counterfactual_loss(model_fn(model, schedule=schedule), x0, batch, key, **options)

    return term


def layout_loss(model, x0, batch):
    """The layout head's regression loss (module docstring): the mean squared error of its
    prediction from the caption against the image pooled to its grid."""
    pred = model.layout_prediction(batch["text"], batch["text_mask"]).astype(jnp.float32)
    target = layout_target(x0.astype(jnp.float32), pred.shape[1])
    return jnp.mean(jnp.square(pred - target))


def layout(net, *, schedule, diffusion):
    """The layout head's regression term (an aux-loss factory); None (no term) for a network
    without a layout head, so a config can name it for every base stage."""
    del schedule, diffusion
    if net.family != "imagen" or not net.cfg.layout_grid:
        return None

    def term(model, x0, batch, key):
        del key
        loss = layout_loss(model, x0, batch)
        return loss, dict(layout_loss=loss)

    return term
