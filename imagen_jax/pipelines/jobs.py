"""Sampling jobs: prompts in, one PNG per image out, resumable and split over hosts.

A job is a list of prompts, each sampled `images_per_prompt` times. Image (p, i) is the i-th
image of prompt p; its noise derives from (seed, p, i, stage) only (`image_key`), so the
image does not depend on the batch it lands in, the device or host count, or restarts.

Files: `DIR/images/{p:06d}_{i:03d}.png`, written atomically (a temporary file, then
`os.replace`), each carrying its metadata as JSON in a PNG text chunk named "imagen_jax"
(prompt, negative prompt, seed, every stage's settings, checkpoint identity). A restarted
job skips the images whose PNG is complete and makes only the rest. `DIR/manifest.jsonl` is
rebuilt from the PNGs' metadata at the end (one line per image, sorted), so it is always
consistent with the images on disk: `{"file", "prompt", "prompt_index", "image_index",
"seed", ...}` plus any "spec" / "task" / "split" fields the prompt file carried.

Prompt files: plain text, one prompt per line (blank lines are skipped, but counted in the
line numbers that errors name); or JSON lines
(`.jsonl`) with "prompt" and optional "negative_prompt", "seed", "guidance_scale", and any
other fields (kept in the metadata, e.g. the shapes evaluation files' "spec" and "task").
"""

from __future__ import annotations

import dataclasses
import json
import os
import tempfile
import time
from collections.abc import Iterable, Sequence

import jax
import numpy as np
from absl import logging
from jax.sharding import Mesh
from PIL import Image, PngImagePlugin
from tqdm import tqdm

from imagen_jax import parallel
from imagen_jax.diffusion.config import sample_config

METADATA_KEY = "imagen_jax"
_KNOWN = ("prompt", "negative_prompt", "seed", "guidance_scale")


@dataclasses.dataclass(frozen=True)
class PromptEntry:
    prompt: str
    negative_prompt: str = ""
    seed: int | None = None  # None: the job's seed
    guidance_scale: float | None = None  # None: each stage's configured scale
    extra: dict = dataclasses.field(default_factory=dict)  # kept in the metadata


def _entry_from_json(obj, where: str) -> PromptEntry:
    if not isinstance(obj, dict) or not isinstance(obj.get("prompt"), str):
        raise ValueError(f"{where}: expected a JSON object with a string 'prompt', got {obj!r}")
    seed, scale = obj.get("seed"), obj.get("guidance_scale")
    if seed is not None and (not isinstance(seed, int) or isinstance(seed, bool) or seed < 0):
        raise ValueError(f"{where}: 'seed' must be a non-negative integer, got {seed!r}")
    if scale is not None and not isinstance(scale, (int, float)):
        raise ValueError(f"{where}: 'guidance_scale' must be a number, got {scale!r}")
    negative = obj.get("negative_prompt") or ""
    if not isinstance(negative, str):
        raise ValueError(f"{where}: 'negative_prompt' must be a string, got {negative!r}")
    extra = {k: v for k, v in obj.items() if k not in _KNOWN}
    return PromptEntry(
        obj["prompt"], negative, seed, None if scale is None else float(scale), extra
    )


def read_prompts(path: str) -> list[PromptEntry]:
    """Prompts of a .txt (one per line) or .jsonl file (UTF-8). Blank lines are skipped (and
    their number logged) but counted, so that errors name the file and the line as an
    editor numbers it."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f"prompt file {path!r} does not exist")
    entries, blank = [], 0
    with open(path, "rb") as f:
        for n, raw in enumerate(f, 1):
            try:
                line = raw.decode("utf-8-sig" if n == 1 else "utf-8")
            except UnicodeDecodeError as e:
                raise ValueError(f"{path}:{n}: not valid UTF-8 ({e.reason})") from None
            if not line.strip():
                blank += 1
                continue
            if path.endswith(".jsonl"):
                try:
                    obj = json.loads(line)
                except json.JSONDecodeError as e:
                    raise ValueError(f"{path}:{n}: not valid JSON ({e.msg})") from None
                entries.append(_entry_from_json(obj, f"{path}:{n}"))
            else:
                entries.append(PromptEntry(line.rstrip("\n").strip()))
    if not entries:
        raise ValueError(f"prompt file {path!r} holds no prompts")
    if blank:
        logging.info("%s: %d prompts, %d blank lines skipped", path, len(entries), blank)
    return entries


@dataclasses.dataclass(frozen=True)
class WorkItem:
    prompt_index: int
    image_index: int
    entry: PromptEntry

    @property
    def file(self) -> str:
        return os.path.join("images", f"{self.prompt_index:06d}_{self.image_index:03d}.png")


def plan(
    entries: Sequence[PromptEntry],
    images_per_prompt: int,
    *,
    process_index: int = 0,
    process_count: int = 1,
) -> list[WorkItem]:
    """This process's share of the job: a contiguous range of prompts."""
    if images_per_prompt < 1:
        raise ValueError(f"images_per_prompt must be >= 1, got {images_per_prompt}")
    bounds = np.linspace(0, len(entries), process_count + 1).round().astype(int)
    lo, hi = bounds[process_index], bounds[process_index + 1]
    return [WorkItem(p, i, entries[p]) for p in range(lo, hi) for i in range(images_per_prompt)]


