"""Tiny random stage directories that the pipeline tests sample: a runlocal base stage (8 px)
and a runlocal super-resolution stage (8 -> 16 px), with the hashing text encoder."""

import pytest
from tiny_stages import save_tiny_stage


@pytest.fixture(scope="session")
def stage_dirs(tmp_path_factory) -> list[str]:
    """[base stage dir (8 px), super-resolution stage dir (8 -> 16 px)]."""
    root = tmp_path_factory.mktemp("stages")
    return [
        save_tiny_stage(root / "base", low_res=False, resolution=8),
        save_tiny_stage(root / "sr", low_res=True, resolution=16, low_resolution=8, seed=2),
    ]
