"""The contrastive train step of a two-tower embedding model (`model.family = "two_towers"`):
the softmax (CLIP) or sigmoid (SigLIP) loss over the global batch, one jitted update (state
donated).

    tx, lr_schedule = make_optimizer(config, net)   # only trainable parameters in its state
    train_step = make_contrastive_train_step(config, net, tx, lr_schedule, mesh, shardings, rest)
    state, metrics = train_step(state, rest, batch)
    # batch: {"image": uint8 [B, H, W, 3]} and the text side's inputs:
    #   text_side=frozen: "text" float32 [B, L, D], "text_mask" bool [B, L] (the frozen
    #     encoder's tokens; with hard negatives also "counter_text", "counter_mask",
    #     "has_counterfactual"); text_side=tower: "caption_ids", "caption_mask" int32 [B, L]

The loss (`training/contrastive.py`, `contrastive.loss`) compares every image with every
caption of the global batch (`mesh=`: each device gathers the other side's embeddings), with
the model's learnable log-temperature (and, sigmoid, bias). `contrastive.hard_negatives`
adds the batch's counterfactual captions (the colours exchanged or the relation inverted,
`data.counterfactuals`) as extra negative texts for every image. With gradient accumulation
each micro-batch is a batch of its own for the loss.

LiT (`contrastive.frozen_tower` = "image" | "text"): the parameters of that tower (`vision_model` /
`text_model`) are frozen, except its final projection (`visual_projection`,
`text_projection`); the frozen ones get no gradient (stop_gradient, so XLA computes none)
and no optimizer state (`optax.multi_transform` with `set_to_zero`). Metrics: those of
`step.make_train_step`, and temperature (1 / exp(t')), logit_bias and pair_acc (the share of
images whose own caption scores highest in the batch).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import optax

from imagen_jax.models import frozen_text_towers
from imagen_jax.text.layers import l2_normalize
from imagen_jax.training import state as state_lib
from imagen_jax.training import step as step_lib
from imagen_jax.training.caption_step import pixel_values
from imagen_jax.training.contrastive import contrastive_loss

FROZEN_TOWERS = ("", "image", "text")
# Under a locked tower, the parameters that still train: its projection to the shared space.
TRAINED_IN_LOCKED = ("visual_projection", "text_projection")


def frozen_text_side(net: state_lib.Network) -> bool:
    """Whether the text side is a frozen encoder's tokens (else a trained text tower)."""
    return isinstance(net.cfg, frozen_text_towers.FrozenTextTowersConfig)


def frozen_mask(params, lock: str):
    """A tree like `params` of bools: True for the parameters `lock` freezes."""
    if lock not in FROZEN_TOWERS:
        raise ValueError(f"contrastive.frozen_tower={lock!r}; expected one of {FROZEN_TOWERS}")
    tower = {"image": "vision_model", "text": "text_model"}.get(lock)

    def frozen(path, _):
        names = [str(getattr(k, "key", k)) for k in path]
        return names[0] == tower and not any(n in TRAINED_IN_LOCKED for n in names)

    return jax.tree_util.tree_map_with_path(frozen, params)


def make_optimizer(config, net: state_lib.Network):
    """(tx, lr_schedule): the config's optimizer over the trainable parameters only."""
    tx, schedule = state_lib.make_optimizer(config.optim, config.train.steps)
    lock = config.contrastive.frozen_tower
    if not lock:
        return tx, schedule
    labels = jax.tree.map(
        lambda f: "frozen" if f else "train", frozen_mask(net.abstract_params, lock)
    )
    return optax.multi_transform({"train": tx, "frozen": optax.set_to_zero()}, labels), schedule


def text_features(model, batch, frozen_text: bool, *, negatives: bool = False):
    """The batch's caption (or, `negatives`, counterfactual) embeddings, not normalised."""
    if frozen_text:
        keys = ("counter_text", "counter_mask") if negatives else ("text", "text_mask")
    else:
        keys = ("caption_ids", "caption_mask")
    return model.get_text_features(batch[keys[0]], batch[keys[1]])


def contrastive_objective(config, net: state_lib.Network, mesh):
    """loss_fn(params, rest, batch, key) -> (loss, metrics) of the config's objective."""
    cfg = config.contrastive
    frozen = frozen_mask(net.abstract_params, cfg.frozen_tower)
    frozen_text = frozen_text_side(net)
    norm = dict(mean=tuple(config.model.image_mean), std=tuple(config.model.image_std))

    def loss_fn(params, rest, batch, key):
        del key  # the objective draws nothing
        params = jax.tree.map(lambda p, f: jax.lax.stop_gradient(p) if f else p, params, frozen)
        model = net.merge(params, rest)
        image = l2_normalize(model.get_image_features(pixel_values(batch["image"], **norm)))
        text = l2_normalize(text_features(model, batch, frozen_text))
        negatives = valid = None
        if cfg.hard_negatives:
            valid = batch["has_counterfactual"]
            # A scene without a counterfactual has "" (no tokens, features 0): a unit vector
            # stands in, so that the norm's gradient at 0 (NaN) never enters the sum.
            features = text_features(model, batch, frozen_text, negatives=True)
            negatives = l2_normalize(jnp.where(valid[:, None], features, 1.0))
        scale = model.logit_scale[...]
        bias = None if model.logit_bias is None else model.logit_bias[...]
        loss, pair_acc = contrastive_loss(
            cfg.loss,
            image,
            text,
            logit_scale=scale,
            logit_bias=bias,
            mesh=mesh,
            negatives=negatives,
            negatives_valid=valid,
            with_accuracy=True,
        )
        metrics = {
            "temperature": jnp.exp(-scale.reshape(())),
            "logit_bias": jnp.zeros(()) if bias is None else bias.reshape(()),
            "pair_acc": pair_acc,
        }
        return loss, metrics

    return loss_fn


def make_contrastive_train_step(
    config, net: state_lib.Network, tx, lr_schedule, mesh, shardings, rest
):
    """The jitted `train_step(state, rest, batch) -> (state, metrics)`; state donated."""
    loss_fn = contrastive_objective(config, net, mesh)
    grad_fn = step_lib.make_grad_fn(loss_fn, config.optim.accum_steps, with_aux=True)
    update = step_lib.make_update(config, tx, lr_schedule)

    def train_step(state: state_lib.TrainState, rest, batch):
        key = jax.random.fold_in(jax.random.wrap_key_data(state.rng), state.step)
        loss, aux, grads = grad_fn(state.params, rest, batch, key)
        state, metrics = update(state, loss, grads)
        return state, {**metrics, **aux}

    return step_lib.jit_step(train_step, mesh, shardings, rest)
