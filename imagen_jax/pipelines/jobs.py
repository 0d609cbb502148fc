"""Sampling jobs: prompts in, one PNG per image out, resumable and split over hosts.

A job is a list of prompts, each sampled `images_per_prompt` times. Image (p, i) is the i-th
image of prompt p; its noise derives from (seed, p, i, stage) only (`image_key`), so the
image does not depend on the batch it lands in, the device or host count, or restarts.

Files: `DIR/images/{p:06d}_{i:03d}.png`, written atomically (a temporary file, then
`os.replace`), each carrying its metadata as JSON in a PNG text chunk named "imagen_jax"
(prompt, negative prompt, seed, every stage's settings as sampled, including a prompt's own
guidance scale, the weights' SHA-256, and the job's fingerprint). `DIR/job.json` records
what determines the job's images (prompts, seeds, images per prompt, every stage setting,
the weights' hashes; not the batch size or the paths the weights were read from) and its
fingerprint, a hash of that record. A rerun with the same fingerprint resumes: it skips the
images whose PNG is complete and makes only the rest. A rerun with another fingerprint
refuses, naming what differs, unless `overwrite` is set (then the old job's files go).
`DIR/manifest.jsonl` (one line per image, sorted: `{"file", "prompt", "prompt_index",
"image_index", "seed", ...}` plus any "spec" / "task" / "split" fields the prompt file
carried) is rebuilt from the PNGs' metadata when a job starts and ends, and grows by each
batch in between, so a killed job leaves one that lists what is on disk; `grid.png` is
rebuilt from the PNGs on disk at the end.

Prompt files: plain text, one prompt per line (blank lines are skipped, but counted in the
line numbers that errors name); or JSON lines
(`.jsonl`) with "prompt" and optional "negative_prompt", "seed", "guidance_scale", and any
other fields (kept in the metadata, e.g. the shapes evaluation files' "spec" and "task").
"""

from __future__ import annotations

import dataclasses
import glob
import hashlib
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

from imagen_jax import files, parallel
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

    def record(self) -> dict:
        """The entry as the job's record keeps it (None fields left out)."""
        out = dict(self.extra, prompt=self.prompt, negative_prompt=self.negative_prompt)
        out.update(
            {
                k: v
                for k, v in (("seed", self.seed), ("guidance_scale", self.guidance_scale))
                if v is not None
            }
        )
        return out


def _entry_from_json(obj, where: str) -> PromptEntry:
    if not isinstance(obj, dict) or not isinstance(obj.get("prompt"), str):
        raise ValueError(f"{where}: expected a JSON object with a string 'prompt', got {obj!r}")
    seed, scale = obj.get("seed"), obj.get("guidance_scale")
    if seed is not None and (not isinstance(seed, int) or isinstance(seed, bool) or seed < 0):
        raise ValueError(f"{where}: 'seed' must be a non-negative integer, got {seed!r}")
    if scale is not None and (
        not isinstance(scale, (int, float)) or isinstance(scale, bool) or not scale >= 0
    ):
        raise ValueError(f"{where}: 'guidance_scale' must be a number >= 0, got {scale!r}")
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
    lo, hi = share(len(entries), process_index, process_count)
    return [WorkItem(p, i, entries[p]) for p in range(lo, hi) for i in range(images_per_prompt)]


def share(n: int, process_index: int, process_count: int) -> tuple[int, int]:
    """The contiguous range [lo, hi) of n work units that process `process_index` of
    `process_count` takes (as even as rounding allows)."""
    bounds = np.linspace(0, n, process_count + 1).round().astype(int)
    return int(bounds[process_index]), int(bounds[process_index + 1])


def read_metadata(path: str) -> dict | None:
    """The metadata of a complete PNG written by `write_png`, else None."""
    try:
        with Image.open(path) as im:
            im.load()  # a truncated file fails here
            text = im.text.get(METADATA_KEY)
    except (OSError, SyntaxError, ValueError):
        return None
    return None if text is None else json.loads(text)


def pending(items: Iterable[WorkItem], outdir: str, job: str | None = None) -> list[WorkItem]:
    """The items whose image is not complete on disk yet (as an image of job `job`, when
    given)."""
    out = []
    for it in items:
        meta = read_metadata(os.path.join(outdir, it.file))
        if meta is None or (job is not None and meta.get("job") != job):
            out.append(it)
    return out


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