def read_metadata(path: str) -> dict | None:
    """The metadata of a complete PNG written by `write_png`, else None."""
    try:
        with Image.open(path) as im:
            im.load()  # a truncated file fails here
            text = im.text.get(METADATA_KEY)
    except (OSError, SyntaxError, ValueError):
        return None
    return None if text is None else json.loads(text)


def pending(items: Iterable[WorkItem], outdir: str) -> list[WorkItem]:
    """The items whose image is not complete on disk yet."""
    return [it for it in items if read_metadata(os.path.join(outdir, it.file)) is None]


def batches(items: Sequence[WorkItem], batch_size: int) -> list[tuple[list[WorkItem], int]]:
    """Fixed-size batches (the last padded by repeating its last item, so the compiled
    program's shape never changes); each with its count of real items."""
    out = []
    for start in range(0, len(items), batch_size):
        chunk = list(items[start : start + batch_size])
        real = len(chunk)
        chunk += [chunk[-1]] * (batch_size - real)
        out.append((chunk, real))
    return out


def image_key(seed: int, item: WorkItem, stage: int):
    """The key of image (prompt p, image i) at a cascade stage; a prompt's own seed, if
    given, replaces the job's."""
    seed = seed if item.entry.seed is None else item.entry.seed
    key = jax.random.fold_in(jax.random.key(seed), item.prompt_index)
    return jax.random.fold_in(jax.random.fold_in(key, item.image_index), stage)


def check_outdir(outdir: str) -> None:
    """Fails fast (before any model is loaded) unless `outdir` can hold the job's files: it
    must be a directory, or creatable as one, where this process can write (checked by
    writing a file, which also catches read-only file systems and the root user's
    permissions)."""
    if os.path.exists(outdir) and not os.path.isdir(outdir):
        raise NotADirectoryError(f"output directory {outdir!r} exists and is not a directory")
    folder = os.path.join(outdir, "images")
    try:
        os.makedirs(folder, exist_ok=True)
        for where in (outdir, folder):  # the manifest, the images
            fd, probe = tempfile.mkstemp(dir=where, suffix=".tmp")
            os.close(fd)
            os.remove(probe)
    except OSError as e:
        raise type(e)(f"output directory {outdir!r} is not writable: {e}") from None


