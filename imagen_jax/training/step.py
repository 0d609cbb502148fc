"""The train step: one pure function, jitted once, with the state donated.

    train_step = make_train_step(config, net, tx, lr_schedule, mesh, shardings, rest)
    state, metrics = train_step(state, rest, batch)   # batch: global arrays (parallel.py)

Per step s, all randomness comes from `fold_in(state.rng, s)` (and `fold_in(., i)` for
micro-batch i), so a run resumed from a checkpoint draws what the uninterrupted run drew,
and random draws do not depend on the number of devices (jax's partitionable threefry).

What the step does, in order:
1. Classifier-free guidance dropout (Ho & Salimans 2022; Imagen trains with p = 0.1):
   `drop_text ~ Bernoulli(train.cond_drop_prob)` per example, also set for examples whose
   caption has no tokens; the network then sees its learned null text.
2. Super-resolution stages: noise-conditioning augmentation (Imagen, sec. 2.4; Ho et al.
   2022, "Cascaded Diffusion Models", sec. 4.1): aug_t ~ U(0, train.noise_aug.max_level)
   per example; the low-resolution image is noised with the stage's own diffusion
   schedule at unit time aug_t (`diffusion.adapter.augment_low_res`), and the network is
   told aug_t.
3. The diffusion loss (`diffusion.diffusion_loss`) on the images in [-1, 1], or on the
   batch's "latents" (latent stages: `training/latent_space.py` puts them there), with the network
   told the time by `diffusion.adapter.model_fn` (the unit time, or diffusers' timesteps for
   a network whose `time_input` is "timesteps"); with `optim.accum_steps = k` a `lax.scan` over k
   micro-batches sums the gradients, then one optimizer update (so a step is always one
   update, the learning-rate schedule and the EMA count updates, and memory holds one
   micro-batch of activations).
4. Auxiliary terms (`train.aux_losses`, `training/aux_losses.py`): each named term's
   weight times its loss is added, its metrics logged (e.g. the shapes research's
   counterfactual and layout-head terms, `imagen_jax/proj/shapes/losses.py`).
5. The optax update, then the EMA (`state.ema_decay`).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import optax
from flax import nnx

from imagen_jax import diffusion, parallel
from imagen_jax.diffusion import config as diffusion_config
from imagen_jax.diffusion.adapter import low_res_condition, model_fn
from imagen_jax.images import to_float_image
from imagen_jax.training import aux_losses
from imagen_jax.training import state as state_lib


def stage_x0(batch):
    """What the stage generates: the batch's "latents" (latent stages), else its images."""
    if "latents" in batch:
        return jnp.asarray(batch["latents"], jnp.float32)
    return to_float_image(batch["image"])


def make_cond(batch, key, *, cond_drop_prob: float, max_aug: float | None, schedule, upscale=False):
    """The network's cond dict of a batch: text, mask, CFG dropout, SR augmentation (of the
    low-resolution input upscaled to the image's size first with `upscale`: IF stage II),
    and where the batch has them the pooled text and SDXL's size / crop ids."""
    key_drop, key_level, key_noise = jax.random.split(key, 3)
    text, mask = batch["text"], batch["text_mask"].astype(bool)  # [B, L, D], [B, L]
    b = text.shape[0]
    drop = jax.random.bernoulli(key_drop, cond_drop_prob, (b,)) | ~mask.any(axis=-1)
    cond = {"text": text, "text_mask": mask, "drop_text": drop}
    if "text_pooled" in batch:
        cond["text_pooled"] = jnp.asarray(batch["text_pooled"], jnp.float32)  # [B, P]
    if "size_crop" in batch:
        cond["size_crop"] = jnp.asarray(batch["size_crop"], jnp.float32)  # [B, 6]
    if max_aug is not None:
        aug_t = jax.random.uniform(key_level, (b,), maxval=max_aug)
        low = to_float_image(batch["low_res"])
        size = batch["image"].shape[1:3] if upscale else None
        cond.update(low_res_condition(low, aug_t, key_noise, schedule=schedule, size=size))
    return cond


def make_loss_fn(config, net: state_lib.Network, schedule, terms):
    """loss_fn(params, rest, batch, key) -> (loss, aux) of one (micro-)batch; aux holds the
    metrics of the auxiliary `terms` (`aux_losses.make_terms` of `train.aux_losses`), {} when
    there are none."""
    dcfg = config.diffusion
    loss_kwargs = dict(config.train.loss)
    max_aug = float(config.train.noise_aug.max_level) if net.low_res else None
    use_dropout = net.dropout > 0

    def loss_fn(params, rest, batch, key):
        key_cond, key_loss, key_dropout = jax.random.split(key, 3)
        model = net.merge(params, rest)
        if use_dropout:
            nnx.reseed(model, dropout=key_dropout)
        cond = make_cond(
            batch,
            key_cond,
            cond_drop_prob=config.train.cond_drop_prob,
            max_aug=max_aug,
            schedule=schedule,
            upscale=net.upscales_low_res,
        )
        x0 = stage_x0(batch)
        total, metrics = diffusion.diffusion_loss(
            model_fn(model, schedule=schedule),
            x0,
            cond,
            key_loss,
            schedule=schedule,
            prediction=dcfg.prediction,
            model_space=dcfg.model_space,
            learned_variance=dcfg.variance == "learned_range",
            example_weight=batch.get("example_weight"),
            **loss_kwargs,
        )
        if not terms:
            return total, metrics
        metrics = {}
        for i, aux in enumerate(terms):
            loss, term_metrics = aux.term(model, x0, batch, jax.random.fold_in(key_loss, 1 + i))
            total = total + aux.weight * loss
            metrics.update(term_metrics)
        return total, metrics

    return loss_fn


