"""Helpers of the trainer tests: runlocal configs, and a compilation cache they share.

The tests run the same few tiny programs (train step, init, sampler of the runlocal
configs) in many tests and in both pytest-xdist workers. JAX's persistent compilation
cache (a folder under the system temp dir, content-addressed by program, JAX version
and flags) lets every program compile once per session: on this machine a train step
compiles in 10-25 s and loads from the cache in about 1 s. It is set here, at import
time of this conftest (collection, before any test compiles), so it covers only
sessions that include tests/training. The size limit turns on jax's file lock, which
keeps a worker from reading an entry the other is still writing.
"""

import importlib
import json
import os
import pathlib
import sys
import tempfile

import jax
import numpy as np

ROOT = pathlib.Path(__file__).resolve().parents[2]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))  # `configs` is a folder of the repository, not installed

STAGES = ("shapes_base", "shapes_sr", "imagen_base64", "imagen_sr256", "imagen_sr1024")

_CACHE = os.environ.get("IMAGEN_JAX_TEST_JAX_CACHE") or os.path.join(
    tempfile.gettempdir(), "imagen_jax_test_jax_cache"
)
try:
    import filelock  # noqa: F401  (jax locks a size-limited cache with it)
except (
    ImportError
):  # without locks, workers must not share: one may read another's half-written entry
    _CACHE = os.path.join(_CACHE, os.environ.get("PYTEST_XDIST_WORKER", "main"))
else:
    jax.config.update("jax_compilation_cache_max_size", 2**30)
jax.config.update("jax_compilation_cache_dir", _CACHE)
jax.config.update("jax_persistent_cache_min_compile_time_secs", 0)
jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)


def stage_config(stage: str = "shapes_base", arg: str = "runlocal", **train):
    """configs/<stage>.py:<arg>, with `train` group overrides; quiet and short by default."""
    config = importlib.import_module(f"configs.{stage}").get_config(arg)
    config.train.progress = False
    for key, value in train.items():
        config.train[key] = value
    return config


def tiny(stage: str = "shapes_base", *, steps: int = 2, mesh=None, **train):
    """A runlocal config for `steps` steps, checkpointing at the end, no samples."""
    defaults = dict(steps=steps, log_every=1, checkpoint_every=steps, sample_every=0)
    config = stage_config(stage, **{**defaults, **train})
    if mesh is not None:
        config.mesh = mesh
    return config


# Resume tests: a run killed mid-way resumes to the uninterrupted run's state, bit for bit.


class Crash(Exception):
    """Raised into a run to kill it (`patch_batches`)."""


def host_tree(tree):
    return jax.tree.map(np.asarray, jax.device_get(tree))


def assert_same_tree(a, b):
    jax.tree.map(np.testing.assert_array_equal, host_tree(a), host_tree(b))


def checkpoint_steps(workdir):
    return sorted(int(p.name) for p in (workdir / "checkpoints").iterdir() if p.name.isdigit())


def logged_steps(workdir):
    lines = (workdir / "metrics.jsonl").read_text().splitlines()
    return [json.loads(line)["step"] for line in lines]


def patch_batches(monkeypatch, on_call: int, action):
    """Applies `action(batch)` to the step's global batch from the `on_call`-th on."""
    from imagen_jax.training import loop

    original = loop.device_batch
    calls = []

    def device_batch(*args):
        calls.append(1)
        batch = original(*args)
        return action(batch) if len(calls) >= on_call else batch

    monkeypatch.setattr(loop, "device_batch", device_batch)


def crash(batch):
    raise Crash
