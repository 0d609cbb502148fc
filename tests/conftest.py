"""Test-wide setup: JAX on 8 simulated CPU devices; torchvision importable.

XLA reads its flags once, when JAX first starts, so they are set here, at import time of
the root conftest, before any test module imports JAX. Nothing else is changed globally
(in particular x64 stays off, as in real runs).
"""

import importlib.util
import os
import sys
import types

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


def _import_torchvision() -> None:
    """Imports torchvision (a dependency of the FID references) without its operators.

    PyPI's torchvision wheels are CUDA builds whose compiled operators (nms, roi_align, ...)
    do not load against the CPU torch used here, and `import torchvision` then fails while
    registering fake kernels for them (`torchvision._meta_registrations`); transformers
    imports torchvision when it is installed, so every transformers import would fail too.
    Nothing here uses those operators (the Inception modules are pure Python): only in that
    case, that one module is replaced by an empty one before importing torchvision again.
    """
    try:
        import torchvision  # noqa: F401
    except RuntimeError as e:
        if "torchvision::" not in str(e):
            raise
        for name in [m for m in sys.modules if m == "torchvision" or m.startswith("torchvision.")]:
            del sys.modules[name]
        stub = "torchvision._meta_registrations"
        sys.modules[stub] = types.ModuleType(stub)
        import torchvision  # noqa: F401


if importlib.util.find_spec("torchvision") is not None:
    _import_torchvision()
