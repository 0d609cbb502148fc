"""A cache of frozen-text-encoder outputs: captions encoded once, read back by the trainer.

    build_cache("cache/", captions, encoder)  # every process of a job, same captions
    cache = EmbeddingCache.open("cache/", expect_fingerprint=encoder.fingerprint())
    emb, mask, pooled = cache.lookup(["a red circle", ""])  # [2, L, D] float32, [2, L] bool

A cache directory holds

    cache.json                          format, encoder fingerprint, L, D, P, dtype, count,
                                        shard names
    shard-00000-of-00002.safetensors    key uint8 [N, 32] (sha256 of the UTF-8 caption),
    shard-00001-of-00002.safetensors    embeddings [N, L, D] float16 | float32, mask bool
                                        [N, L], and pooled [N, P] if the encoder pools

The captions are deduplicated and sorted; process i of n encodes captions[i::n] and writes
shard i; process 0 writes cache.json once every shard exists. Files appear atomically
(written under a temporary name, then renamed), so a cache with a cache.json is complete.
Reading memory-maps the shards: the keys are read at opening (32 bytes a caption), the
embeddings only row by row as they are looked up.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Sequence
from typing import Any, Protocol

import jax
import numpy as np
from absl import logging

from imagen_jax import parallel
from imagen_jax.text.encoder import TextEmbeddings, TextEncoder
from imagen_jax.weights import CheckpointError, read_safetensors_header

FORMAT = "imagen_jax.text_cache.v1"
INDEX = "cache.json"
DTYPES = {"float16": "F16", "float32": "F32"}  # stored dtype -> safetensors code
_NUMPY = {"U8": np.uint8, "BOOL": np.bool_, "F16": np.float16, "F32": np.float32}
_MAX_NAMED = 5  # captions named in an error


class CacheError(ValueError):
    """A text cache that is missing, partial, of another encoder, or lacks a caption."""


class Encoder(Protocol):
    """What build_cache needs of an encoder (a TextEncoder or a HashTextEncoder is one)."""

    def encode(self, prompts: Sequence[str]) -> tuple[Any, Any, Any]: ...

    def fingerprint(self) -> dict: ...


def caption_key(caption: str) -> bytes:
    """The 32-byte key of a caption: sha256 of its UTF-8 bytes."""
    return hashlib.sha256(caption.encode("utf-8")).digest()


def caption_keys(captions: Sequence[str]) -> np.ndarray:
    """The keys of captions, uint8 [N, 32]."""
    return np.frombuffer(b"".join(map(caption_key, captions)), np.uint8).reshape(-1, 32)


def shard_name(index: int, count: int) -> str:
    return f"shard-{index:05d}-of-{count:05d}.safetensors"


def build_cache(
    directory: str | os.PathLike,
    captions: Sequence[str],
    encoder: Encoder,
    *,
    dtype: str = "float16",
    batch_size: int = 256,
    process_index: int | None = None,
    process_count: int | None = None,
) -> list[str]:
    """Encodes this process's share of the captions into its shard of a cache in `directory`.

    Args:
      captions: all captions of the job (the same list on every process; duplicates and
        order do not matter).
      encoder: gives `encode(prompts)` and `fingerprint()`. A `TextEncoder` runs on all
        local devices at once.
      dtype: of the stored embeddings and pooled vectors: float16 | float32.
      batch_size: captions per `encode` call.
      process_index, process_count: this process's shard; default jax.process_index() and
        jax.process_count() (explicit values let one process write any shard).

    Returns the sorted unique captions. Process 0 then waits for all processes (when
    jax.process_count() > 1) and writes cache.json; it raises if a shard is missing.
    """
    if dtype not in DTYPES:
        raise ValueError(f"dtype must be one of {tuple(DTYPES)}, got {dtype!r}")
    index = jax.process_index() if process_index is None else process_index
    count = jax.process_count() if process_count is None else process_count
    if not 0 <= index < count:
        raise ValueError(f"process_index={index} not in [0, {count})")
    unique = sorted({str(c) for c in captions})
    if not unique:
        raise ValueError("build_cache needs at least one caption")
    directory = os.fspath(directory)
    os.makedirs(directory, exist_ok=True)
    shapes = _write_shard(
        os.path.join(directory, shard_name(index, count)),
        unique[index::count],
        encoder,
        probe=unique[0],
        dtype=dtype,
        batch_size=batch_size,
    )
    if jax.process_count() > 1:
        parallel.barrier(f"text cache shards in {directory}")
    if index == 0:
        names = [shard_name(i, count) for i in range(count)]
        missing = [n for n in names if not os.path.isfile(os.path.join(directory, n))]
        if missing:
            raise CacheError(f"{directory}: shards {missing} were not written; no {INDEX}")
        meta = dict(format=FORMAT, fingerprint=encoder.fingerprint(), **shapes, dtype=dtype)
        _write_atomic(
            os.path.join(directory, INDEX),
            json.dumps(dict(meta, count=len(unique), shards=names), indent=2).encode(),
        )
    return unique


def _encode(encoder: Encoder, prompts: list[str]) -> tuple[np.ndarray, ...]:
    if isinstance(encoder, TextEncoder):
        out = encoder.encode(prompts, devices=jax.local_devices())
    else:
        out = encoder.encode(prompts)
    return tuple(None if x is None else np.asarray(x) for x in out)


def _write_shard(
    path: str, captions: list[str], encoder: Encoder, *, probe: str, dtype: str, batch_size: int
) -> dict[str, int]:
    """Writes the rows of `captions` batch by batch into a memory-mapped safetensors file;
    returns {"max_length": L, "dim": D, "pooled_dim": P or 0}. An empty shard takes its
    shapes from encoding `probe`."""
    first = _encode(encoder, captions[:batch_size] or [probe])
    emb, _, pooled = first
    length, dim = emb.shape[1:]
    n, code = len(captions), DTYPES[dtype]
    spec = {
        "key": ("U8", (n, 32)),
        "embeddings": (code, (n, length, dim)),
        "mask": ("BOOL", (n, length)),
    }
    if pooled is not None:
        spec["pooled"] = (code, (n, pooled.shape[-1]))
    tmp = f"{path}.tmp{os.getpid()}"
    arrays = _create_safetensors(tmp, spec)
    for start in range(0, n, batch_size):
        batch = captions[start : start + batch_size]
        out = first if start == 0 else _encode(encoder, batch)
        rows = slice(start, start + len(batch))
        arrays["key"][rows] = caption_keys(batch)
        for name, value in zip(("embeddings", "mask", "pooled"), out, strict=True):
            if name in arrays:
                arrays[name][rows] = value
    for array in arrays.values():
        array.flush()
    os.replace(tmp, path)
    logging.info("Wrote %s: %d captions", path, n)
    pooled_dim = 0 if pooled is None else int(pooled.shape[-1])
    return dict(max_length=int(length), dim=int(dim), pooled_dim=pooled_dim)


def _create_safetensors(file: str, spec: dict[str, tuple[str, tuple[int, ...]]]) -> dict:
    """Creates a safetensors file of zeros with tensors {name: (dtype code, shape)}; returns
    writable memory maps of the non-empty ones (np.memmap cannot map 0 bytes)."""
    header, offset = {}, 0
    for name, (code, shape) in spec.items():
        size = int(np.prod(shape)) * np.dtype(_NUMPY[code]).itemsize
        header[name] = dict(dtype=code, shape=list(shape), data_offsets=[offset, offset + size])
        offset += size
    raw = json.dumps(header).encode()
    raw += b" " * (-len(raw) % 8)  # the data starts 8-byte aligned
    with open(file, "wb") as f:
        f.write(len(raw).to_bytes(8, "little") + raw)
        f.truncate(8 + len(raw) + offset)
    return {
        name: np.memmap(
            file,
            _NUMPY[code],
            mode="r+",
            offset=8 + len(raw) + header[name]["data_offsets"][0],
            shape=shape,
        )
        for name, (code, shape) in spec.items()
        if np.prod(shape)
    }


def _write_atomic(path: str, data: bytes) -> None:
    tmp = f"{path}.tmp{os.getpid()}"
    with open(tmp, "wb") as f:
        f.write(data)
    os.replace(tmp, path)


class EmbeddingCache:
    """A text cache opened for reading: its shards memory-mapped, a dict of caption keys.

    Attributes: directory, fingerprint (of the encoder that wrote it), max_length (L), dim
    (D), pooled_dim (P; 0 when the encoder does not pool), dtype (as stored),
    pooled_conditions (the encoder's: the network is also conditioned on the pooled text).
    """

    def __init__(self, directory: str, meta: dict, shards: list[dict[str, np.memmap]]):
        self.directory = directory
        self.fingerprint: dict = meta["fingerprint"]
        self.max_length, self.dim, self.pooled_dim = (
            int(meta[k]) for k in ("max_length", "dim", "pooled_dim")
        )
        self.dtype: str = meta["dtype"]
        self.pooled_conditions = bool(self.fingerprint.get("pooled_conditions", False))
        self._shards = shards
        self._rows: dict[bytes, tuple[int, int]] = {}  # key -> (shard, row)
        for s, shard in enumerate(shards):
            for row, key in enumerate(np.asarray(shard["key"])):
                self._rows[key.tobytes()] = (s, row)
        if len(self._rows) != meta["count"]:
            raise CacheError(
                f"{os.path.join(directory, INDEX)} counts {meta['count']} captions, its "
                f"shards hold {len(self._rows)} distinct ones"
            )

    @classmethod
    def open(
        cls, directory: str | os.PathLike, expect_fingerprint: dict | None = None
    ) -> EmbeddingCache:
        """Opens the cache in `directory`; with `expect_fingerprint` (an encoder's
        `fingerprint()`), raises CacheError unless the cache was written by that encoder."""
        directory = os.fspath(directory)
        meta = _read_index(directory)
        if expect_fingerprint is not None:
            _check_fingerprint(meta["fingerprint"], expect_fingerprint, directory)
        shards = [_open_shard(os.path.join(directory, name), meta) for name in meta["shards"]]
        return cls(directory, meta, shards)

    def __len__(self) -> int:
        return len(self._rows)

    def __contains__(self, caption: str) -> bool:
        return caption_key(caption) in self._rows

    def lookup(self, captions: Sequence[str]) -> TextEmbeddings:
        """captions -> embeddings float32 [B, L, D], mask bool [B, L], pooled float32 [B, P]
        (None if the encoder does not pool), as numpy arrays. Raises CacheError naming the
        captions that the cache lacks."""
        captions = [str(c) for c in captions]
        found = [self._rows.get(caption_key(c)) for c in captions]
        missing = [c for c, at in zip(captions, found, strict=True) if at is None]
        if missing:
            named = ", ".join(repr(c) for c in missing[:_MAX_NAMED])
            more = f" and {len(missing) - _MAX_NAMED} more" if len(missing) > _MAX_NAMED else ""
            raise CacheError(
                f"{len(missing)} of {len(captions)} captions are not in the text cache "
                f"{self.directory}: {named}{more}"
            )
        b = len(captions)
        emb = np.empty((b, self.max_length, self.dim), np.float32)
        mask = np.empty((b, self.max_length), bool)
        pooled = np.empty((b, self.pooled_dim), np.float32) if self.pooled_dim else None
        shard_of = np.array([s for s, _ in found])
        row_of = np.array([r for _, r in found])
        for s in np.unique(shard_of):
            at = np.flatnonzero(shard_of == s)
            rows = row_of[at]
            emb[at] = self._shards[s]["embeddings"][rows]
            mask[at] = self._shards[s]["mask"][rows]
            if pooled is not None:
                pooled[at] = self._shards[s]["pooled"][rows]
        return TextEmbeddings(emb, mask, pooled)


class CachedTextEncoder:
    """The trainer's TextEncoder protocol (`encode(prompts)`, `max_length`) answered from a
    cache: it stands wherever an encoder is used, for the cached captions only."""

    def __init__(self, cache: EmbeddingCache):
        self.cache = cache
        self.max_length = cache.max_length
        self.pooled_conditions = cache.pooled_conditions

    def encode(self, prompts: Sequence[str]) -> TextEmbeddings:
        """prompts -> (embeddings float32 [B, L, D], mask bool [B, L], pooled [B, P] or None)."""
        return self.cache.lookup(prompts)

    __call__ = encode

    def fingerprint(self) -> dict:
        return self.cache.fingerprint


def _read_index(directory: str) -> dict:
    file = os.path.join(directory, INDEX)
    if not os.path.isfile(file):
        raise CacheError(
            f"{file} does not exist: {directory} is not a text cache, or its build did not "
            "finish (process 0 writes it last)"
        )
    with open(file) as f:
        try:
            meta = json.load(f)
        except json.JSONDecodeError as e:
            raise CacheError(f"{file} is not JSON ({e})") from None
    if not isinstance(meta, dict) or meta.get("format") != FORMAT:
        got = meta.get("format") if isinstance(meta, dict) else None
        raise CacheError(f"{file} has format {got!r}; this code reads {FORMAT!r}")
    return meta


def _check_fingerprint(cached: dict, expected: dict, directory: str) -> None:
    expected = json.loads(json.dumps(expected))  # tuples -> lists, as stored
    diffs = [
        f"{k}: cache {cached.get(k)!r}, encoder {expected.get(k)!r}"
        for k in sorted(set(cached) | set(expected))
        if cached.get(k) != expected.get(k)
    ]
    if diffs:
        raise CacheError(
            f"the text cache {directory} was written by another encoder; " + "; ".join(diffs)
        )


def _open_shard(file: str, meta: dict) -> dict[str, np.memmap]:
    """The tensors of one shard as read-only memory maps, checked against cache.json."""
    if not os.path.isfile(file):
        raise CacheError(f"{file} is missing (listed in {INDEX})")
    try:
        tensors = read_safetensors_header(file)
    except CheckpointError as e:
        raise CacheError(str(e)) from None
    size, end = os.path.getsize(file), max((t.end for t in tensors.values()), default=0)
    if size < end:
        raise CacheError(f"{file} is truncated: {size} bytes, its header needs {end}")
    n = tensors["key"].shape[0] if "key" in tensors else 0
    code = DTYPES[meta["dtype"]]
    length, dim, pdim = meta["max_length"], meta["dim"], meta["pooled_dim"]
    expected = {
        "key": ("U8", (n, 32)),
        "embeddings": (code, (n, length, dim)),
        "mask": ("BOOL", (n, length)),
    }
    if pdim:
        expected["pooled"] = (code, (n, pdim))
    got = {name: (t.dtype, t.shape) for name, t in tensors.items()}
    if got != expected:
        raise CacheError(f"{file} holds tensors {got}; {INDEX} says {expected}")
    return {  # np.memmap cannot map 0 bytes: an empty shard gets empty arrays
        name: np.memmap(file, _NUMPY[t.dtype], mode="r", offset=t.start, shape=t.shape)
        if n
        else np.zeros(t.shape, _NUMPY[t.dtype])
        for name, t in tensors.items()
    }
