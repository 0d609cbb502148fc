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
   schedule at unit time aug_t (`diffusion.losses.time_from_unit`: for a discrete schedule
   the timestep floor(aug_t T), for logSNR schedules t = aug_t, for flow the shifted time),
   z = alpha x_low + sigma eps, and the network is told aug_t.
3. The diffusion loss (`diffusion.diffusion_loss`) on the images in [-1, 1], or on the
   batch's "latents" (latent stages: `training/latent.py` puts them there), with the network
   told the unit time (`unit_time`; diffusers' timesteps for a network whose `time_input` is
   "timesteps", `diffusers_timesteps`); with `optim.accum_steps = k` a `lax.scan` over k
   micro-batches sums the gradients, then one optimizer update (so a step is always one
   update, the learning-rate schedule and the EMA count updates, and memory holds one
   micro-batch of activations).
4. With `train.counterfactual.weight` w > 0 (base stages of the shapes source), a second
   term on the scenes whose caption has a counterfactual (the relation inverted, or the
   two colours exchanged): one noised image per scene at unit time ~ U(min_time, 1) is
   denoised with the true and with the counterfactual caption, and
   w * softplus(beta * (L_true - L_counter) / stop_gradient((L_true + L_counter) / 2)) is
   added (`counterfactual_loss`); with `train.counterfactual.margin` m > 0 the hinge
   w * relu((L_true - L_counter) / stop_gradient(...) + m) instead, which is 0 once the
   counterfactual's loss is m of their mean above the true one. `train.counterfactual.kinds`
   picks the counterfactuals the data writes ("relation", "colors"). The two losses share
   the image, the time and the noise, so everything in their gradients that does not
   depend on the caption's difference cancels: what is left is how much the network uses
   the words that differ. metrics add
   `counterfactual_loss` and `counterfactual_true_lower` (the fraction of those scenes
   whose true caption has the lower loss; 0.5 = the words are ignored).
5. A network with a layout head (`model.layout_grid` > 0: `layers.LayoutHead`) adds
   `train.layout_weight` times the head's regression loss (`layout_loss`): its prediction
   from the caption against the image average-pooled to the grid, minus the image's mean
   (metric `layout_loss`). The UNet sees the prediction with the gradient stopped, so this
   term alone trains the head, and the denoising loss alone the rest.
6. The optax update, then the EMA (`state.ema_decay`).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import optax
from flax import nnx

from imagen_jax import diffusion, parallel
from imagen_jax.diffusion import config as diffusion_config
from imagen_jax.diffusion import losses, schedules
from imagen_jax.diffusion import parameterization as param_lib
from imagen_jax.models import layers
from imagen_jax.training import config as config_lib
from imagen_jax.training import state as state_lib


def unit_time(t, *, schedule):
    """The time a sampler or loss tells the network, as a unit time in [0, 1]: logSNR
    schedules already use it; discrete timesteps and flow's sigma * T are divided by T.
    The UNet scales it by its `time_scale` (1000) before the sinusoidal embedding."""
    if isinstance(schedule, schedules.LogSNRSchedule):
        return t
    return jnp.asarray(t, jnp.float32) / schedule.num_train_timesteps


TIMESTEP_SCALE = 1000.0  # logSNR schedules' unit time -> diffusers-style timesteps


def diffusers_timesteps(t, *, schedule):
    """The time as diffusers' UNets are told it: a discrete schedule's timesteps 0..T-1 and
    flow's sigma * T as they are; a logSNR schedule's unit time times 1000."""
    if isinstance(schedule, schedules.LogSNRSchedule):
        return jnp.asarray(t, jnp.float32) * TIMESTEP_SCALE
    return jnp.asarray(t, jnp.float32)


def model_fn(model, *, schedule):
    """The network as `denoise_fn(z_t, t, cond)`, the contract of the diffusion core. It is
    told `unit_time`, or `diffusers_timesteps` when its `time_input` is "timesteps"."""
    if getattr(model, "time_input", "unit") == "timesteps":
        return lambda z_t, t, cond: model(z_t, diffusers_timesteps(t, schedule=schedule), cond)
    return lambda z_t, t, cond: model(z_t, unit_time(t, schedule=schedule), cond)


def to_float_image(x):
    """uint8 [0, 255] -> float32 [-1, 1]."""
    return jnp.asarray(x, jnp.float32) / 127.5 - 1.0


def stage_x0(batch):
    """What the stage generates: the batch's "latents" (latent stages), else its images."""
    if "latents" in batch:
        return jnp.asarray(batch["latents"], jnp.float32)
    return to_float_image(batch["image"])


def augment_low_res(low_res, aug_t, key, *, schedule):
    """Noise-conditioning augmentation: low_res [B, h, w, 3] in [-1, 1] noised to unit time
    aug_t [B] with `schedule` (see the module docstring)."""
    _, alpha_t, sigma_t = losses.time_from_unit(aug_t, schedule=schedule)
    eps = jax.random.normal(key, low_res.shape, jnp.float32)
    return losses.add_noise(x0=low_res, eps=eps, alpha_t=alpha_t, sigma_t=sigma_t)


