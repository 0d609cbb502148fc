"""Quieter logs for the mains: `quiet_logs()` first thing in `main(argv)`.

Two libraries fill a run's log with INFO lines that say nothing about the run: Orbax logs
dozens per checkpoint save (threads, signals, throughput, renames; through absl.logging,
so they are told apart by the file that logs them), and JAX logs its probe for a TPU on
machines without one ("Unable to initialize backend 'tpu': ... libtpu.so ..."). Their
warnings and errors still show, and so do every INFO line of this project. Giving
--verbosity (e.g. --verbosity=0, absl's INFO level) shows everything again.

`allocator()` names the malloc the process runs on; `cpu_allocator_note()` is the line a
CPU training run logs where it is glibc's (docs/training.md: tcmalloc makes a step
1.2-1.3x faster there).
"""

from __future__ import annotations

import importlib.util
import logging
import os
import platform

from absl import flags

# Loggers of the standard logging module set to WARNING.
QUIET_LOGGERS = ("jax._src.xla_bridge", "orbax", "httpx")  # httpx: Gradio's start-up probes
# Packages whose absl.logging lines below WARNING are dropped.
QUIET_PACKAGES = ("orbax",)


class _DropPackageInfo(logging.Filter):
    """Drops records below WARNING logged from files under `folders`."""

    def __init__(self, folders: tuple[str, ...]):
        super().__init__()
        self.folders = folders

    def filter(self, record: logging.LogRecord) -> bool:
        return record.levelno >= logging.WARNING or not record.pathname.startswith(self.folders)


def _package_folders(names) -> tuple[str, ...]:
    folders = []
    for name in names:
        spec = importlib.util.find_spec(name)
        for folder in (spec.submodule_search_locations or []) if spec else []:
            folders.append(os.path.join(os.path.realpath(folder), ""))
            folders.append(os.path.join(os.path.abspath(folder), ""))
    return tuple(dict.fromkeys(folders))


def quiet_logs() -> None:
    """Hides other libraries' INFO lines (module docstring), unless --verbosity was given.
    Call it at the start of a main's `main(argv)`, once absl has parsed the flags; calling
    it twice changes nothing."""
    values = flags.FLAGS
    if values.is_parsed() and "verbosity" in values and values["verbosity"].present:
        return
    for name in QUIET_LOGGERS:
        logging.getLogger(name).setLevel(logging.WARNING)
    absl_logger = logging.getLogger("absl")  # where absl.logging calls go
    if not any(isinstance(f, _DropPackageInfo) for f in absl_logger.filters):
        absl_logger.addFilter(_DropPackageInfo(_package_folders(QUIET_PACKAGES)))


# Debian's libtcmalloc-minimal4, in its multiarch folder (x86_64-linux-gnu, aarch64-linux-gnu).
TCMALLOC = f"/usr/lib/{platform.machine()}-linux-gnu/libtcmalloc_minimal.so.4"


def allocator(maps: str = "/proc/self/maps") -> str:
    """ "tcmalloc" or "jemalloc" where one is loaded into the process (LD_PRELOAD), "libc"
    otherwise, "unknown" where `maps` cannot be read (not Linux)."""
    try:
        with open(maps) as f:
            text = f.read()
    except OSError:
        return "unknown"
    return next((name for name in ("tcmalloc", "jemalloc") if name in text), "libc")


def cpu_allocator_note(backend: str, maps: str = "/proc/self/maps") -> str | None:
    """For a training run on `backend`: a line suggesting tcmalloc where the run is on the
    CPU with glibc's malloc (each step faults its freed buffers in again), else None."""
    if backend != "cpu" or allocator(maps) != "libc":
        return None
    have = os.path.exists(TCMALLOC)
    return (
        "CPU training on glibc's malloc: a step runs 1.2-1.3x faster with tcmalloc, "
        f"LD_PRELOAD={TCMALLOC} "
        + ("(installed here)" if have else "(apt install libtcmalloc-minimal4)")
        + "; docs/training.md"
    )
