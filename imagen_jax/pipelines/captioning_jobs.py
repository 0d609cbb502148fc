"""Captioning jobs: a folder of images in, `captions.jsonl` out, resumable and split over
hosts like the sampling jobs (`jobs`), whose pieces it reuses.

    summary = run_captioning_job(model="git-base-coco", images="samples/", outdir="captions/")

The images: with a `manifest.jsonl` in the folder (sample.py's output), the files it lists,
in its order, each line carrying the image's prompt and metadata; else every file under the
folder (recursively, sorted by path, hidden files and the job's own output folder left out).
Each is decoded whole by Pillow and converted to RGB as transformers' processors do
(`images.to_rgb`: transparency composited onto white, grayscale repeated), then resized and
center-cropped by the model's CLIP processor (`images.ImageProcessor`), whatever its size. A
file that is not a readable image (not an image, truncated, missing) is named in the log and
the summary, skipped and counted; the job goes on.

Files in outdir: `job.json`, what determines the captions and its fingerprint
(`jobs.fingerprinted`): the model directory's SHA-256 (`files.folder_sha256`: weights,
configs, tokenizer), the decoding settings and token ids, and the image set (each file's
path and SHA-256, and the manifest's SHA-256); not the batch size, the device or process
count or any path. `captions.jsonl`: one line per captioned image, in the images' order,
`{"file": path relative to the images folder, "caption": str}` plus, from a manifest,
`"prompt"` and `"metadata"` (the manifest's other fields). A rerun with the same
fingerprint resumes: it captions only the images without a line; one with another
fingerprint refuses, naming what differs (`jobs.resume_state`), unless `overwrite` (then
the old captions go). A folder holding another kind of job (a sampling job's job.json) is
refused even with `overwrite`: its images and manifest would be lost.

Progress: one process appends each batch's lines to captions.jsonl, and flushes them to
disk, so a killed job leaves the lines of every batch it finished (a line cut by the kill
is dropped on resume). Several processes (multi-host) each caption a contiguous share of
the images (`jobs.share`) and append to their own `captions.process{k}.jsonl`; once every
process is done (a barrier) process 0 merges them into captions.jsonl, sorted, so outdir
must be one file system shared by all processes.
"""

from __future__ import annotations

import dataclasses
import glob
import json
import os
import time
from collections.abc import Sequence

import jax
import numpy as np
from absl import logging
from PIL import Image
from tqdm import tqdm

from imagen_jax import files, images, parallel
from imagen_jax.pipelines import captioning, jobs

KIND = "captioning"  # job.json's "kind": a captioning job's record, not a sampling job's
CAPTIONS = "captions.jsonl"
MANIFEST = "manifest.jsonl"  # sample.py's, in the images folder
OWN_FILES = (jobs.JOB_FILE, CAPTIONS)
# What Pillow raises on a file that is not a readable image.
BAD_IMAGE = (OSError, SyntaxError, ValueError, Image.DecompressionBombError)


@dataclasses.dataclass(frozen=True)
class ImageItem:
    """One image of a job: its path relative to the images folder (with "/"), and its
    manifest record (None: a folder without manifest)."""

    file: str
    record: dict | None = None

    def line(self, caption: str) -> dict:
        """The image's line of captions.jsonl."""
        out: dict = {"file": self.file, "caption": caption}
        if self.record is not None:
            if isinstance(self.record.get("prompt"), str):
                out["prompt"] = self.record["prompt"]
            metadata = {k: v for k, v in self.record.items() if k not in ("file", "prompt")}
            if metadata:
                out["metadata"] = metadata
        return out


