"""The text-to-image tab: prompt and settings in, images out, with progress by stage and
step, each stage's images as it finishes, a cancel button, and a history of the session's
generations that restores their settings when clicked.

`build(models, workdir)` lays the tab out inside an open `gr.Blocks`; the generation itself
is `DemoModel.generate` (the sampling job of `sample.py`), run in a thread so the page gets
progress while the compiled programs run.
"""

from __future__ import annotations

import dataclasses
import itertools
import logging
import os
import queue
import secrets
import threading

import gradio as gr

from imagen_jax.demo.models import (
    MAX_GUIDANCE,
    MAX_IMAGES,
    MAX_STEPS,
    Progress,
    Request,
    RequestError,
)

MAX_SR_STAGES = 2  # controls for up to two super-resolution stages
# Requests admitted at once: one samples on the device (the model's lock), the others wait
# there and join the next run of their setting (DemoModel.generate batches them).
ADMITTED = 4
_counter = itertools.count()


def size_label(h: int, w: int, trained: int) -> str:
    return f"{h}x{w}" + (" (trained)" if (h, w) == (trained, trained) else "")


def parse_size(label: str) -> tuple[int, int]:
    h, _, w = label.split(" ")[0].partition("x")
    return int(h), int(w)


def overrides_of(model, sampler, steps, guidance, sr: list[tuple]) -> tuple[str, ...]:
    """`sample.py --set` strings of the settings that differ from the model's defaults."""
    defaults = model.defaults()
    wanted = [dict(sampler=sampler, steps=int(steps), guidance_scale=float(guidance))]
    for steps_k, guidance_k, aug_k in sr[: model.num_stages - 1]:
        wanted.append(
            dict(steps=int(steps_k), guidance_scale=float(guidance_k), aug_level=float(aug_k))
        )
    out = []
    for k, (want, have) in enumerate(zip(wanted, defaults, strict=False)):
        for key, value in want.items():
            if value != have[key]:
                out.append(f"{k}.{key}={value}")
    return tuple(out)


class _Capture(logging.Handler):
    """Warnings logged while a request runs (a prompt cut to the encoder's token limit)."""

    def __init__(self):
        super().__init__(logging.WARNING)
        self.messages: list[str] = []

    def emit(self, record):
        self.messages.append(record.getMessage())


def run_request(model, request: Request, workdir: str):
    """Runs `model.generate` in a thread; yields ("wait", requests ahead), ("step", stage,
    step, steps), ("preview", stage, step, image), ("stage", stage, images), then ("done",
    summary, warnings) or ("error", message). Closing the generator cancels the request at
    its next stage boundary."""
    events: queue.Queue = queue.Queue()
    cancel = threading.Event()
    outdir = os.path.join(workdir, f"{next(_counter):05d}")
    progress = Progress(
        on_wait=lambda ahead: events.put(("wait", ahead)),
        on_step=lambda k, i, n: events.put(("step", k, i, n)),
        on_preview=lambda k, i, image: events.put(("preview", k, i, image)),
        on_stage=lambda k, images: events.put(("stage", k, images)),
        cancelled=cancel.is_set,
    )
    capture = _Capture()

    def work():
        root = logging.getLogger()
        root.addHandler(capture)
        try:
            events.put(("done", model.generate(request, outdir, progress), capture.messages))
        except RequestError as e:
            events.put(("error", str(e)))
        except Exception as e:  # noqa: BLE001 - answered on the page; the server goes on
            logging.exception("demo request failed")
            events.put(("error", f"{type(e).__name__}: {e}"))
        finally:
            root.removeHandler(capture)

    thread = threading.Thread(target=work, daemon=True)
    thread.start()
    try:
        while True:
            event = events.get()
            yield event
            if event[0] in ("done", "error"):
                return
    finally:
        cancel.set()


def report_progress(progress, event, stages: int) -> bool:
    """Shows a "wait" or "step" event of `run_request` on the page's progress bar (True),
    raises an "error" event's message as a gr.Error; False for the other events."""
    kind = event[0]
    if kind == "wait":
        progress(0.0, desc=f"waiting for the device: {event[1]} ahead")
    elif kind == "step":
        _, k, i, total = event
        progress((i, total), desc=f"stage {k + 1} of {stages}", unit="steps")
    elif kind == "error":
        raise gr.Error(event[1])
    else:
        return False
    return True


