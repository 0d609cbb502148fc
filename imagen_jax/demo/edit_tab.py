"""The editing tab: upload an image, paint the region to regenerate (or leave it unpainted
for image-to-image), give a prompt, and get `sample.py --init_image --mask`'s images.

The painted strokes (any layer's opaque pixels) become the mask, white where the image is
regenerated; the image and the mask are written as PNG files under the demo's workdir and
the request runs as `sample.py` runs those files (`DemoModel.generate` /
`LatentDemoModel.generate` with `models.EditFiles`), so the PNGs and their metadata (the
files' SHA-256, strength, RePaint settings) are the command line's, which the page shows.
Models that do not edit (SD 3) are not offered.
"""

from __future__ import annotations

import itertools
import os
import secrets

import gradio as gr
import numpy as np
from PIL import Image

from imagen_jax.demo.models import MAX_IMAGES, EditFiles, Request
from imagen_jax.demo.text_to_image import ADMITTED, report_progress, run_request

MAX_REPAINT_JUMP = 10
MAX_REPAINT_RESAMPLE = 10
_counter = itertools.count()


def painted_mask(layers) -> np.ndarray | None:
    """The union of the layers' opaque pixels as a bool [H, W] (None: nothing painted)."""
    layers = [np.asarray(layer) for layer in layers or ()]
    masks = [layer[..., 3] > 0 for layer in layers if layer.ndim == 3 and layer.shape[-1] == 4]
    if not masks:
        return None
    union = np.logical_or.reduce(masks)
    return union if union.any() else None


def save_inputs(value: dict, folder: str) -> tuple[str, str | None]:
    """Writes the editor's background (as RGB) and painted mask (L, white = regenerate) into
    folder; returns their paths (the mask's None when nothing was painted)."""
    background = value.get("background") if isinstance(value, dict) else None
    if background is None:
        raise gr.Error("upload an image to edit")
    os.makedirs(folder, exist_ok=True)
    image = Image.fromarray(np.asarray(background, np.uint8)).convert("RGB")
    image_path = os.path.join(folder, "image.png")
    image.save(image_path)
    mask = painted_mask(value.get("layers"))
    if mask is None:
        return image_path, None
    if mask.shape != (image.height, image.width):
        raise gr.Error(
            f"the painted mask is {mask.shape[1]}x{mask.shape[0]}, the image "
            f"{image.width}x{image.height}"
        )
    mask_path = os.path.join(folder, "mask.png")
    Image.fromarray(mask.astype(np.uint8) * 255).save(mask_path)
    return image_path, mask_path


def build(models: dict, workdir: str):
    """The tab's components and events, inside an open gr.Blocks."""
    names = [n for n, m in models.items() if getattr(m, "edits", False)]
    if not names:
        gr.Markdown("None of the served models edits images (SD 3 does not yet).")
        return {}
    with gr.Row():
        with gr.Column(scale=2):
            model_box = gr.Dropdown(names, value=names[0], label="Model")
            editor = gr.ImageEditor(
                type="numpy",
                label="Image: paint the region to regenerate (nothing painted: image-to-image)",
                sources=("upload", "clipboard"),
                brush=gr.Brush(colors=["#ffffff"], color_mode="fixed"),
                elem_id="edit-image",
            )
            prompt = gr.Textbox(label="Prompt", lines=2, elem_id="edit-prompt")
            negative = gr.Textbox(label="Negative prompt", lines=1)
            with gr.Row():
                seed = gr.Number(value=0, precision=0, label="Seed", minimum=0)
                random_seed = gr.Checkbox(value=True, label="Random seed")
                count = gr.Slider(1, MAX_IMAGES, value=4, step=1, label="Images")
            strength = gr.Slider(
                0, 1, value=1.0, step=0.05, label="Strength (1: from noise; 0: the image)"
            )
            with gr.Row():
                jump = gr.Slider(
                    0, MAX_REPAINT_JUMP, value=0, step=1, label="RePaint jump (0: off)"
                )
                resample = gr.Slider(
                    1, MAX_REPAINT_RESAMPLE, value=1, step=1, label="RePaint resample"
                )
            with gr.Row():
                go = gr.Button("Edit", variant="primary", elem_id="edit-go")
                stop = gr.Button("Cancel", elem_id="edit-cancel")
        with gr.Column(scale=3):
            gallery = gr.Gallery(label="Images", columns=4, format="png", interactive=False)
            files = gr.Files(label="PNG files (with their metadata)", interactive=False)
            info = gr.Markdown(elem_id="edit-info")

    def edit(name, value, text, neg, seed_value, use_random, n, s, j, r):
        progress = gr.Progress()
        if name not in models or not getattr(models[name], "edits", False):
            raise gr.Error(f"model {name!r} does not edit images")
        model = models[name]
        folder = os.path.join(workdir, "edit-inputs", f"{next(_counter):05d}")
        image_path, mask_path = save_inputs(value, folder)
        seed_used = secrets.randbelow(2**31) if use_random else int(seed_value or 0)
        request = Request(
            prompt=text or "",
            negative_prompt=neg or "",
            seed=seed_used,
            num_images=int(n),
            edit=EditFiles(image_path, mask_path, float(s), int(j), int(r) if int(j) else 1),
        )
        for event in run_request(model, request, workdir):
            if report_progress(progress, event, model.num_stages):
                continue
            if event[0] == "done":
                _, summary, warnings = event
                notes = list(request.edit.load().notes) + warnings
                if mask_path is None:
                    notes.append(f"nothing painted: image-to-image at strength {float(s)}")
                lines = [
                    f"**Seed** {seed_used} · **job** `{summary['job']}` · "
                    f"{summary['made']} made in {summary['seconds']:.1f} s",
                    f"Same images from the command line: `{request.command(model)}`",
                    *[f"> {note}" for note in notes],
                ]
                yield summary["files"], summary["files"], "\n\n".join(lines), seed_used

    event = go.click(
        edit,
        [model_box, editor, prompt, negative, seed, random_seed, count, strength, jump, resample],
        [gallery, files, info, seed],
        api_name="edit",
        concurrency_limit=ADMITTED,
        concurrency_id="device",
    )
    stop.click(None, None, None, cancels=[event], queue=False)
    return dict(edit=event)
