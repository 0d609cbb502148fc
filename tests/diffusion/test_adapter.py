"""The network adapter: the time a network is told, and the super-resolution noise
augmentation that the trainer and the cascade sampler share."""

import jax
import jax.numpy as jnp
import numpy as np

from imagen_jax.diffusion import adapter, losses
from imagen_jax.diffusion import config as diffusion_config

COSINE = diffusion_config.make_schedule(diffusion_config.diffusion_config(schedule="cosine"))
DISCRETE = diffusion_config.make_schedule(diffusion_config.diffusion_config(schedule="linear"))


def test_network_is_told_unit_time():
    assert adapter.unit_time(0.25, schedule=COSINE) == 0.25
    np.testing.assert_allclose(adapter.unit_time(jnp.array([0, 500]), schedule=DISCRETE), [0, 0.5])
    np.testing.assert_allclose(adapter.diffusers_timesteps(0.25, schedule=COSINE), 250.0)
    np.testing.assert_allclose(adapter.diffusers_timesteps(jnp.array([7]), schedule=DISCRETE), [7])


def _low(b=4, side=8):
    return jax.random.uniform(jax.random.key(0), (b, side, side, 3), minval=-1.0, maxval=1.0)


def test_augmentation_is_alpha_x_plus_sigma_eps_with_either_key_form():
    low, aug_t = _low(), jnp.array([0.0, 0.1, 0.3, 0.5])
    _, alpha, sigma = losses.time_from_unit(aug_t, schedule=COSINE)
    shape = (-1, 1, 1, 1)
    one_key = adapter.augment_low_res(low, aug_t, jax.random.key(1), schedule=COSINE)
    eps = jax.random.normal(jax.random.key(1), low.shape)
    np.testing.assert_allclose(
        one_key, alpha.reshape(shape) * low + sigma.reshape(shape) * eps, atol=1e-6
    )
    row_keys = jax.random.split(jax.random.key(2), 4)
    per_row = adapter.augment_low_res(low, aug_t, row_keys, schedule=COSINE)
    eps_rows = jnp.stack([jax.random.normal(k, low.shape[1:]) for k in row_keys])
    np.testing.assert_allclose(
        per_row, alpha.reshape(shape) * low + sigma.reshape(shape) * eps_rows, atol=1e-6
    )
    np.testing.assert_allclose(per_row[0], low[0], atol=1e-3)  # level 0: the image itself


def test_a_rows_augmentation_does_not_depend_on_its_batch():
    low, aug_t = _low(), jnp.full((4,), 0.2)
    keys = jax.random.split(jax.random.key(3), 4)
    whole = adapter.augment_low_res(low, aug_t, keys, schedule=COSINE)
    order = jnp.array([2, 0, 3, 1])
    shuffled = adapter.augment_low_res(low[order], aug_t[order], keys[order], schedule=COSINE)
    np.testing.assert_allclose(shuffled, whole[order], atol=1e-6)
    alone = adapter.augment_low_res(low[1:2], aug_t[1:2], keys[1:2], schedule=COSINE)
    np.testing.assert_allclose(alone[0], whole[1], atol=1e-6)
