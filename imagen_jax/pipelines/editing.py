"""Image-to-image and inpainting jobs: sample.py's --init_image, --mask, --strength and
--repaint_* flags, read and checked once, then applied to every batch of a cascade job.

    request = load_edit_request(init_image="scene.png", mask="mask.png", strength=1.0)
    for note in request.notes: print(note)    # and request.aspect_note(output size)
    job = EditingCascade(cascade, request)      # job(items, seed) as the cascade's own call
    job = LatentJob(pipeline, edit=request)     # SD / SDXL (`pipelines.latent`)
    settings = dict(settings, edit=request.settings())  # in the job's fingerprint and PNGs

The init image is any RGB (or grayscale, converted) image file; the mask a grayscale (or
RGB, converted) file of the same size, white (255) where the image is regenerated and black
(0) where it is kept, grey values between. Both are resized to every stage's size by the
cascade (`cascade.Edit`); the base stage starts from the image at `strength` (1: from
noise, 0: the image itself), and with a mask every stage keeps the black region (RePaint's
resampling with `repaint_jump` > 0). The job records the files' SHA-256 and the settings,
so a rerun with another image, mask or strength is another job (never the old images).

Per prompt: a JSONL prompt file's entries may carry their own "init_image", "mask" (paths
relative to the prompt file's folder, or absolute) and "strength" (`prompt_edits`), which
replace the flags' for that prompt; the files' SHA-256 join the entry's record, so they
are part of the job's fingerprint and of the prompt's PNG metadata. A batch whose prompts
edit differently runs as one compiled call per edit (`EditingCascade`), so an image is the
same whatever its batch holds.

Refused, in one line each: an image with an alpha channel (say with --mask what to
regenerate), a mask of another size than the image, strength outside [0, 1], --mask,
--strength < 1 or --repaint_* without --init_image, --repaint_* without --mask. Noted: a
mask that keeps everything (the output is the image) or regenerates everything (plain
img2img), an image whose aspect ratio is not the output's (it is stretched).
"""

from __future__ import annotations

import dataclasses
import os

import numpy as np
import PIL.Image

from imagen_jax import files as files_lib
from imagen_jax.pipelines.cascade import Edit
from imagen_jax.pipelines.jobs import PromptEntry

PROMPT_EDIT_KEYS = ("init_image", "mask", "strength")  # a JSONL entry's own edit


@dataclasses.dataclass(frozen=True)
class EditRequest:
    image: np.ndarray  # float32 [H, W, 3] in [-1, 1]
    mask: np.ndarray | None  # float32 [H, W] in [0, 1]: 1 = regenerate
    strength: float
    repaint_jump: int
    repaint_resample: int
    files: dict  # {"init_image": {"path", "sha256"}, "mask": {...} or None}
    notes: tuple[str, ...] = ()

    def settings(self) -> dict:
        """What the job's fingerprint and every image's metadata record (paths are not part
        of the fingerprint; the SHA-256 of the files is)."""
        return dict(
            self.files,
            strength=self.strength,
            repaint_jump=self.repaint_jump,
            repaint_resample=self.repaint_resample,
        )

    def aspect_note(self, size: tuple[int, int]) -> str | None:
        """A note when the image's aspect ratio is not the output's (H, W)."""
        (h, w), (ih, iw) = size, self.image.shape[:2]
        if abs(ih * w - iw * h) <= 0.01 * iw * h:
            return None
        return (
            f"note: --init_image is {iw}x{ih}, the output {w}x{h}: it is stretched to the "
            "output's aspect ratio"
        )

    def batch(self, n: int, known_region: str = "noised", sr_strength: float = 1.0) -> Edit:
        """The `cascade.Edit` of a batch of n images."""
        image = np.broadcast_to(self.image, (n, *self.image.shape))
        mask = None if self.mask is None else np.broadcast_to(self.mask, (n, *self.mask.shape))
        return Edit(
            image,
            mask,
            self.strength,
            self.repaint_jump,
            self.repaint_resample,
            known_region,
            sr_strength,
        )


def _open(path: str, what: str) -> PIL.Image.Image:
    try:
        with PIL.Image.open(path) as im:
            im.load()
            return im.copy()
    except (OSError, SyntaxError, PIL.Image.DecompressionBombError) as e:
        raise ValueError(f"{what} {path}: not a readable image ({e})") from None


