"""Test-wide setup: JAX on 8 simulated CPU devices.

XLA reads its flags once, when JAX first starts, so they are set here, at import time of
the root conftest, before any test module imports JAX. Nothing else is changed globally
(in particular x64 stays off, as in real runs).
"""

import os
import sys

_DEVICE_COUNT_FLAG = "--xla_force_host_platform_device_count"

if "jax" in sys.modules:
    raise RuntimeError(
        "jax was imported before tests/conftest.py ran, so the simulated devices cannot be set"
    )

# Drop any earlier device-count flag so that ours is the one in force; keep all others.
_xla_flags = [
    flag
    for flag in os.environ.get("XLA_FLAGS", "").split()
    if not flag.startswith(_DEVICE_COUNT_FLAG + "=")
]
os.environ["XLA_FLAGS"] = " ".join([*_xla_flags, f"{_DEVICE_COUNT_FLAG}=8"])
os.environ["JAX_PLATFORMS"] = "cpu"
