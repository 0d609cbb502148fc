"""A demo server on 127.0.0.1 over two tiny random stages (8 px base, 8 -> 16 px
super-resolution), started once per test module; what the tests reach it with."""

import socket

import pytest
from gradio_client import Client
from tiny_stages import save_tiny_stage

from imagen_jax.demo import app as demo_app
from imagen_jax.demo import loading as demo_loading


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def stage_dirs(tmp_path_factory):
    root = tmp_path_factory.mktemp("stages")
    return [
        save_tiny_stage(root / "base", low_res=False, resolution=8),
        save_tiny_stage(root / "sr", low_res=True, resolution=16, low_resolution=8, seed=2),
    ]


@pytest.fixture(scope="module")
def server(stage_dirs, tmp_path_factory):
    """(the served DemoModel "base+sr", a gradio_client Client, the port)."""
    paths = [",".join(stage_dirs), str(tmp_path_factory.mktemp("empty"))]
    models = demo_loading.load_models(paths, batch_size=2, shipped=False)
    assert list(models) == ["base+sr"]  # the folder without stages is logged and left out
    port = _free_port()
    workdir = str(tmp_path_factory.mktemp("demo"))
    app = demo_app.launch(models, port=port, max_queue=2, workdir=workdir, warm=False, block=False)
    client = Client(f"http://127.0.0.1:{port}/", verbose=False)
    yield models["base+sr"], client, port
    app.close()