def list_images(folder: str, *, outdir: str | None = None) -> list[ImageItem]:
    """The job's images: those `folder/manifest.jsonl` lists (in order), else every
    non-hidden file under folder, sorted (outdir's subtree, and the job files it would
    hold when it is the folder itself, left out)."""
    if not os.path.isdir(folder):
        raise FileNotFoundError(f"images folder {folder!r} does not exist")
    manifest = os.path.join(folder, MANIFEST)
    items = _from_manifest(manifest) if os.path.isfile(manifest) else _walk(folder, outdir)
    if not items:
        raise ValueError(f"images folder {folder!r} holds no files to caption")
    return items


def _from_manifest(manifest: str) -> list[ImageItem]:
    items, seen = [], {}
    for n, record in files.read_jsonl(manifest):
        file = record["file"].replace(os.sep, "/")
        if file in seen:
            raise ValueError(f"{manifest}:{n}: {file!r} is listed again (line {seen[file]})")
        seen[file] = n
        items.append(ImageItem(file, record))
    return items


def _walk(folder: str, outdir: str | None) -> list[ImageItem]:
    out_real = os.path.realpath(outdir) if outdir else None
    found = []
    for root, dirs, names in os.walk(folder):
        dirs[:] = [
            d
            for d in dirs
            if not d.startswith(".") and os.path.realpath(os.path.join(root, d)) != out_real
        ]
        at_outdir = os.path.realpath(root) == out_real
        for name in names:
            if name.startswith(".") or name.endswith(files.TMP_SUFFIX):
                continue
            if at_outdir and (name in OWN_FILES or _is_partial(name)):
                continue
            rel = os.path.relpath(os.path.join(root, name), folder)
            found.append(rel.replace(os.sep, "/"))
    return [ImageItem(f) for f in sorted(found)]


def _is_partial(name: str) -> bool:
    return name.startswith("captions.process") and name.endswith(".jsonl")


def _digest(path: str) -> str | None:
    try:
        return files.file_sha256(path)[:16]
    except OSError:
        return None  # missing or unreadable: named when it is captioned


def job_record(
    items: Sequence[ImageItem],
    folder: str,
    *,
    model_sha256: str,
    decoding: captioning.Decoding,
    bos_token_id: int | None,
) -> dict:
    """What determines the job's captions (see the module docstring), fingerprinted."""
    manifest = os.path.join(folder, MANIFEST)
    return jobs.fingerprinted(
        dict(
            kind=KIND,
            model_sha256=model_sha256,
            # as job.json holds it (tuples as lists), so that a rerun compares equal
            decoding=json.loads(
                json.dumps(dict(dataclasses.asdict(decoding), bos_token_id=bos_token_id))
            ),
            manifest_sha256=_digest(manifest) if os.path.isfile(manifest) else None,
            images=[
                {"file": it.file, "sha256": _digest(os.path.join(folder, it.file))} for it in items
            ],
        )
    )


def _partials(outdir: str) -> list[str]:
    pattern = os.path.join(glob.escape(outdir), "captions.process*.jsonl")
    return sorted(glob.glob(pattern))


def read_lines(path: str) -> list[dict]:
    """The complete lines of a captions file (a line cut by a kill, or not JSON, dropped)."""
    if not os.path.isfile(path):
        return []
    out = []
    with open(path, encoding="utf-8", errors="replace") as f:
        for line in f:
            try:
                obj = json.loads(line)
            except json.JSONDecodeError:
                continue
            if isinstance(obj, dict) and isinstance(obj.get("file"), str) and "caption" in obj:
                out.append(obj)
    return out


def merge_captions(outdir: str, items: Sequence[ImageItem]) -> int:
    """Rewrites captions.jsonl from itself and the per-process files, one line per image of
    `items` (in their order; the first line of an image wins), atomically; removes the
    per-process files. Returns the number of lines."""
    order = {it.file: k for k, it in enumerate(items)}
    lines: dict[str, dict] = {}
    for path in [os.path.join(outdir, CAPTIONS), *_partials(outdir)]:
        for obj in read_lines(path):
            if obj["file"] in order:
                lines.setdefault(obj["file"], obj)
    with files.atomic_write(os.path.join(outdir, CAPTIONS), "w") as f:
        for file in sorted(lines, key=order.__getitem__):
            f.write(json.dumps(lines[file], sort_keys=True) + "\n")
    for path in _partials(outdir):
        os.remove(path)
    return len(lines)


