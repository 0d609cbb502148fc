"""An embedding index of a folder of images: built once (resumably), queried by text or image.

    summary = build_index(model="runs/emb/embedding", images="samples/", index="idx/")
    hits = query_index("idx/", text="a red star above a blue circle", k=5)  # [(file, score)]

The index directory holds index.json (the model's directory and the SHA-256 of its files,
the images folder, the embedding width), and, once complete, embeddings.npy (float32 [N, P],
L2-normalised) beside index.jsonl (line n: the file of row n, relative to the images folder,
its size). While it is being built, every `chunk` images are written as one part
(parts/part_NNNNN.npy, then its .jsonl: a part counts once both exist), so a killed build
resumes with the images no part holds; a rerun over a complete index embeds only the images
added to the folder since. An index is tied to its model: building into (or querying) it
with another model, or another images folder, stops and names both.

The images are those `captioning_jobs.list_images` lists (a sample.py folder's manifest,
else every file under the folder). An unreadable file is named, skipped and counted. Images
of any size are taken: the model's processor resizes the shortest side to the tower's size
and centre-crops (the summary counts those that were not of that size).
"""

from __future__ import annotations

import json
import os

import numpy as np
from absl import logging

from imagen_jax import files
from imagen_jax.images import load_rgb
from imagen_jax.pipelines import captioning_jobs, embedding

INDEX_FILE = "index.json"
ROWS_FILE = "index.jsonl"
EMBEDDINGS_FILE = "embeddings.npy"
PARTS = "parts"


def model_identity(model: str) -> dict:
    """What an index records of its model: the directory and the SHA-256 of its files."""
    return {"model": os.path.abspath(model), "model_sha256": files.folder_sha256(model)}


def _read_json(path: str) -> dict:
    with open(path) as f:
        return json.load(f)


def check_index(index: str, identity: dict, images: str | None = None) -> dict:
    """The index's index.json, checked to be of the model `identity` (and the images
    folder); ValueError naming both when not. {} for a directory without an index."""
    path = os.path.join(index, INDEX_FILE)
    if not os.path.isfile(path):
        return {}
    record = _read_json(path)
    if record.get("model_sha256") != identity["model_sha256"]:
        raise ValueError(
            f"the index {index} was built with the model {record.get('model')!r}; "
            f"{identity['model']!r} is another model (other weights): use another --index"
        )
    if images is not None and record.get("images") != os.path.abspath(images):
        raise ValueError(
            f"the index {index} holds the images of {record.get('images')!r}, not of "
            f"{os.path.abspath(images)!r}: use another --index"
        )
    return record


def _parts(index: str) -> list[str]:
    """The stems of the complete parts (.npy and .jsonl both written), in order."""
    folder = os.path.join(index, PARTS)
    if not os.path.isdir(folder):
        return []
    names = set(os.listdir(folder))
    stems = sorted(n[: -len(".jsonl")] for n in names if n.endswith(".jsonl"))
    return [os.path.join(folder, s) for s in stems if f"{s}.npy" in names]


def read_rows(index: str) -> tuple[list[dict], np.ndarray | None]:
    """(row records, embeddings) of the merged index and its complete parts."""
    rows, arrays = [], []
    merged = os.path.join(index, EMBEDDINGS_FILE)
    if os.path.isfile(merged):
        rows += [r for _, r in files.read_jsonl(os.path.join(index, ROWS_FILE))]
        # embeddings.npy is replaced before index.jsonl: after a kill in between it holds
        # the rows of parts that are still there, which come from the parts below.
        arrays.append(np.load(merged)[: len(rows)])
    merged_files = {r["file"] for r in rows}
    for stem in _parts(index):
        part = [r for _, r in files.read_jsonl(f"{stem}.jsonl")]
        if {r["file"] for r in part} <= merged_files:
            continue  # merged already; a kill left its files
        rows += part
        arrays.append(np.load(f"{stem}.npy"))
    if not arrays:
        return rows, None
    return rows, np.concatenate(arrays)


