"""What the demo serves: models loaded once, generating through `sample.py`'s own job.

A `DemoModel` is a cascade: of stage directories (the shipped model, an exported one), or
DeepFloyd IF's stages I and II in diffusers layout (as `sample.py --pipeline` loads them). A
request names its sample settings as `sample.py`'s `--set=STAGE.KEY=VALUE` strings, so the
page, the command line and the metadata speak one language; each request runs
`jobs.run_job` into a folder of its own, so its PNGs (pixels and text-chunk metadata) are
byte for byte those that `sample.py` writes for the same prompt, seed and settings.

One device lock per process: a request never runs beside another's compiled program, and a
cancelled request frees the lock at its next stage or batch boundary. The cascade of each
(settings, size) is built once and kept, so its compiled programs are reused.
"""

from __future__ import annotations

import collections
import dataclasses
import os
import threading
from collections.abc import Callable, Sequence

import numpy as np

from imagen_jax.diffusion import config as diffusion_config
from imagen_jax.diffusion.samplers import SAMPLERS
from imagen_jax.images import to_uint8
from imagen_jax.pipelines import cascade as cascade_lib
from imagen_jax.pipelines import deepfloyd, editing, jobs, public, sampling

MAX_IMAGES = 8  # per request
MAX_PROMPT_CHARS = 1000
MAX_STEPS = 250
MAX_GUIDANCE = 30.0
PREVIEWS = 4  # predicted-image previews per stage while it samples


class RequestError(ValueError):
    """A request the model cannot run; the message is shown on the page as it is."""


class Cancelled(Exception):
    """A request stopped by its user."""


@dataclasses.dataclass(frozen=True)
class EditFiles:
    """An edit of a request, as `sample.py`'s flags: the image file to start from (and the
    mask file: white = regenerate), the strength and RePaint's jump and resample count."""

    init_image: str
    mask: str | None = None
    strength: float = 1.0
    repaint_jump: int = 0
    repaint_resample: int = 1

    def load(self) -> editing.EditRequest:
        """The checked request (`editing.load_edit_request`); ValueError names a bad file
        or value."""
        return editing.load_edit_request(**dataclasses.asdict(self))

    def flags(self) -> list[str]:
        out = [f"--init_image={_quote(self.init_image)}"]
        if self.mask:
            out.append(f"--mask={_quote(self.mask)}")
        if self.strength != 1.0:
            out.append(f"--strength={self.strength}")
        if self.repaint_jump:
            out.append(f"--repaint_jump={self.repaint_jump}")
            out.append(f"--repaint_resample={self.repaint_resample}")
        return out


@dataclasses.dataclass(frozen=True)
class Request:
    """One generation: a prompt, `num_images` images from `seed`, at height x width (None:
    the model's trained size), with `sample.py`'s `--set` overrides; `edit`: image-to-image
    or inpainting of every image (`EditFiles`)."""

    prompt: str
    negative_prompt: str = ""
    seed: int = 0
    num_images: int = 1
    height: int | None = None
    width: int | None = None
    overrides: tuple[str, ...] = ()
    edit: EditFiles | None = None

    def command(self, model: DemoModel) -> str:
        """The `sample.py` command line that writes the same PNGs."""
        parts = ["python sample.py", *model.command_args()]
        parts.append(f"--prompt={_quote(self.prompt)}")
        if self.negative_prompt:
            parts.append(f"--negative_prompt={_quote(self.negative_prompt)}")
        parts += [f"--seed={self.seed}", f"--images_per_prompt={self.num_images}"]
        parts.append(f"--batch_size={model.batch_size}")
        parts += [f"--{k}={v}" for k, v in (("height", self.height), ("width", self.width)) if v]
        parts += [f"--set={o}" for o in self.overrides]
        if self.edit is not None:
            parts += self.edit.flags()
        return " ".join(parts)