def check_outdir(outdir: str, subfolder: str | None = "images") -> None:
    """Fails fast (before any model is loaded) unless `outdir` can hold the job's files: it
    must be a directory, or creatable as one, where this process can write (checked by
    writing a file, which also catches read-only file systems and the root user's
    permissions), as must its `subfolder` (the images; None: none)."""
    if os.path.exists(outdir) and not os.path.isdir(outdir):
        raise NotADirectoryError(f"output directory {outdir!r} exists and is not a directory")
    folder = os.path.join(outdir, subfolder) if subfolder else outdir
    try:
        os.makedirs(folder, exist_ok=True)
        for where in dict.fromkeys((outdir, folder)):  # the manifest, the images
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
    with files.atomic_write(path) as f:
        Image.fromarray(np.asarray(image, np.uint8)).save(f, format="PNG", pnginfo=info)


def sampled_settings(entry: PromptEntry, settings: dict) -> dict:
    """The job's settings as an entry's images were sampled: a prompt's own guidance scale
    replaces every stage's (as the cascade and the public pipelines apply it)."""
    if entry.guidance_scale is None or "stages" not in settings:
        return settings
    stages = []
    for stage in settings["stages"]:
        stage = dict(stage)
        for group in ("sample", "overrides"):
            if isinstance(stage.get(group), dict) and (
                group == "sample" or "guidance_scale" in stage[group]
            ):
                stage[group] = dict(stage[group], guidance_scale=entry.guidance_scale)
        stages.append(stage)
    return dict(settings, stages=stages)


def image_metadata(item: WorkItem, *, seed: int, settings: dict, job: str = "") -> dict:
    """What an image's PNG records: its prompt, seed and settings as sampled, and the
    fingerprint of its job (`job_fingerprint`)."""
    entry = item.entry
    meta = dict(
        entry.extra,
        file=item.file,
        prompt=entry.prompt,
        negative_prompt=entry.negative_prompt,
        prompt_index=item.prompt_index,
        image_index=item.image_index,
        seed=seed if entry.seed is None else entry.seed,
        **sampled_settings(entry, settings),
    )
    if job:
        meta["job"] = job
    return meta


JOB_FILE = "job.json"
MANIFEST = "manifest.jsonl"
GRID = "grid.png"
GRID_LIMIT = 64  # grid.png shows the job's first images, at most this many


class JobMismatchError(ValueError):
    """An output directory holds the images of another job."""


def _without_paths(tree):
    """A settings tree less its "path" entries (where weights were read from does not
    determine an image; their hash does)."""
    if isinstance(tree, dict):
        return {k: _without_paths(v) for k, v in tree.items() if k != "path"}
    if isinstance(tree, (list, tuple)):
        return [_without_paths(v) for v in tree]
    return tree


def job_record(
    entries: Sequence[PromptEntry], *, images_per_prompt: int, seed: int, settings: dict
) -> dict:
    """Everything that determines a job's images, with its fingerprint (a SHA-256 of the
    rest, in canonical JSON)."""
    return fingerprinted(
        dict(
            seed=seed,
            images_per_prompt=images_per_prompt,
            settings=_without_paths(settings),
            prompts=[e.record() for e in entries],
        )
    )


def fingerprinted(record: dict) -> dict:
    """A job record with its fingerprint: a SHA-256 of the record in canonical JSON."""
    canonical = json.dumps(record, sort_keys=True, separators=(",", ":"), default=str)
    return dict(record, fingerprint=hashlib.sha256(canonical.encode()).hexdigest()[:16])


def _short(value) -> str:
    text = json.dumps(value, sort_keys=True, default=str)
    return text if len(text) <= 60 else text[:57] + "..."


def differences(old, new, where: str = "", limit: int = 6) -> list[str]:
    """Where two job records differ, as "key: old -> new" lines (at most `limit`)."""
    out: list[str] = []

    def walk(a, b, at):
        if len(out) >= limit or a == b:
            return
        if isinstance(a, dict) and isinstance(b, dict):
            for key in sorted(set(a) | set(b), key=str):
                sub = f"{at}.{key}" if at else str(key)
                if key not in a:
                    out.append(f"{sub}: (absent) -> {_short(b[key])}")
                elif key not in b:
                    out.append(f"{sub}: {_short(a[key])} -> (absent)")
                else:
                    walk(a[key], b[key], sub)
                if len(out) >= limit:
                    return
        elif isinstance(a, list) and isinstance(b, list):
            if len(a) != len(b):
                out.append(f"{at}: {len(a)} -> {len(b)} entries")
            for k, (x, y) in enumerate(zip(a, b, strict=False)):
                walk(x, y, f"{at}[{k}]")
                if len(out) >= limit:
                    return
        else:
            out.append(f"{at}: {_short(a)} -> {_short(b)}")

    walk(old, new, where)
    return out