def write_png(path: str, image: np.ndarray, metadata: dict) -> None:
    """Writes uint8 [H, W, 3] as a PNG with `metadata` in its text chunk, atomically."""
    os.makedirs(os.path.dirname(path), exist_ok=True)
    info = PngImagePlugin.PngInfo()
    info.add_text(METADATA_KEY, json.dumps(metadata, sort_keys=True))
    fd, tmp = tempfile.mkstemp(dir=os.path.dirname(path), suffix=".png.tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            Image.fromarray(np.asarray(image, np.uint8)).save(f, format="PNG", pnginfo=info)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise


def image_metadata(item: WorkItem, *, seed: int, settings: dict) -> dict:
    entry = item.entry
    return dict(
        entry.extra,
        file=item.file,
        prompt=entry.prompt,
        negative_prompt=entry.negative_prompt,
        prompt_index=item.prompt_index,
        image_index=item.image_index,
        seed=seed if entry.seed is None else entry.seed,
        **settings,
    )


def write_manifest(outdir: str) -> str:
    """Rebuilds `manifest.jsonl` from the metadata of every complete PNG under outdir."""
    folder = os.path.join(outdir, "images")
    records = []
    for name in sorted(os.listdir(folder)) if os.path.isdir(folder) else []:
        if name.endswith(".png"):
            meta = read_metadata(os.path.join(folder, name))
            if meta is not None:
                records.append(meta)
    path = os.path.join(outdir, "manifest.jsonl")
    fd, tmp = tempfile.mkstemp(dir=outdir, suffix=".jsonl.tmp")
    with os.fdopen(fd, "w") as f:
        for rec in records:
            f.write(json.dumps(rec, sort_keys=True) + "\n")
    os.replace(tmp, path)
    return path


def save_grid(images: Sequence[np.ndarray], path: str, *, columns: int = 8, gap: int = 0) -> None:
    """A contact sheet of equally sized uint8 images, row by row, `gap` white pixels apart."""
    if not images:
        return
    h, w, _ = images[0].shape
    rows = -(-len(images) // columns)
    cols = min(columns, len(images))
    sheet = np.full((rows * (h + gap) - gap, cols * (w + gap) - gap, 3), 255, np.uint8)
    for k, image in enumerate(images):
        if image.shape != images[0].shape:
            raise ValueError(f"image {k} is {image.shape}, the first {images[0].shape}")
        top, left = (i * (n + gap) for i, n in zip(divmod(k, columns), (h, w), strict=True))
        sheet[top : top + h, left : left + w] = image
    Image.fromarray(sheet).save(path)


def run_job(
    cascade,
    entries: Sequence[PromptEntry],
    outdir: str,
    *,
    images_per_prompt: int = 1,
    seed: int = 0,
    batch_size: int = 4,
    settings: dict | None = None,
    grid: bool = False,
    progress: bool = True,
) -> dict:
    """Samples every pending image of this process's share and writes it; then, once every
    process is done (a barrier), process 0 alone rebuilds the manifest from the PNGs (so
    `outdir` must be one file system shared by all processes) and writes the grid of its
    own images. Returns this process's summary: prompts in the job, images in its share,
    made, skipped (already on disk), seconds, images/s."""
    items = plan(
        entries,
        images_per_prompt,
        process_index=jax.process_index(),
        process_count=jax.process_count(),
    )
    todo = pending(items, outdir)
    groups: dict = {}
    for it in todo:  # one guidance scale per compiled call: batch by it
        groups.setdefault(it.entry.guidance_scale, []).append(it)
    start, made = time.perf_counter(), []
    bar = tqdm(total=len(todo), disable=not progress, unit="img", desc="sampling")
    for group in groups.values():
        for chunk, real in batches(group, batch_size):
            final = cascade(chunk, seed)[-1]
            for it, image in list(zip(chunk, final, strict=True))[:real]:
                meta = image_metadata(it, seed=seed, settings=settings or {})
                write_png(os.path.join(outdir, it.file), image, meta)
                made.append(image)
            bar.update(real)
    bar.close()
    seconds = time.perf_counter() - start
    parallel.barrier("imagen_jax sampling job done")  # every share is on disk
    if jax.process_index() == 0:
        write_manifest(outdir)
        if grid and made:
            save_grid(made, os.path.join(outdir, "grid.png"))
    return dict(
        prompts=len(entries),
        images=len(items),
        made=len(made),
        skipped=len(items) - len(todo),
        seconds=seconds,
        images_per_s=len(made) / seconds if seconds else 0.0,
    )


def parse_overrides(overrides, num_stages: int, extra_keys: dict | None = None) -> list[dict]:
    """["0.steps=25", "1.sampler=ddim"] -> one dict of sample overrides per stage, values
    typed by the sample group's defaults, or by `extra_keys` (key: default) for keys beyond
    it (unknown keys raise)."""
    defaults = {**sample_config().to_dict(), **(extra_keys or {})}
    out = [{} for _ in range(num_stages)]
    for item in overrides:
        target, _, value = item.partition("=")
        index, _, key = target.partition(".")
        if not index.isdigit() or int(index) >= num_stages or not _:
            raise ValueError(f"--set={item!r}: expected STAGE.KEY=VALUE with STAGE < {num_stages}")
        if key not in defaults:
            raise ValueError(
                f"--set={item!r}: unknown sample key {key!r}; allowed: {sorted(defaults.keys())}"
            )
        kind = type(defaults[key])
        out[int(index)][key] = (
            (value.lower() in ("1", "true", "yes")) if kind is bool else kind(value)
        )
    return out


def local_mesh(batch_size: int):
    """A mesh over this process's devices that splits the batch, when it divides evenly
    (each process samples its own prompts; None: one device)."""
    devices = jax.local_devices()
    if len(devices) == 1 or batch_size % len(devices):
        return None
    return Mesh(np.array(devices), ("data",))


def stage_settings(loaded, cascade) -> dict:
    """What every image's metadata records about the stages of a cascade."""
    return {
        "stages": [
            dict(s.settings(), height=h, width=w)
            for s, (h, w) in zip(loaded, cascade.sizes, strict=True)
        ]
    }
