"""The test session runs on 8 simulated CPU devices with default (32-bit) JAX settings."""

import jax
import jax.numpy as jnp


def test_eight_simulated_cpu_devices():
    assert jax.device_count() == 8
    assert {d.platform for d in jax.devices()} == {"cpu"}


def test_x64_stays_off():
    assert jnp.zeros(()).dtype == jnp.float32