def _split_micro(batch, k: int):
    """[B, ...] -> [k, B / k, ...], micro-batch i holding rows i, i + k, ...: each device
    keeps its own rows, so the split moves no data."""
    return jax.tree.map(
        lambda x: jnp.swapaxes(x.reshape(x.shape[0] // k, k, *x.shape[1:]), 0, 1), batch
    )


def make_grad_fn(loss_fn, accum_steps: int, *, with_aux: bool = False):
    """grad_fn(params, rest, batch, key) -> (mean loss, mean gradients) over micro-batches;
    with `with_aux`, (mean loss, mean aux, mean gradients), the loss's aux being scalars."""
    value_and_grad = jax.value_and_grad(loss_fn, has_aux=True)
    if accum_steps == 1:

        def single(params, rest, batch, key):
            (loss, aux), grads = value_and_grad(params, rest, batch, key)
            return (loss, aux, grads) if with_aux else (loss, grads)

        return single

    def accumulated(params, rest, batch, key):
        def body(carry, xs):
            i, micro = xs
            (loss, aux), grads = value_and_grad(params, rest, micro, jax.random.fold_in(key, i))
            return jax.tree.map(jnp.add, carry, (loss, grads)), (aux if with_aux else None)

        zeros = (jnp.zeros((), jnp.float32), jax.tree.map(jnp.zeros_like, params))
        xs = (jnp.arange(accum_steps), _split_micro(batch, accum_steps))
        (loss, grads), aux = jax.lax.scan(body, zeros, xs)
        loss, grads = jax.tree.map(lambda x: x / accum_steps, (loss, grads))
        if with_aux:
            return loss, jax.tree.map(lambda x: jnp.mean(x, axis=0), aux), grads
        return loss, grads

    return accumulated


def make_train_step(config, net: state_lib.Network, tx, lr_schedule, mesh, shardings, rest):
    """The jitted `train_step(state, rest, batch) -> (state, metrics)`; state donated.

    metrics (replicated scalars): loss, grad_norm (before clipping), lr (of this update),
    ema_decay, param_norm.
    """
    schedule = diffusion_config.make_schedule(config.diffusion)
    terms = aux_losses.make_terms(config, net, schedule)
    with_aux = bool(terms)  # their metrics
    grad_fn = make_grad_fn(
        make_loss_fn(config, net, schedule, terms), config.optim.accum_steps, with_aux=with_aux
    )
    update = make_update(config, tx, lr_schedule)

    def train_step(state: state_lib.TrainState, rest, batch):
        key = jax.random.fold_in(jax.random.wrap_key_data(state.rng), state.step)
        if not with_aux:
            loss, grads = grad_fn(state.params, rest, batch, key)
            return update(state, loss, grads)
        loss, aux, grads = grad_fn(state.params, rest, batch, key)
        state, metrics = update(state, loss, grads)
        return state, {**metrics, **aux}

    return jit_step(train_step, mesh, shardings, rest)


def make_update(config, tx, lr_schedule):
    """update(state, loss, grads) -> (new state, metrics): the optax update, then the EMA;
    metrics as `make_train_step` lists them."""
    ema_kwargs = dict(decay=config.train.ema_decay, warmup_power=config.train.ema_warmup_power)

    def update(state: state_lib.TrainState, loss, grads):
        updates, opt_state = tx.update(grads, state.opt_state, state.params)
        params = optax.apply_updates(state.params, updates)
        decay = state_lib.ema_decay(state.step, **ema_kwargs)
        new_state = state_lib.TrainState(
            step=state.step + 1,
            params=params,
            ema_params=state_lib.ema_update(state.ema_params, params, decay),
            opt_state=opt_state,
            rng=state.rng,
        )
        metrics = dict(
            loss=loss,
            grad_norm=optax.tree.norm(grads),
            lr=jnp.asarray(lr_schedule(state.step), jnp.float32),
            ema_decay=decay,
            param_norm=optax.tree.norm(params),
        )
        return new_state, metrics

    return update


def jit_step(train_step, mesh, shardings, rest):
    """`train_step(state, rest, batch)` jitted with the state's shardings (`rest` keeps its
    own: replicated, or an adapted network's base weights sharded), the state donated."""
    rep = parallel.replicated(mesh)
    rest_shardings = jax.tree.map(lambda x: getattr(x, "sharding", rep), rest)
    return jax.jit(
        train_step,
        in_shardings=(shardings, rest_shardings, parallel.batch_sharding(mesh)),
        out_shardings=(shardings, rep),
        donate_argnums=0,
    )