def _edit_key(edit: editing.EditRequest | None) -> tuple | None:
    """What makes two edits one setting: the same settings and file contents (by SHA-256:
    their images run through the same program in one batch)."""
    if edit is None:
        return None
    settings = edit.settings()
    files = tuple(
        None if settings[k] is None else settings[k]["sha256"] for k in ("init_image", "mask")
    )
    return (files, edit.strength, edit.repaint_jump, edit.repaint_resample)


def _quote(text: str) -> str:
    return "'" + text.replace("'", "'\\''") + "'"


@dataclasses.dataclass
class Progress:
    """What a running request reports: `on_wait(ahead)` when it waits for the device
    behind `ahead` other requests, `on_step(stage, step, steps)` from inside each
    stage's compiled loop, `on_preview(stage, step, image uint8)` with the first image's
    predicted clean image (x0) every few steps, `on_stage(stage, images uint8)` as each
    stage finishes, and `cancelled()`, polled at each stage boundary."""

    on_wait: Callable[[int], None] = lambda ahead: None
    on_step: Callable[[int, int, int], None] = lambda stage, step, steps: None
    on_preview: Callable[[int, int, object], None] = lambda stage, step, image: None
    on_stage: Callable[[int, object], None] = lambda stage, images: None
    cancelled: Callable[[], bool] = lambda: False


@dataclasses.dataclass(eq=False)
class _Ticket:
    """One request waiting for, or in, a combined run of its setting."""

    request: Request
    progress: Progress
    images: dict = dataclasses.field(default_factory=dict)  # image index -> final uint8
    settings: dict | None = None  # what its images' metadata records
    edit: editing.EditRequest | None = None  # the request's edit, loaded and checked
    error: BaseException | None = None
    done: bool = False

    def items(self) -> list[jobs.WorkItem]:
        """The request's images as work items that carry its seed: `jobs.image_key` gives
        them the keys they have in the request's own job, whatever batch they share."""
        entry = jobs.PromptEntry(
            self.request.prompt, self.request.negative_prompt, seed=self.request.seed
        )
        return [jobs.WorkItem(0, i, entry) for i in range(self.request.num_images)]


class _Precomputed:
    """A job for `jobs.run_job` whose images were sampled already (by a combined run)."""

    def __init__(self, images: dict):
        self.images = images

    def __call__(self, items, seed):
        del seed
        return [np.stack([self.images[it.image_index] for it in items])]


def check_request_text(request: Request) -> None:
    """The checks every model makes: a prompt of 1 to MAX_PROMPT_CHARS characters, 1 to
    MAX_IMAGES images, a seed in [0, 2**31)."""
    if not request.prompt.strip():
        raise RequestError("enter a prompt")
    if len(request.prompt) > MAX_PROMPT_CHARS:
        raise RequestError(
            f"the prompt is {len(request.prompt)} characters; at most {MAX_PROMPT_CHARS}"
        )
    if not 1 <= request.num_images <= MAX_IMAGES:
        raise RequestError(f"images: {request.num_images}, expected 1 to {MAX_IMAGES}")
    if not 0 <= request.seed < 2**31:
        raise RequestError(f"seed: {request.seed}, expected 0 to {2**31 - 1}")


def sampler_choices(stage) -> list[str]:
    """The samplers a stage's schedule can run."""
    out = []
    for name in SAMPLERS:
        try:
            sample = diffusion_config.sample_config(**dict(stage.sample.to_dict(), sampler=name))
            diffusion_config.make_sampling(stage.diffusion, sample)
        except ValueError:
            continue
        out.append(name)
    return out


