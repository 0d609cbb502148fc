"""The demo app: the tabs over the loaded models, the queue, the launch.

    app = build_app(models, workdir)
    app.queue(max_size=...); app.launch(server_name="127.0.0.1", server_port=7860)

One device, one program at a time (each model's lock, shared across models); Gradio admits
a few generations at once (concurrency id "device") so that waiting requests of one setting
share a batch (`DemoModel.generate`); past `max_queue` waiting requests Gradio answers
"queue is full" at once. A new tab is a module with a `build(models, workdir)` that lays out
its components inside the Blocks.
"""

from __future__ import annotations

import logging
import os
import tempfile
import time

import gradio as gr

from imagen_jax.demo import edit_tab, text_to_image
from imagen_jax.demo.models import Request

TABS = (("Text to image", text_to_image), ("Edit", edit_tab))
TITLE = "imagen_jax"


def build_app(models: dict, workdir: str | None = None) -> gr.Blocks:
    """The Blocks app over `models` ({name: DemoModel}); generated PNGs go under workdir
    (None: a temporary folder)."""
    if not models:
        raise ValueError("no model to serve: every model failed to load (see the log)")
    workdir = workdir or tempfile.mkdtemp(prefix="imagen_jax_demo_")
    with gr.Blocks(title=TITLE, analytics_enabled=False) as app:
        gr.Markdown(
            f"# {TITLE}\nText-to-image and editing with the project's models: the images "
            "and their PNG metadata are those `sample.py` writes for the same settings."
        )
        for label, module in TABS:
            with gr.Tab(label):
                module.build(models, workdir)
    app.demo_workdir = workdir
    return app


def warm_up(models: dict, workdir: str) -> float:
    """Compiles each model's default setting (one image of the trained size) before the
    first user comes; returns the seconds it took."""
    start = time.perf_counter()
    for name, model in models.items():
        request = Request(prompt="warm-up", num_images=1)
        model.generate(request, os.path.join(workdir, "warm-up", str(abs(hash(name)))))
        logging.info("demo: %s compiled", name)
    return time.perf_counter() - start


def launch(
    models: dict,
    *,
    host: str = "127.0.0.1",
    port: int = 7860,
    max_queue: int = 8,
    workdir: str | None = None,
    warm: bool = True,
    block: bool = True,
):
    """Builds, warms up and serves the app; returns it (block=False: serving in the
    background, for tests)."""
    app = build_app(models, workdir)
    if warm:
        seconds = warm_up(models, app.demo_workdir)
        print(f"demo: compiled the default settings in {seconds:.1f} s")
    app.queue(max_size=max_queue, default_concurrency_limit=1)
    app.launch(
        server_name=host,
        server_port=port,
        prevent_thread_lock=not block,
        show_error=True,
        quiet=not block,
        allowed_paths=[app.demo_workdir],
    )
    return app
