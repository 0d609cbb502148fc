"""Writing output files: atomically (a temporary file in the same folder, then
`os.replace`), with the permissions of an ordinary file (0666 less the umask; `mkstemp`'s
own 0600 would hide the outputs from the rest of a group), and the content hashes that
identify weights."""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import tempfile
from collections.abc import Iterator

TMP_SUFFIX = ".tmp"  # every temporary file ends so; `remove_temporaries` finds them


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


@contextlib.contextmanager
def atomic_write(path: str, mode: str = "wb") -> Iterator:
    """`with atomic_write(path) as f: f.write(...)`: the file appears whole at `path` or not
    at all; a failure (or a kill) leaves at most a `*.tmp` file beside it."""
    folder = os.path.dirname(path) or "."
    fd, tmp = tempfile.mkstemp(dir=folder, prefix=os.path.basename(path) + ".", suffix=TMP_SUFFIX)
    try:
        os.fchmod(fd, 0o666 & ~_umask())
        with os.fdopen(fd, mode) as f:
            yield f
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise


def remove_temporaries(folder: str) -> int:
    """Removes the `*.tmp` files that killed writers left in `folder`; returns their count.
    Call it only where no other writer is running."""
    if not os.path.isdir(folder):
        return 0
    names = [n for n in os.listdir(folder) if n.endswith(TMP_SUFFIX)]
    for name in names:
        os.remove(os.path.join(folder, name))
    return len(names)


def file_sha256(path: str, chunk: int = 1 << 22) -> str:
    """The hex SHA-256 of a file's bytes, read in chunks."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


WEIGHT_SUFFIXES = (".safetensors", ".json", ".txt", ".model")  # weights, configs, vocabularies


def folder_sha256(folder: str, suffixes=WEIGHT_SUFFIXES) -> str:
    """One SHA-256 over the files of a model folder (recursively) whose names end in
    `suffixes`: the relative path and the content hash of each, in sorted order."""
    entries = []
    for root, dirs, names in os.walk(folder):
        dirs[:] = sorted(d for d in dirs if not d.startswith("."))
        for name in names:
            if name.endswith(suffixes) and not name.startswith("."):
                path = os.path.join(root, name)
                entries.append((os.path.relpath(path, folder), file_sha256(path)))
    h = hashlib.sha256()
    for rel, digest in sorted(entries):
        h.update(f"{rel}\0{digest}\n".encode())
    return h.hexdigest()


def read_jsonl(path: str | os.PathLike, *, key: str | None = "file") -> list[tuple[int, dict]]:
    """(line number, object) of each non-blank line of a JSONL file (a manifest, a captions
    file), each a JSON object with a string under `key` (None: any object). An error names
    the file and the line."""
    out = []
    with open(path, encoding="utf-8") as f:
        for n, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as e:
                raise ValueError(f"{path}:{n}: not valid JSON ({e.msg})") from None
            if not isinstance(obj, dict) or (key is not None and not isinstance(obj.get(key), str)):
                wanted = f" with a string {key!r}" if key else ""
                raise ValueError(f"{path}:{n}: expected a JSON object{wanted}")
            out.append((n, obj))
    return out