def check_outdir(outdir: str, record: dict, *, overwrite: bool = False) -> str:
    """Whether the job of `record` may run in outdir (writes nothing): "new", "resume" or
    "overwrite" (`jobs.resume_state`); refuses a folder of another kind of job."""
    if os.path.exists(outdir) and not os.path.isdir(outdir):
        raise NotADirectoryError(f"output directory {outdir!r} exists and is not a directory")
    try:
        old = jobs.read_job(outdir)
    except jobs.JobMismatchError:
        old = None  # unreadable: resume_state refuses it, or replaces it with overwrite
    if old is not None and old.get("kind") != KIND:
        raise jobs.JobMismatchError(
            f"{os.path.join(outdir, jobs.JOB_FILE)} is not a captioning job's (a sampling "
            "job's folder?): captions go to a folder of their own; give another --outdir"
        )
    outputs = len(read_lines(os.path.join(outdir, CAPTIONS))) + sum(
        len(read_lines(p)) for p in _partials(outdir)
    )
    return jobs.resume_state(outdir, record, outputs=outputs, overwrite=overwrite, noun="captions")


def prepare_outdir(
    outdir: str, record: dict, items: Sequence[ImageItem], *, overwrite: bool = False
) -> str:
    """Makes outdir ready (process 0 alone, before anything is written): checks it
    (`check_outdir`), removes another job's captions when overwriting, merges a killed
    job's lines, writes job.json. Returns "new", "resume" or "overwrite"."""
    state = check_outdir(outdir, record, overwrite=overwrite)
    os.makedirs(outdir, exist_ok=True)
    files.remove_temporaries(outdir)
    if state != "resume":
        for path in [os.path.join(outdir, CAPTIONS), *_partials(outdir)]:
            if os.path.exists(path):
                os.remove(path)
    jobs.write_job(outdir, record)
    merge_captions(outdir, items)
    return state


def _append(path: str, lines: Sequence[dict]) -> None:
    with open(path, "a", encoding="utf-8") as f:
        for obj in lines:
            f.write(json.dumps(obj, sort_keys=True) + "\n")
        f.flush()
        os.fsync(f.fileno())


def _load(
    captioner: captioning.Captioner, folder: str, item: ImageItem
) -> tuple[np.ndarray | None, str]:
    """(pixel_values, "") of an image, or (None, why it is skipped)."""
    try:
        return captioner.processor(images.load_rgb(os.path.join(folder, item.file))), ""
    except BAD_IMAGE as e:
        return None, f"{type(e).__name__}: {e}"


