"""`--help` of train.py, sample.py and caption.py lists their own flags, the multi-host ones of
`parallel.define_distributed_flags` included, and not those of the libraries they import
(grain, orbax, absl: `--helpfull`)."""

import pathlib
import subprocess
import sys

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]
DISTRIBUTED = ("--coordinator_address", "--num_processes", "--process_id", "--[no]jax_distributed")


@pytest.mark.parametrize(
    ("main", "own"),
    [
        ("sample.py", "--stage"),
        ("sample.py", "--model"),
        ("train.py", "--workdir"),
        ("caption.py", "--model"),
    ],
)
def test_help_lists_the_mains_flags(main, own):
    out = subprocess.run(
        [sys.executable, main, "--help"], cwd=ROOT, capture_output=True, text=True, timeout=300
    )
    text = out.stdout + out.stderr
    assert "Traceback" not in text, text
    flags_part = text[text.index("\nflags:\n") :]
    assert f"\n{main}:\n" in flags_part, flags_part  # one group: the main's own flags
    for flag in (own, *DISTRIBUTED):
        assert f"  {flag}:" in flags_part, (flag, flags_part)
    assert "imagen_jax.parallel:" not in flags_part and "grain" not in flags_part
