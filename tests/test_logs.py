"""imagen_jax.logs.quiet_logs: a main's log keeps its own lines and drops Orbax's INFO lines
and JAX's TPU probe, unless --verbosity is given."""

import pathlib
import re
import subprocess
import sys

ROOT = pathlib.Path(__file__).resolve().parents[1]

MAIN = """
import logging as std_logging
import sys
import tempfile

import numpy as np
import orbax.checkpoint as ocp
from absl import app, logging

from imagen_jax import logs


def main(argv):
    logs.quiet_logs()
    logs.quiet_logs()  # twice: no second filter, same result
    std_logging.getLogger("jax._src.xla_bridge").info(
        "Unable to initialize backend 'tpu': INTERNAL: Failed to open libtpu.so"
    )
    with tempfile.TemporaryDirectory() as folder:
        checkpointer = ocp.StandardCheckpointer()
        checkpointer.save(folder + "/step", {"w": np.zeros(3)})
        checkpointer.wait_until_finished()
    logging.info("our own line")
    logging.warning("our own warning")


app.run(main)
"""


def run_main(tmp_path, *flags):
    script = tmp_path / "main.py"
    script.write_text(MAIN)
    out = subprocess.run(
        [sys.executable, str(script), *flags],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert out.returncode == 0, out.stderr
    info = [line for line in out.stderr.splitlines() if re.match(r"I\d{4} ", line)]
    return out.stderr, info


def test_other_libraries_info_lines_are_dropped(tmp_path):
    log, info = run_main(tmp_path)
    assert len(info) == 1 and info[0].endswith("our own line"), log
    assert "our own warning" in log and "Unable to initialize backend" not in log


def test_verbosity_shows_them(tmp_path):
    log, info = run_main(tmp_path, "--verbosity=0")
    assert "Unable to initialize backend 'tpu'" in log
    assert any("orbax" in line or "checkpoint" in line for line in info), log
    assert len(info) > 3


def test_allocator_reads_the_process_map_and_the_cpu_note_names_tcmalloc(tmp_path):
    from imagen_jax import logs

    glibc = tmp_path / "glibc"
    glibc.write_text("7f00-7f10 r-xp 0 08:01 1 /usr/lib/x86_64-linux-gnu/libc.so.6\n")
    tcmalloc = tmp_path / "tcmalloc"
    tcmalloc.write_text(
        glibc.read_text() + "7f20-7f30 r-xp 0 08:01 2 /usr/lib/libtcmalloc_minimal.so.4\n"
    )
    assert logs.allocator(str(glibc)) == "libc"
    assert logs.allocator(str(tcmalloc)) == "tcmalloc"
    assert logs.allocator(str(tmp_path / "absent")) == "unknown"
    note = logs.cpu_allocator_note("cpu", str(glibc))
    assert "LD_PRELOAD=" + logs.TCMALLOC in note and "docs/training.md" in note
    assert logs.cpu_allocator_note("cpu", str(tcmalloc)) is None
    assert logs.cpu_allocator_note("gpu", str(glibc)) is None