def build(models: dict, workdir: str):
    """The tab's components and events, inside an open gr.Blocks."""
    names = list(models)
    first = models[names[0]]
    d0 = first.defaults()
    trained = first.resolution

    with gr.Row():
        with gr.Column(scale=2):
            model_box = gr.Dropdown(names, value=names[0], label="Model")
            prompt = gr.Textbox(
                elem_id="prompt",
                label="Prompt",
                lines=2,
                placeholder="a red circle above a blue square",
            )
            negative = gr.Textbox(label="Negative prompt", lines=1)
            with gr.Row():
                seed = gr.Number(value=0, precision=0, label="Seed", minimum=0)
                random_seed = gr.Checkbox(value=True, label="Random seed")
                count = gr.Slider(1, MAX_IMAGES, value=4, step=1, label="Images")
            size = gr.Dropdown(
                [size_label(h, w, trained) for h, w in first.sizes()],
                value=size_label(trained, trained, trained),
                label="Size (height x width; any size the stages divide evenly)",
                allow_custom_value=True,
            )
            with gr.Accordion("Base stage", open=True):
                sampler = gr.Dropdown(first.samplers(), value=d0[0]["sampler"], label="Sampler")
                steps = gr.Slider(1, MAX_STEPS, value=d0[0]["steps"], step=1, label="Steps")
                guidance = gr.Slider(
                    0, MAX_GUIDANCE, value=d0[0]["guidance_scale"], step=0.5, label="Guidance"
                )
            sr_boxes, sr_controls = [], []
            for k in range(1, MAX_SR_STAGES + 1):
                d = d0[k] if k < len(d0) else d0[0]
                names0 = first.stage_names()
                with gr.Accordion(
                    names0[k] if k < len(d0) else f"Stage {k + 1}",
                    open=False,
                    visible=k < len(d0),
                ) as box:
                    controls = (
                        gr.Slider(1, MAX_STEPS, value=d["steps"], step=1, label="Steps"),
                        gr.Slider(
                            0, MAX_GUIDANCE, value=d["guidance_scale"], step=0.5, label="Guidance"
                        ),
                        gr.Slider(
                            0,
                            1,
                            value=d.get("aug_level", 0.0),
                            step=0.05,
                            label="Augmentation level",
                            visible=first.has_aug_level,
                        ),
                    )
                sr_boxes.append(box)
                sr_controls.append(controls)
            with gr.Row():
                go = gr.Button("Generate", variant="primary", elem_id="generate")
                stop = gr.Button("Cancel", elem_id="cancel")
        with gr.Column(scale=3):
            preview = gr.Image(label="Progress", format="png", buttons=[], interactive=False)
            gallery = gr.Gallery(
                elem_id="gallery",
                label="Images",
                columns=4,
                format="png",
                interactive=False,
            )
            files = gr.Files(
                label="PNG files (with their metadata)", interactive=False, elem_id="files"
            )
            info = gr.Markdown(elem_id="info")
    history_state = gr.State([])
    history = gr.Gallery(label="History (click to restore its settings)", columns=8, height=160)

    flat_sr = [c for controls in sr_controls for c in controls]
    inputs = [model_box, prompt, negative, seed, random_seed, count, size, sampler, steps, guidance]
    inputs += flat_sr

    def on_model(name):
        model = models[name]
        d = model.defaults()
        r = model.resolution
        updates = [
            gr.update(
                choices=[size_label(h, w, r) for h, w in model.sizes()],
                value=size_label(r, r, r),
            ),
            gr.update(choices=model.samplers(), value=d[0]["sampler"]),
            gr.update(value=d[0]["steps"]),
            gr.update(value=d[0]["guidance_scale"]),
        ]
        for k in range(1, MAX_SR_STAGES + 1):
            dk = d[k] if k < len(d) else d[0]
            updates += [
                gr.update(value=dk["steps"]),
                gr.update(value=dk["guidance_scale"]),
                gr.update(value=dk.get("aug_level", 0.0), visible=model.has_aug_level),
            ]
        names = model.stage_names()
        updates += [
            gr.update(visible=k < len(d), label=names[k] if k < len(d) else f"Stage {k + 1}")
            for k in range(1, MAX_SR_STAGES + 1)
        ]
        return updates

    model_box.change(
        on_model,
        model_box,
        [size, sampler, steps, guidance, *flat_sr, *sr_boxes],
        queue=False,
        api_visibility="undocumented",  # the page's own wiring, not part of the API
    )

    def generate(name, text, neg, seed_value, use_random, n, size_value, smp, st, gs, *rest):
        *sr_values, past = rest
        progress = gr.Progress()
        if name not in models:
            raise gr.Error(f"unknown model {name!r}")
        model = models[name]
        seed_used = secrets.randbelow(2**31) if use_random else int(seed_value or 0)
        try:
            h, w = parse_size(size_value)
        except ValueError:
            raise gr.Error(f"size {size_value!r}: expected HEIGHTxWIDTH") from None
        sr = [tuple(sr_values[3 * k : 3 * k + 3]) for k in range(MAX_SR_STAGES)]
        request = Request(
            prompt=text or "",
            negative_prompt=neg or "",
            seed=seed_used,
            num_images=int(n),
            height=h,
            width=w,
            overrides=overrides_of(model, smp, st, gs, sr),
        )
        stages = model.num_stages  # a bad request comes back as an "error" event
        for event in run_request(model, request, workdir):
            kind = event[0]
            if report_progress(progress, event, stages):
                continue
            if kind in ("preview", "stage"):
                image = event[3] if kind == "preview" else event[2][0]
                yield (
                    gr.update(value=image),
                    gr.skip(),
                    gr.skip(),
                    gr.skip(),
                    gr.skip(),
                    gr.skip(),
                    gr.skip(),
                )
            else:
                _, summary, warnings = event
                paths = summary["files"]
                notes = model.notes(request) + warnings
                text_info = [
                    f"**Seed** {seed_used} · **job** `{summary['job']}` · "
                    f"{summary['made']} made in {summary['seconds']:.1f} s",
                    f"Same images from the command line: `{request.command(model)}`",
                    *[f"> {note}" for note in notes],
                ]
                entry = dict(
                    model=name,
                    request=dataclasses.asdict(request),
                    files=paths,
                    controls=[
                        name,
                        text,
                        neg,
                        seed_used,
                        False,
                        n,
                        size_value,
                        smp,
                        st,
                        gs,
                        *sr_values,
                    ],
                )
                past = [*past, entry]
                yield (
                    gr.update(value=paths[-1]),
                    paths,
                    paths,
                    "\n\n".join(text_info),
                    seed_used,
                    past,
                    [(e["files"][0], e["request"]["prompt"]) for e in past],
                )

    event = go.click(
        generate,
        [*inputs, history_state],
        [preview, gallery, files, info, seed, history_state, history],
        concurrency_limit=ADMITTED,
        concurrency_id="device",
    )
    stop.click(None, None, None, cancels=[event], queue=False)

    def restore(past, evt: gr.SelectData):
        return past[evt.index]["controls"]

    history.select(restore, history_state, inputs, queue=False, api_visibility="undocumented")
    return dict(generate=event)
