"""The model can learn: on one fixed batch the loss falls far below where it starts."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import tiny

from imagen_jax import training
from imagen_jax.text.config import make_text_encoder
from imagen_jax.training import loop

PROBES = 8


@jax.jit
def _copy(state):
    return jax.tree.map(jnp.copy, state)


def _probe_losses(train_step, state, rest, batch):
    """The loss of `state`'s parameters under the draws (times, noise, CFG dropout) of
    steps 0..PROBES-1: the train step reports the loss before its update, so running it
    on copies of the state with the step counter reset measures without training."""
    losses = []
    for step in range(PROBES):
        probe = _copy(state)._replace(step=jnp.int32(step))
        losses.append(float(train_step(probe, rest, batch)[1]["loss"]))
    return np.asarray(losses)


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_loss_falls_on_a_fixed_batch(dtype):
    """Also with bfloat16 compute (model.dtype): the step compiles and learns, and the
    parameters, the optimizer state and the EMA stay float32. (On the CPU, XLA may keep
    bfloat16 intermediates in float32, its default excess precision, so the numbers here
    say nothing of bfloat16 rounding.)"""
    config = tiny(steps=100)
    config.model.dtype = dtype
    mesh = loop.make_mesh(config)
    with jax.set_mesh(mesh):
        net = training.make_network(config.model)
        tx, lr_schedule = training.make_optimizer(config.optim, config.train.steps)
        state, shardings, rest = training.create_train_state(config, net, tx, mesh)
        encoder = make_text_encoder(config.text)
        batch = loop.device_batch(next(training.make_input(config)), encoder, mesh)
        train_step = training.make_train_step(config, net, tx, lr_schedule, mesh, shardings, rest)
        before = _probe_losses(train_step, state, rest, batch)
        for _ in range(config.train.steps):
            state, metrics = train_step(state, rest, batch)
            jax.block_until_ready(metrics)  # one step in flight, as in the trainer
        after = _probe_losses(train_step, state, rest, batch)
    print(f"loss on the same draws: before {before.mean():.3f}, after {after.mean():.3f}")
    assert np.isfinite(after).all() and int(state.step) == 100
    floats = {x.dtype for x in jax.tree.leaves((state.params, state.ema_params, state.opt_state))}
    assert floats <= {jnp.dtype("float32"), jnp.dtype("int32")}, floats
    assert after.mean() < 0.6 * before.mean(), (before, after)
