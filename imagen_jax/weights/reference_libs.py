"""The reference libraries (torch, transformers, diffusers) as weight writers and test
oracles: what importing them needs on a CPU-only machine.

    from imagen_jax.weights.reference_libs import import_torchvision
    import_torchvision()  # before transformers / diffusers
    import diffusers

None of the project's training, sampling or serving paths imports them.
"""

from __future__ import annotations

import importlib.util
import sys
import types


def import_torchvision() -> None:
    """Imports torchvision (if installed) without its compiled operators.

    PyPI's torchvision wheels are CUDA builds whose compiled operators (nms, roi_align, ...)
    do not load against the CPU torch used here, and `import torchvision` then fails while
    registering fake kernels for them (`torchvision._meta_registrations`); transformers
    imports torchvision when it is installed, so every transformers import would fail too.
    Nothing here uses those operators: only in that case, that one module is replaced by an
    empty one before importing torchvision again.
    """
    if importlib.util.find_spec("torchvision") is None:
        return
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
