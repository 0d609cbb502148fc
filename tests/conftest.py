"""Test-wide setup: JAX on 8 simulated CPU devices; torchvision importable.

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

# Helpers shared by several test folders (tiny_stages.py) import by their module name.
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))


# transformers imports torchvision when installed; the CUDA wheel's operators do not load
# against the CPU torch (imagen_jax.weights.reference_libs says how it is imported anyway).
from imagen_jax.weights.reference_libs import import_torchvision  # noqa: E402

import_torchvision()