def make_cond(batch, key, *, cond_drop_prob: float, max_aug: float | None, schedule):
    """The network's cond dict of a batch: text, mask, CFG dropout, SR augmentation."""
    key_drop, key_level, key_noise = jax.random.split(key, 3)
    text, mask = batch["text"], batch["text_mask"].astype(bool)  # [B, L, D], [B, L]
    b = text.shape[0]
    drop = jax.random.bernoulli(key_drop, cond_drop_prob, (b,)) | ~mask.any(axis=-1)
    cond = {"text": text, "text_mask": mask, "drop_text": drop}
    if max_aug is not None:
        aug_t = jax.random.uniform(key_level, (b,), maxval=max_aug)
        low = to_float_image(batch["low_res"])
        cond["low_res"] = augment_low_res(low, aug_t, key_noise, schedule=schedule)
        cond["aug_t"] = aug_t
    return cond


# The batch entries the counterfactual term reads (the trainer's device_batch writes them).
COUNTERFACTUAL_KEYS = ("counter_text", "counter_mask", "has_counterfactual")


def counterfactual_loss(
    denoise, x0, batch, key, *, schedule, prediction, beta, min_time, rows=0, margin=0.0
):
    """(loss, metrics) of the counterfactual term (module docstring, 4.) over the rows of
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


def layout_grid(net: state_lib.Network) -> int:
    """The grid of the network's layout head (`imagen_unet.UNetConfig.layout_grid`); 0: none."""
    return net.cfg.layout_grid if net.family == "imagen" else 0


def has_extra_terms(config, net: state_lib.Network) -> bool:
    """Whether the loss adds terms beyond the denoising loss (their metrics are logged)."""
    return config_lib.counterfactual_weight(config) > 0 or layout_grid(net) > 0


def layout_loss(model, batch):
    """The layout head's regression loss (module docstring, 5.): the mean squared error of
    its prediction from the caption against the image pooled to its grid."""
    pred = model.layout(batch["text"], batch["text_mask"].astype(bool)).astype(jnp.float32)
    target = layers.layout_target(stage_x0(batch).astype(jnp.float32), pred.shape[1])
    return jnp.mean(jnp.square(pred - target))


def make_loss_fn(config, net: state_lib.Network, schedule):
    """loss_fn(params, rest, batch, key) -> (loss, aux) of one (micro-)batch; aux holds the
    metrics of the extra terms (`has_extra_terms`): the counterfactual term's when
    `train.counterfactual.weight` > 0, `layout_loss` with a layout head."""
    dcfg = config.diffusion
    grid = layout_grid(net)
    layout_weight = float(config.train.get("layout_weight", 1.0))
    loss_kwargs = dict(config.train.loss)
    max_aug = float(config.train.noise_aug.max_level) if net.low_res else None
    use_dropout = net.dropout > 0
    counter_weight = config_lib.counterfactual_weight(config)
    if counter_weight > 0 and (net.low_res or dcfg.model_space != "vp"):
        raise ValueError(
            "train.counterfactual.weight > 0 is for base pixel stages (vp model space); "
            "this stage is a super-resolution stage or a flow model"
        )

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
        )
        main = diffusion.diffusion_loss(
            model_fn(model, schedule=schedule),
            stage_x0(batch),
            cond,
            key_loss,
            schedule=schedule,
            prediction=dcfg.prediction,
            model_space=dcfg.model_space,
            learned_variance=dcfg.variance == "learned_range",
            **loss_kwargs,
        )
        if not (counter_weight > 0 or grid):
            return main
        total, metrics = main[0], {}
        if grid:
            metrics["layout_loss"] = layout_loss(model, batch)
            total = total + layout_weight * metrics["layout_loss"]
        if counter_weight == 0:
            return total, metrics
        missing = [k for k in COUNTERFACTUAL_KEYS if k not in batch]
        if missing:
            raise ValueError(
                f"train.counterfactual.weight > 0 but the batch has no {missing}: it needs "
                "data.source='shapes' and captions encoded in the loop (not text.cache)"
            )
        extra, counter_metrics = counterfactual_loss(
            model_fn(model, schedule=schedule),
            stage_x0(batch),
            batch,
            jax.random.fold_in(key_loss, 1),
            schedule=schedule,
            prediction=dcfg.prediction,
            beta=float(config.train.counterfactual.beta),
            min_time=float(config.train.counterfactual.min_time),
            rows=int(config.train.counterfactual.get("rows", 0)),
            margin=float(config.train.counterfactual.get("margin", 0.0)),
        )
        return total + counter_weight * extra, {**metrics, **counter_metrics}

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
    with_aux = has_extra_terms(config, net)  # their metrics
    grad_fn = make_grad_fn(
        make_loss_fn(config, net, schedule), config.optim.accum_steps, with_aux=with_aux
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
    """`train_step(state, rest, batch)` jitted with the state's shardings, the state donated."""
    rep = parallel.replicated(mesh)
    rest_shardings = jax.tree.map(lambda _: rep, rest)
    return jax.jit(
        train_step,
        in_shardings=(shardings, rest_shardings, parallel.batch_sharding(mesh)),
        out_shardings=(shardings, rep),
        donate_argnums=0,
    )