class DemoModel:
    """A cascade of stage directories (base first) loaded once, generating requests."""

    edits = True  # takes `Request.edit` (the editing tab)

    def __init__(
        self,
        name: str,
        stage_dirs: Sequence[str],
        *,
        batch_size: int = 4,
        shipped: bool = False,
        deepfloyd_if: bool = False,
        lock: threading.Lock | None = None,
        cache_size: int = 8,
    ):
        self.name, self.stage_dirs, self.shipped = name, list(stage_dirs), shipped
        self.batch_size = batch_size
        # As sample.py loads them (the stages, their text encoder, the chain checked).
        self.deepfloyd_if = deepfloyd_if
        if deepfloyd_if:  # stage I (and II), as sample.py --pipeline [--pipeline_sr] loads it
            # A LoRA export stands for its base pipeline with its adapters.
            (dirs, loras) = zip(*map(public.resolve_lora_export, self.stage_dirs), strict=True)
            self.loaded = deepfloyd.load_if_stages(
                *dirs, lora=loras[0], lora_sr=loras[1] if len(loras) > 1 else None
            )
            self.encoder, self.conditioning = self.loaded[0].encoder, deepfloyd.if_conditioning
        else:
            cascade, self.loaded = sampling.load_cascade(self.stage_dirs)
            self.encoder, self.conditioning = cascade.encoder, None
        self.lock = lock or threading.Lock()
        self._cascades: collections.OrderedDict = collections.OrderedDict()
        self._cache_size = cache_size
        self._steps: list[int] = []
        self._rows: list[_Ticket] = []  # the running batch's request per row
        self._waiting: dict = {}  # setting -> requests waiting for the device
        self._waiting_lock = threading.Lock()
        self._in_line = 0  # requests holding or waiting for the device lock
        self.compilations = 0  # cascades built (each compiles its stages on first use)
        self.batched_requests = 0  # requests sampled in another request's run

    # What the page offers ---------------------------------------------------------------

    @property
    def num_stages(self) -> int:
        return len(self.loaded)

    @property
    def resolution(self) -> int:
        """The last stage's trained resolution."""
        return self.loaded[-1].resolution

    @property
    def has_aug_level(self) -> bool:
        """Whether super-resolution stages take an augmentation level (IF's stage II has
        its noise level, sample.py's default here)."""
        return not self.deepfloyd_if

    def stage_names(self) -> list[str]:
        if self.deepfloyd_if:
            return ["Stage I", "Stage II"][: self.num_stages]
        return ["Base stage"] + [f"Super-resolution stage {k}" for k in range(1, self.num_stages)]

    def command_args(self) -> list[str]:
        """`sample.py`'s flags that name this model (none for the shipped one)."""
        if self.deepfloyd_if:
            flags = ("--pipeline", "--pipeline_sr")
            return [f"{flag}={d}" for flag, d in zip(flags, self.stage_dirs, strict=False)]
        return [] if self.shipped else [f"--stage={d}" for d in self.stage_dirs]

    def defaults(self) -> list[dict]:
        """Each stage's stored sample settings (and augmentation level)."""
        return [
            dict(
                s.sample.to_dict(), aug_level=getattr(s, "aug_level", 0.0), resolution=s.resolution
            )
            for s in self.loaded
        ]

    def samplers(self) -> list[str]:
        return sampler_choices(self.loaded[0])

    def sizes(self) -> list[tuple[int, int]]:
        """Final sizes the page offers: the trained square first, then halves, doubles and
        2:1 / 1:2 shapes that every stage can sample."""
        r = self.loaded[-1].resolution
        candidates = [(r, r), (r // 2, r), (r, r // 2), (r, 2 * r), (2 * r, r), (2 * r, 2 * r)]
        out = []
        for h, w in candidates:
            try:
                cascade_lib.stage_sizes(self.loaded, h, w)
            except ValueError:
                continue
            out.append((h, w))
        return out

    # Requests ---------------------------------------------------------------------------

    def check(self, request: Request) -> None:
        """Raises RequestError naming what is wrong with a request, before it queues for the
        device."""
        check_request_text(request)
        if request.edit is not None:
            try:
                request.edit.load()
            except ValueError as e:
                raise RequestError(str(e)) from None
        try:
            variants = self._variants(request.overrides)
            cascade_lib.stage_sizes(variants, request.height, request.width)
        except (ValueError, KeyError) as e:
            raise RequestError(str(e).strip("'\"")) from None
        for k, stage in enumerate(variants):
            sample = stage.sample
            if sample.steps > MAX_STEPS:
                raise RequestError(f"stage {k}: {sample.steps} steps; at most {MAX_STEPS}")
            if sample.guidance_scale > MAX_GUIDANCE:
                raise RequestError(
                    f"stage {k}: guidance {sample.guidance_scale}; at most {MAX_GUIDANCE}"
                )
            try:
                diffusion_config.make_sampling(stage.diffusion, sample)
            except ValueError as e:
                raise RequestError(f"stage {k}: {e}") from None

    def _variants(self, overrides: Sequence[str]) -> list:
        if self.deepfloyd_if:  # (its noise level is sample.py's default)
            per_stage = jobs.parse_overrides(overrides, self.num_stages)
            return [s.with_settings(o) for s, o in zip(self.loaded, per_stage, strict=True)]
        per_stage = jobs.parse_overrides(overrides, self.num_stages, sampling.STAGE_KEYS)
        return [
            s.with_settings(o, o.pop("aug_level", None))
            for s, o in zip(self.loaded, per_stage, strict=True)
        ]

    def _setting(self, request: Request, edit: editing.EditRequest | None = None) -> tuple:
        """What one run serves: the overrides and the sizes the stages sample (so the
        trained size asked for by number, as the page does, or left unset, as the warm-up
        does, is one setting), and the request's loaded `edit` (`_edit_key`); the first two
        are what one compiled cascade serves."""
        variants = self._variants(request.overrides)
        sizes = cascade_lib.stage_sizes(variants, request.height, request.width)
        return (tuple(request.overrides), tuple(sizes), _edit_key(edit))

    @property
    def known_region(self) -> str:
        """How masked sampling keeps the known region: clean for DeepFloyd IF (as diffusers'
        IF inpainting pipelines and `sample.py --pipeline` do), re-noised otherwise."""
        return "clean" if self.deepfloyd_if else "noised"

    @property
    def sr_strength(self) -> float:
        """The later stages' strength when editing: IF's super-resolution editing pipelines'
        0.8 (as `sample.py --pipeline`), else 1 (from noise)."""
        return deepfloyd.SR_EDIT_STRENGTH if self.deepfloyd_if else 1.0

    def _cascade(self, request: Request):
        key = self._setting(request)[:2]
        if key in self._cascades:
            self._cascades.move_to_end(key)
            return self._cascades[key]
        variants = self._variants(request.overrides)
        cascade = cascade_lib.Cascade(
            variants,
            self.encoder,
            conditioning=self.conditioning,
            mesh=jobs.local_mesh(self.batch_size),
            size=key[1][-1],
            on_step=self._on_step,
            on_preview=self._on_preview,
            preview_every=[max(1, s.sample.steps // PREVIEWS) for s in variants],
        )
        self.compilations += 1
        # What the images' metadata records (read once: it hashes the weights).
        self._cascades[key] = (cascade, variants, jobs.stage_settings(variants, cascade))
        if len(self._cascades) > self._cache_size:
            self._cascades.popitem(last=False)
        return self._cascades[key]

    def _owners(self) -> list[_Ticket]:
        """The requests of the running batch, each once, in row order."""
        return list(dict.fromkeys(self._rows))

    def _on_step(self, stage: int, step) -> None:
        steps = self._steps[stage] if stage < len(self._steps) else 0
        for ticket in self._owners():
            ticket.progress.on_step(stage, int(step) + 1, steps)

    def _first_rows(self, images) -> list[tuple[_Ticket, np.ndarray]]:
        """Each request of the running batch with its first image's row of `images`."""
        return [(t, images[self._rows.index(t)]) for t in self._owners()]

    def _on_preview(self, stage: int, step, x0) -> None:
        for ticket, row in self._first_rows(np.asarray(x0)):
            ticket.progress.on_preview(stage, int(step) + 1, to_uint8(row))

    def _on_stage(self, stage: int, images) -> None:
        for ticket, row in self._first_rows(images):
            ticket.progress.on_stage(stage, to_uint8(row[None]))
        if all(t.progress.cancelled() for t in self._owners()):
            raise Cancelled()

    def _sample_together(self, tickets: list[_Ticket]) -> None:
        """Samples the images of requests of one setting in shared batches of
        `batch_size` (the compiled shape), each image with its own request's keys; fills
        each ticket's images, or its error."""
        cascade, _, settings = self._cascade(tickets[0].request)
        edit = tickets[0].edit  # one setting: the same files and settings (`_edit_key`)
        for t in tickets:
            if edit is None:
                t.settings = settings
            else:
                record = t.edit.settings()
                if self.deepfloyd_if:  # as sample.py --pipeline records it
                    record.update(known_region=self.known_region, sr_strength=self.sr_strength)
                t.settings = dict(settings, edit=record)
        self._steps = [s.sampling.grid.num_steps for s in cascade.stages]
        rows = [(t, it) for t in tickets for it in t.items()]
        self.batched_requests += len(tickets) - 1
        for chunk, real in jobs.batches(rows, self.batch_size):
            owners = [t for t, _ in chunk]
            live = [t for t in dict.fromkeys(owners[:real]) if t.error is None]
            for t in live:
                if t.progress.cancelled():
                    t.error = Cancelled()
            if not any(t.error is None for t in live):
                continue
            self._rows = owners
            try:
                batch = None
                if edit is not None:
                    batch = edit.batch(len(chunk), self.known_region, self.sr_strength)
                items = [it for _, it in chunk]
                final = cascade.sample(items, 0, on_stage=self._on_stage, edit=batch)[-1]
            except Cancelled:
                for t in live:
                    t.error = t.error or Cancelled()
                continue
            except Exception as e:  # noqa: BLE001 - each request of the batch is told
                for t in live:
                    t.error = t.error or e
                continue
            finally:
                self._rows = []
            for (t, it), image in list(zip(chunk, to_uint8(final), strict=True))[:real]:
                t.images[it.image_index] = image

    def notes(self, request: Request) -> list[str]:
        """What the page says about a prompt beside its images (a domain's reading of it)."""
        note = sampling.domain_note(self.loaded, [request.prompt])
        return [note] if note else []

    def _run_waiting(self, ticket: _Ticket, setting: tuple) -> None:
        """Takes the device lock; unless another request's run served this one meanwhile,
        samples every request of `setting` waiting by then."""
        with self.lock:
            if ticket.done:
                return
            with self._waiting_lock:
                tickets = self._waiting.pop(setting, [])
            try:
                self._sample_together(tickets)
            except Exception as e:  # noqa: BLE001 - told to every request of the run
                for t in tickets:
                    t.error = t.error or e
            finally:
                for t in tickets:
                    t.done = True

    def generate(self, request: Request, outdir: str, progress: Progress | None = None) -> dict:
        """Runs a request as `sample.py` would and writes its job into `outdir` (PNGs,
        manifest, job.json: `jobs.run_job`); returns the job's summary with the PNG paths
        ("files") in order.

        Requests of one setting that wait for the device together are sampled together:
        whoever takes the device lock first samples every waiting request of its setting
        in shared batches (each image from its own request's keys, so the same as alone);
        the others find their images ready."""
        self.check(request)
        ticket = _Ticket(request, progress or Progress())
        ticket.edit = None if request.edit is None else request.edit.load()
        setting = self._setting(request, ticket.edit)
        with self._waiting_lock:
            self._waiting.setdefault(setting, []).append(ticket)
            ahead = self._in_line
            self._in_line += 1
        try:
            if ahead:
                ticket.progress.on_wait(ahead)
            self._run_waiting(ticket, setting)
        finally:
            with self._waiting_lock:
                self._in_line -= 1
        if ticket.error is not None:
            raise ticket.error
        entries = [jobs.PromptEntry(request.prompt, request.negative_prompt)]
        summary = jobs.run_job(
            _Precomputed(ticket.images),
            entries,
            outdir,
            images_per_prompt=request.num_images,
            seed=request.seed,
            batch_size=self.batch_size,
            settings=ticket.settings,
            progress=False,
        )
        items = jobs.plan(entries, request.num_images)
        return dict(summary, files=[os.path.join(outdir, it.file) for it in items])