def _our_pngs(folder: str) -> list[str]:
    return sorted(glob.glob(os.path.join(glob.escape(folder), "*.png")))


def clear_outputs(outdir: str) -> int:
    """Removes a job's files from outdir (its PNGs, job.json, the manifests, grid.png);
    other files stay. Returns the number of images removed."""
    removed = 0
    for path in _our_pngs(os.path.join(outdir, "images")):
        if read_metadata(path) is not None or not os.path.getsize(path):
            os.remove(path)
            removed += 1
    for name in (JOB_FILE, MANIFEST, GRID, *_partial_manifests(outdir)):
        path = os.path.join(outdir, name)
        if os.path.exists(path):
            os.remove(path)
    return removed


def _partial_manifests(outdir: str) -> list[str]:
    pattern = os.path.join(glob.escape(outdir), "manifest.process*.jsonl")
    return [os.path.basename(p) for p in glob.glob(pattern)]


def read_job(outdir: str) -> dict | None:
    """The record in outdir's job.json, or None where there is none."""
    path = os.path.join(outdir, JOB_FILE)
    if not os.path.exists(path):
        return None
    try:
        with open(path, encoding="utf-8") as f:
            record = json.load(f)
    except (OSError, ValueError) as e:
        raise JobMismatchError(
            f"{path} is unreadable ({e}): give a new output directory, or --overwrite to "
            "replace that job's files"
        ) from None
    if not isinstance(record, dict) or "fingerprint" not in record:
        raise JobMismatchError(f"{path} is not a job record (no 'fingerprint')")
    return record


def prepare_outdir(outdir: str, record: dict, *, overwrite: bool = False) -> str:
    """Makes outdir ready for the job of `record` (process 0 alone, before any image is
    written): a resume of the same job keeps its images; another job's files are refused
    (`JobMismatchError`, naming what differs), or removed if `overwrite`. Temporary files
    of killed writers go; job.json and the manifest are (re)written. Returns "new",
    "resume" or "overwrite"."""
    os.makedirs(os.path.join(outdir, "images"), exist_ok=True)
    images = _our_pngs(os.path.join(outdir, "images"))
    state = resume_state(outdir, record, outputs=len(images), overwrite=overwrite)
    if state == "overwrite":
        removed = clear_outputs(outdir)
        logging.info("%s: removed %d images of the previous job (overwrite)", outdir, removed)
    for folder in (outdir, os.path.join(outdir, "images")):
        files.remove_temporaries(folder)
    write_job(outdir, record)
    write_manifest(outdir, job=record["fingerprint"])
    return state


def resume_state(
    outdir: str, record: dict, *, outputs: int, overwrite: bool, noun: str = "images"
) -> str:
    """What a job of `record` does with outdir, which holds `outputs` output files (its
    `noun`): "resume" the same job, start a "new" one in an empty folder, or "overwrite"
    another job's outputs (the caller removes them); without `overwrite`, another job's
    folder raises `JobMismatchError` naming what differs. Writes nothing."""
    try:
        old = read_job(outdir)
    except JobMismatchError:
        if not overwrite:
            raise
        old = {"fingerprint": None}  # an unreadable record: another job's, to replace
    if old is not None and old["fingerprint"] == record["fingerprint"]:
        return "resume"
    if old is None and not outputs:
        return "new"
    if overwrite:
        return "overwrite"
    if old is None:
        what = f"{outputs} {noun} and no {JOB_FILE} (written by another job)"
    else:
        what = f"the {noun} of another job; it differs in " + "; ".join(
            differences(
                {k: v for k, v in old.items() if k != "fingerprint"},
                {k: v for k, v in record.items() if k != "fingerprint"},
            )
        )
    raise JobMismatchError(
        f"output directory {outdir!r} holds {what}. Give a new output directory, or "
        f"--overwrite to replace its {noun}"
    )


def write_job(outdir: str, record: dict) -> None:
    """outdir/job.json, atomically."""
    with files.atomic_write(os.path.join(outdir, JOB_FILE), "w") as f:
        json.dump(record, f, indent=1, sort_keys=True)
        f.write("\n")