def load_edit_request(
    *,
    init_image: str | None,
    mask: str | None = None,
    strength: float = 1.0,
    repaint_jump: int = 0,
    repaint_resample: int = 1,
) -> EditRequest | None:
    """The request of sample.py's editing flags (None: no editing), checked."""
    if init_image is None:
        if mask is not None:
            raise ValueError("--mask needs --init_image (the image whose region it marks)")
        if strength != 1.0:
            raise ValueError(f"--strength={strength} needs --init_image (the image to start from)")
        if repaint_jump:
            raise ValueError("--repaint_jump needs --init_image and --mask")
        return None
    if not 0.0 <= strength <= 1.0:
        raise ValueError(f"--strength={strength}: expected a value in [0, 1]")
    if (repaint_jump or repaint_resample != 1) and mask is None:
        raise ValueError("--repaint_jump / --repaint_resample need --mask (RePaint inpaints)")
    if repaint_jump < 0 or repaint_resample < 1:
        raise ValueError(
            f"--repaint_jump={repaint_jump}, --repaint_resample={repaint_resample}: expected "
            "a jump >= 0 (0: no resampling) and a resample count >= 1"
        )
    notes = []
    im = _open(init_image, "--init_image")
    if "A" in im.getbands() or (im.mode == "P" and "transparency" in im.info):
        raise ValueError(
            f"--init_image {init_image} has an alpha channel: give an RGB image (and the "
            "region to regenerate as --mask)"
        )
    if im.mode in ("L", "I", "I;16", "F", "1"):
        notes.append(f"note: --init_image {init_image} is grayscale ({im.mode}): taken as RGB")
    pixels = np.asarray(im.convert("RGB"), np.float32) / 127.5 - 1.0
    image_file = {"path": init_image, "sha256": files_lib.file_sha256(init_image)}
    files = {"init_image": image_file, "mask": None}
    regenerate = None
    if mask is not None:
        m = _open(mask, "--mask")
        if m.size != im.size:
            raise ValueError(
                f"--mask {mask} is {m.size[0]}x{m.size[1]}, --init_image {init_image} is "
                f"{im.size[0]}x{im.size[1]}: give a mask of the image's size"
            )
        regenerate = np.asarray(m.convert("L"), np.float32) / 255.0
        files["mask"] = {"path": mask, "sha256": files_lib.file_sha256(mask)}
        if not regenerate.any():
            notes.append(f"note: --mask {mask} is black: every pixel is kept (the image itself)")
        elif (regenerate == 1.0).all():
            notes.append(
                f"note: --mask {mask} is white: every pixel is regenerated (plain img2img at "
                f"--strength={strength})"
            )
    return EditRequest(
        pixels, regenerate, float(strength), int(repaint_jump), int(repaint_resample), files,
        tuple(notes),
    )  # fmt: skip


def prompt_edits(
    entries: list[PromptEntry],
    prompts_file: str | None,
    *,
    repaint_jump: int = 0,
    repaint_resample: int = 1,
) -> tuple[list[PromptEntry], dict[int, EditRequest]]:
    """(entries, {prompt index: its own request}) of prompts that carry "init_image" (with
    "mask", "strength"): each checked as the flags are (errors name the file and the
    prompt), with the files' SHA-256 written into the entry's record."""
    out, requests = list(entries), {}
    root = os.path.dirname(os.path.abspath(prompts_file)) if prompts_file else os.getcwd()
    for index, entry in enumerate(entries):
        own = {k: entry.extra[k] for k in PROMPT_EDIT_KEYS if k in entry.extra}
        if not own:
            continue
        where = f"{prompts_file}: prompt {index + 1} ({entry.prompt[:40]!r})"
        for key in ("init_image", "mask"):
            if key in own and not isinstance(own[key], str):
                raise ValueError(f"{where}: {key!r} must be a path, got {own[key]!r}")
        paths = {k: os.path.join(root, own[k]) for k in ("init_image", "mask") if own.get(k)}
        strength = own.get("strength", 1.0)
        if isinstance(strength, bool) or not isinstance(strength, (int, float)):
            raise ValueError(f"{where}: 'strength' must be a number, got {strength!r}")
        try:
            request = load_edit_request(
                init_image=paths.get("init_image"),
                mask=paths.get("mask"),
                strength=float(strength),
                repaint_jump=repaint_jump,
                repaint_resample=repaint_resample,
            )
        except ValueError as e:
            raise ValueError(f"{where}: {e}") from None
        if request is None:
            raise ValueError(f"{where}: 'mask' / 'strength' need 'init_image'")
        sha = {f"{k}_sha256": request.files[k]["sha256"] for k in paths}
        out[index] = dataclasses.replace(entry, extra=dict(entry.extra, **sha))
        requests[index] = request
    return out, requests


class EditingCascade:
    """A cascade whose batches are edited: `job(items, seed)` as `cascade(items, seed)`
    (what `jobs.run_job` calls). `request` edits every prompt (None: none) but those of
    `per_prompt` ({prompt index: request}, `prompt_edits`). A batch whose rows edit
    differently runs once per edit, each call padded to the batch's size (one compiled
    shape), the rows put back in order. known_region: how the masked sampling keeps the
    known region (`samplers.editable`; "clean" for DeepFloyd IF, as diffusers' IF
    inpainting pipelines); sr_strength: the later stages' strength (`cascade.Edit`; 0.8 for
    IF, as its super-resolution editing pipelines)."""

    def __init__(
        self,
        cascade,
        request: EditRequest | None,
        known_region: str = "noised",
        per_prompt: dict | None = None,
        sr_strength: float = 1.0,
    ):
        self.cascade, self.request, self.known_region = cascade, request, known_region
        self.sr_strength = sr_strength
        self.per_prompt = dict(per_prompt or {})

    def _request(self, item) -> EditRequest | None:
        return self.per_prompt.get(item.prompt_index, self.request)

    def _run(self, items, seed: int, request: EditRequest | None):
        edit = None
        if request is not None:
            edit = request.batch(len(items), self.known_region, self.sr_strength)
        return self.cascade(items, seed, edit=edit)

    def __call__(self, items, seed: int):
        requests = [self._request(it) for it in items]
        groups: dict = {}
        for row, request in enumerate(requests):
            groups.setdefault(id(request), (request, []))[1].append(row)
        if len(groups) == 1:
            return self._run(items, seed, requests[0])
        out = None
        for request, rows in groups.values():
            sub = [items[r] for r in rows]
            sub += [sub[-1]] * (len(items) - len(sub))  # the batch's compiled size
            stages = self._run(sub, seed, request)
            if out is None:
                out = [np.empty((len(items), *x.shape[1:]), x.dtype) for x in stages]
            for whole, part in zip(out, stages, strict=True):
                whole[rows] = part[: len(rows)]
        return out
