"""The pieces of the train step: CFG dropout, noise-conditioning augmentation, time
conventions, gradient accumulation, learning-rate schedule and EMA."""

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from imagen_jax.diffusion import config as diffusion_config
from imagen_jax.diffusion import losses
from imagen_jax.images import to_float_image
from imagen_jax.training import config as config_lib
from imagen_jax.training import state as state_lib
from imagen_jax.training import step as step_lib

COSINE = diffusion_config.make_schedule(diffusion_config.diffusion_config(schedule="cosine"))
DISCRETE = diffusion_config.make_schedule(diffusion_config.diffusion_config(schedule="linear"))


def _batch(b=512, low=None):
    rng = np.random.default_rng(0)
    mask = np.ones((b, 4), bool)
    mask[:8] = False  # eight empty captions
    batch = {"text": jnp.asarray(rng.normal(size=(b, 4, 3)), jnp.float32), "text_mask": mask}
    if low:
        batch["low_res"] = jnp.asarray(rng.integers(0, 256, (b, low, low, 3)), jnp.uint8)
    return batch


@pytest.mark.parametrize("p", [0.0, 0.1, 1.0])
def test_cfg_dropout_rate_and_empty_captions(p):
    cond = step_lib.make_cond(
        _batch(), jax.random.key(0), cond_drop_prob=p, max_aug=None, schedule=COSINE
    )
    drop = np.asarray(cond["drop_text"])
    assert drop[:8].all()  # no tokens: always the learned null text
    assert abs(drop[8:].mean() - p) < 0.05
    assert "low_res" not in cond and "aug_t" not in cond


def test_noise_augmentation_levels_and_schedule():
    batch = _batch(low=4)
    cond = step_lib.make_cond(
        batch, jax.random.key(1), cond_drop_prob=0.0, max_aug=0.3, schedule=COSINE
    )
    aug_t = np.asarray(cond["aug_t"])
    assert aug_t.min() >= 0 and aug_t.max() < 0.3 and aug_t.max() > 0.25
    low = np.asarray(to_float_image(batch["low_res"]))
    noised = np.asarray(cond["low_res"])
    _, alpha, sigma = (np.asarray(x) for x in losses.time_from_unit(aug_t, schedule=COSINE))
    eps = (noised - alpha[:, None, None, None] * low) / sigma[:, None, None, None]
    assert abs(eps.std() - 1) < 0.05 and abs(eps.mean()) < 0.05  # z = alpha x + sigma eps


def test_accumulated_gradients_equal_full_batch_gradients():
    def loss_fn(params, rest, batch, key):  # a mean over rows, as the diffusion loss
        del rest, key
        return jnp.mean((batch["x"] @ params["w"] - batch["y"]) ** 2), {}

    rng = np.random.default_rng(0)
    params = {"w": jnp.asarray(rng.normal(size=(3, 2)), jnp.float32)}
    batch = {"x": jnp.asarray(rng.normal(size=(8, 3))), "y": jnp.asarray(rng.normal(size=(8, 2)))}
    full = step_lib.make_grad_fn(loss_fn, 1)(params, None, batch, jax.random.key(0))
    accumulated = step_lib.make_grad_fn(loss_fn, 4)(params, None, batch, jax.random.key(0))
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5), full, accumulated)
    micro = step_lib._split_micro({"x": jnp.arange(8)}, 4)["x"]
    np.testing.assert_array_equal(micro, [[0, 4], [1, 5], [2, 6], [3, 7]])


def test_lr_schedules():
    cfg = config_lib.optim_config(lr=1.0, warmup_steps=10, decay="cosine", end_lr_factor=0.1)
    sched = state_lib.make_lr_schedule(cfg, total_steps=110)
    np.testing.assert_allclose(
        [sched(0), sched(5), sched(10), sched(110)], [0, 0.5, 1, 0.1], atol=1e-6
    )
    cfg.decay = "linear"
    sched = state_lib.make_lr_schedule(cfg, total_steps=110)
    np.testing.assert_allclose([sched(10), sched(60), sched(110)], [1, 0.55, 0.1], atol=1e-6)
    cfg.decay = "constant"
    sched = state_lib.make_lr_schedule(cfg, total_steps=110)
    np.testing.assert_allclose([sched(5), sched(1000)], [0.5, 1.0], atol=1e-6)
    cfg.cooldown_steps = 40  # constant, then linear to lr * end_lr_factor over the last 40
    sched = state_lib.make_lr_schedule(cfg, total_steps=110)
    np.testing.assert_allclose(
        [sched(5), sched(10), sched(70), sched(90), sched(110), sched(200)],
        [0.5, 1, 1, 0.55, 0.1, 0.1],
        atol=1e-6,
    )
    cfg.cooldown_steps = 105  # longer than what follows the warm-up: decays from its end
    sched = state_lib.make_lr_schedule(cfg, total_steps=110)
    np.testing.assert_allclose([sched(10), sched(60), sched(110)], [1, 0.55, 0.1], atol=1e-6)
    cfg.warmup_steps = 0
    sched = state_lib.make_lr_schedule(cfg, total_steps=110)
    np.testing.assert_allclose([sched(0), sched(5), sched(110)], [1, 1, 0.1], atol=1e-6)
    cfg.decay = "linear"
    with pytest.raises(ValueError, match="optim.cooldown_steps=105 needs"):
        state_lib.make_lr_schedule(cfg, total_steps=110)
    cfg.cooldown_steps = 0
    cfg.decay = "step"
    with pytest.raises(ValueError, match="optim.decay"):
        state_lib.make_lr_schedule(cfg, total_steps=110)


def test_optimizer_clips_and_masks_weight_decay():
    cfg = config_lib.optim_config(lr=1.0, warmup_steps=0, decay="constant", weight_decay=0.5)
    tx, _ = state_lib.make_optimizer(cfg, total_steps=10)
    params = {"kernel": jnp.ones((2, 2)), "bias": jnp.ones((2,))}
    zero = jax.tree.map(jnp.zeros_like, params)
    updates, _ = tx.update(zero, tx.init(params), params)
    np.testing.assert_allclose(updates["kernel"], -0.5)  # decayed
    np.testing.assert_allclose(updates["bias"], 0.0)  # not decayed
    with pytest.raises(ValueError, match="optim.optimizer"):
        state_lib.make_optimizer(ml_collections.ConfigDict(dict(cfg, optimizer="sgd")), 10)


def test_ema_decay_warm_up_and_update():
    assert float(state_lib.ema_decay(0, decay=0.999, warmup_power=2 / 3)) == 0.0
    d = [float(state_lib.ema_decay(s, decay=0.999, warmup_power=2 / 3)) for s in (1, 10, 10**6)]
    assert d[0] < d[1] < d[2] == pytest.approx(0.999)
    assert float(state_lib.ema_decay(5, decay=0.9, warmup_power=0)) == pytest.approx(0.9)
    ema = state_lib.ema_update({"w": jnp.zeros(2)}, {"w": jnp.ones(2)}, 0.75)
    np.testing.assert_allclose(ema["w"], 0.25)