def build_index(
    *, model: str, images: str, index: str, batch_size: int = 64, chunk: int = 512
) -> dict:
    """Embeds the images of `images` that `index` does not hold yet with `model`; returns a
    summary (embedded, already, unreadable, resized, total)."""
    embedding.model_kind(model)  # a directory of another kind, named before anything runs
    identity = model_identity(model)
    record = check_index(index, identity, images)
    items = captioning_jobs.list_images(images, outdir=index)
    os.makedirs(os.path.join(index, PARTS), exist_ok=True)
    files.remove_temporaries(os.path.join(index, PARTS))
    if not record:
        record = {**identity, "images": os.path.abspath(images)}
        with files.atomic_write(os.path.join(index, INDEX_FILE), "w") as f:
            json.dump(record, f, indent=2)
    rows, _ = read_rows(index)
    done = {r["file"] for r in rows}
    todo = [it.file for it in items if it.file not in done]
    summary = dict(embedded=0, already=len(done), unreadable=0, resized=0)
    if todo:
        embedder = embedding.load_embedder(model, batch_size=batch_size)
        size = embedder.processor.output_size(1, 1)
        part = len(_parts(index))
        for start in range(0, len(todo), chunk):
            summary = _embed_part(
                embedder, images, todo[start : start + chunk], index, part, size, summary
            )
            part += 1
    _merge(index)
    rows, embeds = read_rows(index)
    summary["total"] = len(rows)
    summary["dim"] = 0 if embeds is None else int(embeds.shape[1])
    return summary


def _embed_part(embedder, folder, names, index, part, size, summary) -> dict:
    loaded, kept = [], []
    for name in names:
        try:
            image = load_rgb(os.path.join(folder, name))
        except captioning_jobs.BAD_IMAGE as e:
            logging.warning("skipped %s: not a readable image (%s)", name, e)
            summary["unreadable"] += 1
            continue
        summary["resized"] += image.shape[:2] != tuple(size)
        loaded.append(image)
        kept.append({"file": name, "size": list(image.shape[:2])})
    if not kept:
        return summary
    embeds = embedder.embed_images(loaded)
    stem = os.path.join(index, PARTS, f"part_{part:05d}")
    with files.atomic_write(f"{stem}.npy") as f:
        np.save(f, embeds)
    with files.atomic_write(f"{stem}.jsonl", "w") as f:  # written last: the part is complete
        f.writelines(json.dumps(r) + "\n" for r in kept)
    summary["embedded"] += len(kept)
    return summary


def _merge(index: str) -> None:
    """The parts folded into embeddings.npy and index.jsonl (each written whole), then
    removed (a kill in between leaves parts that `read_rows` skips: merged already)."""
    parts = _parts(index)
    if not parts:
        return
    rows, embeds = read_rows(index)
    with files.atomic_write(os.path.join(index, EMBEDDINGS_FILE)) as f:
        np.save(f, embeds)
    with files.atomic_write(os.path.join(index, ROWS_FILE), "w") as f:
        f.writelines(json.dumps(r) + "\n" for r in rows)
    for stem in parts:
        os.remove(f"{stem}.jsonl")
        os.remove(f"{stem}.npy")


def images_folder(index: str) -> str:
    """The images folder an index was built from."""
    return _read_json(os.path.join(index, INDEX_FILE))["images"]


def query_index(
    index: str,
    *,
    text: str | None = None,
    image: str | None = None,
    k: int = 5,
    model: str | None = None,
    batch_size: int = 8,
) -> list[tuple[str, float]]:
    """The `k` images of the index closest to a text or to an image file: [(file, cosine)],
    best first. `model` defaults to the index's own (another one is refused)."""
    if (text is None) == (image is None):
        raise ValueError("give a query: one of a text or an image (not both)")
    if text is not None and not text.strip():
        raise ValueError("the query text is empty")
    path = os.path.join(index, INDEX_FILE)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{index} holds no index ({INDEX_FILE}): build one first")
    record = _read_json(path)
    model = model or record["model"]
    embedding.model_kind(model)
    check_index(index, model_identity(model))
    if _parts(index) or not os.path.isfile(os.path.join(index, EMBEDDINGS_FILE)):
        raise ValueError(f"the index {index} is incomplete: rerun its build to finish it")
    rows, embeds = read_rows(index)
    embedder = embedding.load_embedder(model, batch_size=batch_size)
    if text is not None:
        q = embedder.embed_texts([text])[0]
    else:
        q = embedder.embed_images([load_rgb(image)])[0]
    scores = embeds @ q
    top = np.argsort(-scores, kind="stable")[: max(1, k)]
    return [(rows[i]["file"], float(scores[i])) for i in top]