def run_job(
    captioner: captioning.Captioner,
    items: Sequence[ImageItem],
    folder: str,
    outdir: str,
    *,
    record: dict,
    overwrite: bool = False,
    progress: bool = True,
) -> dict:
    """Captions every image of this process's share that has no line yet, in batches of
    `captioner.batch_size` (see the module docstring). Returns this process's summary:
    images in the job, in its share, captioned now, already there, skipped (bad files,
    with the reason of each), seconds, images/s, the job's fingerprint and state."""
    job = record["fingerprint"]
    state = None
    if jax.process_index() == 0:
        state = prepare_outdir(outdir, record, items, overwrite=overwrite)
    parallel.barrier("imagen_jax captioning job checked")  # nobody writes before the check
    if jax.process_index() != 0 and (jobs.read_job(outdir) or {}).get("fingerprint") != job:
        raise jobs.JobMismatchError(f"{outdir}/{jobs.JOB_FILE} is not this process's job {job}")
    lo, hi = jobs.share(len(items), jax.process_index(), jax.process_count())
    done = {obj["file"] for obj in read_lines(os.path.join(outdir, CAPTIONS))}
    todo = [it for it in items[lo:hi] if it.file not in done]
    path = os.path.join(
        outdir,
        CAPTIONS if jax.process_count() == 1 else f"captions.process{jax.process_index()}.jsonl",
    )
    start, made, skipped = time.perf_counter(), 0, {}
    bar = tqdm(total=len(todo), disable=not progress, unit="img", desc="captioning")
    for first in range(0, len(todo), captioner.batch_size):
        chunk, pixels = [], []
        for it in todo[first : first + captioner.batch_size]:
            x, why = _load(captioner, folder, it)
            if x is None:
                logging.warning("skipped %s: %s", it.file, why)
                skipped[it.file] = why
            else:
                chunk.append(it)
                pixels.append(x)
        if chunk:
            captions = captioner.decode(captioner.generate(np.stack(pixels)))
            _append(path, [it.line(c) for it, c in zip(chunk, captions, strict=True)])
            made += len(chunk)
        bar.update(min(captioner.batch_size, len(todo) - first))
    bar.close()
    seconds = time.perf_counter() - start
    parallel.barrier("imagen_jax captioning job done")  # every share is on disk
    if jax.process_index() == 0:
        merge_captions(outdir, items)
    return dict(
        images=len(items),
        share=hi - lo,
        captioned=made,
        already=hi - lo - len(todo),
        skipped=skipped,
        seconds=seconds,
        images_per_s=made / seconds if seconds else 0.0,
        job=job,
        state=state,
    )


def run_captioning_job(
    *,
    model: str,
    images: str,
    outdir: str,
    batch_size: int = 32,
    num_beams: int = 1,
    max_length: int | None = None,
    length_penalty: float = 1.0,
    overwrite: bool = False,
    progress: bool = True,
    devices: Sequence[jax.Device] | None = None,
) -> dict:
    """caption.py's job (one keyword argument per flag): checks the folders and the job
    record before the weights are loaded, then `run_job`; prints a summary, returns it.
    devices: this process's devices to shard batches over (None: all local ones)."""
    if batch_size < 1:
        raise ValueError(f"--batch_size must be >= 1, got {batch_size}")
    if not model or not os.path.isdir(model):
        raise FileNotFoundError(f"--model {model!r} is not a directory (a GIT model folder)")
    items = list_images(images, outdir=outdir)
    manifest = os.path.isfile(os.path.join(images, MANIFEST))
    print(f"{len(items)} images listed in {images}" + (f" ({MANIFEST})" if manifest else ""))
    decoding, bos = captioning.read_decoding(
        model, max_length=max_length, num_beams=num_beams, length_penalty=length_penalty
    )
    record = job_record(
        items, images, model_sha256=files.folder_sha256(model), decoding=decoding, bos_token_id=bos
    )
    if jax.process_index() == 0:
        check_outdir(outdir, record, overwrite=overwrite)  # before the weights are read
    jobs.check_outdir(outdir, subfolder=None)  # writable
    captioner = captioning.load_captioner(
        model,
        max_length=decoding.max_length,
        num_beams=num_beams,
        length_penalty=length_penalty,
        batch_size=batch_size,
        devices=devices,
    )
    summary = run_job(
        captioner, items, images, outdir, record=record, overwrite=overwrite, progress=progress
    )
    _print_summary(summary, outdir)
    return summary


def _print_summary(summary: dict, outdir: str) -> None:
    skipped = summary["skipped"]
    for file, why in skipped.items():
        print(f"skipped {file}: {why}")
    print(
        f"{summary['captioned']} images captioned into {os.path.join(outdir, CAPTIONS)} "
        f"({summary['already']} already there, {len(skipped)} skipped as unreadable; this "
        f"process's share: {summary['share']} of {summary['images']} images; the job "
        f"{summary['job']}) in {summary['seconds']:.1f} s, {summary['images_per_s']:.2f} images/s"
    )