def write_manifest(outdir: str, job: str | None = None) -> str:
    """Rebuilds `manifest.jsonl` from the metadata of every complete PNG under outdir (of
    job `job` only, when given)."""
    records = []
    for path in _our_pngs(os.path.join(outdir, "images")):
        meta = read_metadata(path)
        if meta is not None and (job is None or meta.get("job") == job):
            records.append(meta)
    path = os.path.join(outdir, MANIFEST)
    with files.atomic_write(path, "w") as f:
        for rec in records:
            f.write(json.dumps(rec, sort_keys=True) + "\n")
    return path


def _append_manifest(path: str, records: Sequence[dict]) -> None:
    with open(path, "a", encoding="utf-8") as f:
        for rec in records:
            f.write(json.dumps(rec, sort_keys=True) + "\n")
        f.flush()


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
    with files.atomic_write(path) as f:
        Image.fromarray(sheet).save(f, format="PNG")


def save_job_grid(outdir: str, items: Sequence[WorkItem]) -> str | None:
    """grid.png of the job's first images on disk (at most GRID_LIMIT), in job order."""
    images = []
    for it in items:
        path = os.path.join(outdir, it.file)
        if len(images) < GRID_LIMIT and read_metadata(path) is not None:
            with Image.open(path) as im:
                images.append(np.asarray(im.convert("RGB")))
    if not images:
        return None
    path = os.path.join(outdir, GRID)
    save_grid(images, path)
    return path


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
    overwrite: bool = False,
) -> dict:
    """Samples every pending image of this process's share and writes it. Process 0 first
    checks outdir against the job (`prepare_outdir`: resume, refuse another job's folder,
    or replace it if `overwrite`) while the others wait; then every process samples its
    share, appending what it made to the manifest (its own partial one on several
    processes); once every process is done (a barrier), process 0 rebuilds the manifest and
    the grid from the PNGs (so `outdir` must be one file system shared by all processes).
    Returns this process's summary: prompts in the job, images in its share, made, skipped
    (already on disk), seconds, images/s, the job's fingerprint and whether it resumed."""
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    settings = settings or {}
    record = job_record(entries, images_per_prompt=images_per_prompt, seed=seed, settings=settings)
    job = record["fingerprint"]
    state = None
    if jax.process_index() == 0:
        state = prepare_outdir(outdir, record, overwrite=overwrite)
    parallel.barrier("imagen_jax sampling job checked")  # nobody writes before the check
    if jax.process_index() != 0 and (read_job(outdir) or {}).get("fingerprint") != job:
        raise JobMismatchError(f"{outdir}/{JOB_FILE} is not this process's job {job}")
    items = plan(
        entries,
        images_per_prompt,
        process_index=jax.process_index(),
        process_count=jax.process_count(),
    )
    todo = pending(items, outdir, job)
    manifest = os.path.join(
        outdir,
        MANIFEST if jax.process_count() == 1 else f"manifest.process{jax.process_index()}.jsonl",
    )
    groups: dict = {}
    for it in todo:  # one guidance scale per compiled call: batch by it
        groups.setdefault(it.entry.guidance_scale, []).append(it)
    start, made = time.perf_counter(), 0
    bar = tqdm(total=len(todo), disable=not progress, unit="img", desc="sampling")
    for group in groups.values():
        for chunk, real in batches(group, batch_size):
            final = cascade(chunk, seed)[-1]
            written = []
            for it, image in list(zip(chunk, final, strict=True))[:real]:
                meta = image_metadata(it, seed=seed, settings=settings, job=job)
                write_png(os.path.join(outdir, it.file), image, meta)
                written.append(meta)
            _append_manifest(manifest, written)
            made += real
            bar.update(real)
    bar.close()
    seconds = time.perf_counter() - start
    parallel.barrier("imagen_jax sampling job done")  # every share is on disk
    if jax.process_index() == 0:
        write_manifest(outdir, job=job)
        for name in _partial_manifests(outdir):
            os.remove(os.path.join(outdir, name))
        if grid:
            save_job_grid(outdir, plan(entries, images_per_prompt))
    return dict(
        prompts=len(entries),
        images=len(items),
        made=made,
        skipped=len(items) - len(todo),
        seconds=seconds,
        images_per_s=made / seconds if seconds else 0.0,
        job=job,
        state=state,
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
        try:
            out[int(index)][key] = _typed(value, kind)
        except ValueError:
            raise ValueError(
                f"--set={item!r}: {key} takes {'true/false' if kind is bool else kind.__name__}"
                f" values, got {value!r}"
            ) from None
    return out


def _typed(value: str, kind: type):
    if kind is bool:
        if value.lower() not in ("1", "true", "yes", "0", "false", "no"):
            raise ValueError(value)
        return value.lower() in ("1", "true", "yes")
    return kind(value)


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
