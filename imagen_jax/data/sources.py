"""Random-access image-caption sources (grain's `RandomAccessDataSource` protocol).

A source has `__len__` and `__getitem__(index) -> {"image": uint8 [H, W, 3] RGB,
"caption": str, "key": str}`, in a fixed order. A record whose image cannot be decoded
raises `CorruptRecordError` (its message names the file or shard and key); the pipeline
skips and counts such records. Any other error is a bug or a broken disk and propagates.

* `ImageFolderSource`: `a/b/c.jpg` + `a/b/c.txt` under a root folder.
* `TarShardSource`: webdataset-layout tar shards (`key.jpg` + `key.txt` members), indexed
  once at construction, then read member by member at their offsets.
* `TfdsSource`: a `tensorflow_datasets` data source (only if that package is installed).

Sources hold only paths and small index arrays, so they pickle cheaply into grain's
worker processes; files are opened per read.
"""

from __future__ import annotations

import glob
import os
import pathlib
import tarfile
from collections.abc import Sequence
from typing import Any

import numpy as np
from absl import logging

from imagen_jax.data.preprocess import (
    CorruptRecordError,
    decode_image_and_size,
    image_header_size,
)

IMAGE_EXTENSIONS = ("jpg", "jpeg", "png", "webp")
MISSING_CAPTION = ("error", "skip", "empty")  # what to do with an image that has no .txt


def _check_missing_caption(missing_caption: str) -> None:
    if missing_caption not in MISSING_CAPTION:
        raise ValueError(f"missing_caption={missing_caption!r}; expected one of {MISSING_CAPTION}")


def _read_caption(data: bytes) -> str:
    return data.decode("utf-8", errors="replace").strip()


class ImageFolderSource:
    """Images under `path` (nested folders allowed), each captioned by a `.txt` of its stem.

    Records are sorted by relative path; the key is that path without its extension.
    Hidden files and folders (names starting with ".") are ignored. `missing_caption`
    says what an image without a caption file does: "error" (raise, naming the file),
    "skip" (leave it out; the number left out is `num_missing_captions`) or "empty"
    (caption "").

    `min_decode_size`: if set (to the stage resolution), large JPEGs decode at a reduced
    scale, faster; see `preprocess.decode_image`. None decodes every image at full size.
    """

    def __init__(
        self,
        path: str | os.PathLike,
        *,
        missing_caption: str = "error",
        min_decode_size: int | None = None,
    ):
        _check_missing_caption(missing_caption)
        self.min_decode_size = min_decode_size
        self.root = pathlib.Path(path)
        if not self.root.is_dir():
            raise FileNotFoundError(f"ImageFolderSource: no such folder: {self.root}")
        images, captions = _list_folder(self.root)
        self.num_missing_captions = 0
        self._images: list[str] = []  # relative paths
        self._captions: list[str | None] = []  # relative paths, None: no caption file
        for stem, image in sorted(images.items()):
            caption = captions.get(stem)
            if caption is None and missing_caption == "error":
                raise FileNotFoundError(
                    f"ImageFolderSource: image {self.root / image} has no caption file "
                    f"{self.root / stem}.txt (pass missing_caption='skip' or 'empty')"
                )
            if caption is None and missing_caption == "skip":
                self.num_missing_captions += 1
                continue
            self._images.append(image)
            self._captions.append(caption)
        if self.num_missing_captions:
            logging.warning(
                "ImageFolderSource %s: skipped %d images without a caption file",
                self.root,
                self.num_missing_captions,
            )
        if not self._images:
            raise ValueError(f"ImageFolderSource: no captioned images in {self.root}")

    def __len__(self) -> int:
        return len(self._images)

    def __getitem__(self, index: int) -> dict[str, Any]:
        image_path = self.root / self._images[index]
        key = self._images[index].rsplit(".", 1)[0]
        caption_path = self._captions[index]
        caption = (
            "" if caption_path is None else _read_caption((self.root / caption_path).read_bytes())
        )
        image, size = decode_image_and_size(
            image_path.read_bytes(), name=str(image_path), min_size=self.min_decode_size
        )
        return {"image": image, "caption": caption, "key": key, "size": size}

    def image_shape(self, index: int) -> tuple[int, int]:
        """(height, width) of record `index`'s image, from its file's header."""
        path = self.root / self._images[index]
        return image_header_size(path, name=str(path))

    def __repr__(self) -> str:
        return f"ImageFolderSource({str(self.root)!r}, {len(self)} records)"


def _list_folder(root: pathlib.Path) -> tuple[dict[str, str], dict[str, str]]:
    """Maps relative stem -> relative path of its image, and of its caption file."""
    images: dict[str, str] = {}
    captions: dict[str, str] = {}
    for dirpath, dirnames, filenames in os.walk(root, followlinks=True):
        dirnames[:] = [d for d in dirnames if not d.startswith(".")]
        rel_dir = pathlib.Path(dirpath).relative_to(root).as_posix()
        prefix = "" if rel_dir == "." else rel_dir + "/"
        for filename in filenames:
            if filename.startswith("."):
                continue
            stem, _, ext = filename.rpartition(".")
            ext = ext.lower()
            if ext == "txt":
                captions[prefix + stem] = prefix + filename
            elif ext in IMAGE_EXTENSIONS and stem:
                if prefix + stem in images:
                    raise ValueError(
                        f"ImageFolderSource: {root / images[prefix + stem]} and "
                        f"{root / prefix / filename} share the caption file {stem}.txt"
                    )
                images[prefix + stem] = prefix + filename
    return images, captions


class TarShardSource:
    """Records of webdataset-layout tar shards: members `<key>.<ext>` grouped by key.

    A record is a key with an image member (jpg, jpeg, png or webp) and a `txt` member
    (other members are ignored). Shards are uncompressed tar files, given as a glob
    pattern (sorted) or a list of paths (in that order); records follow shard order, then
    member order. The index (shard, offset, size of each member) is built here; reads
    are lazy. `missing_caption` and `min_decode_size` work as in `ImageFolderSource`.
    """

    def __init__(
        self,
        shards: str | os.PathLike | Sequence[str | os.PathLike],
        *,
        missing_caption: str = "error",
        min_decode_size: int | None = None,
    ):
        _check_missing_caption(missing_caption)
        self.min_decode_size = min_decode_size
        self.shards = _expand_shards(shards)
        self.num_missing_captions = 0
        columns: dict[str, list] = {c: [] for c in ("shard", "image", "caption", "key")}
        for shard_index, shard in enumerate(self.shards):
            for key, image, caption in _index_shard(shard):
                if caption is None and missing_caption == "error":
                    raise ValueError(
                        f"TarShardSource: shard {shard}: image {key} has no {key}.txt "
                        "caption member (pass missing_caption='skip' or 'empty')"
                    )
                if caption is None and missing_caption == "skip":
                    self.num_missing_captions += 1
                    continue
                columns["shard"].append(shard_index)
                columns["image"].append(image)
                columns["caption"].append(caption or (-1, 0))
                columns["key"].append(key)
        if not columns["key"]:
            raise ValueError(f"TarShardSource: no captioned images in {self.shards}")
        self._shard = np.asarray(columns["shard"], np.int32)
        self._image = np.asarray(columns["image"], np.int64)  # [N, 2]: offset, size
        self._caption = np.asarray(columns["caption"], np.int64)  # offset -1: no caption
        self._key = columns["key"]

    def __len__(self) -> int:
        return len(self._key)

    def __getitem__(self, index: int) -> dict[str, Any]:
        shard, key = self.shards[self._shard[index]], self._key[index]
        name = f"{shard}:{key}"
        with open(shard, "rb") as f:
            image_bytes = _read_member(f, *self._image[index], name=name)
            caption_offset, caption_size = self._caption[index]
            caption = ""
            if caption_offset >= 0:
                caption = _read_caption(_read_member(f, caption_offset, caption_size, name=name))
        image, size = decode_image_and_size(image_bytes, name=name, min_size=self.min_decode_size)
        return {"image": image, "caption": caption, "key": key, "size": size}

    def image_shape(self, index: int) -> tuple[int, int]:
        """(height, width) of record `index`'s image, from its member's header."""
        shard, key = self.shards[self._shard[index]], self._key[index]
        name = f"{shard}:{key}"
        with open(shard, "rb") as f:
            return image_header_size(_read_member(f, *self._image[index], name=name), name=name)

    def __repr__(self) -> str:
        return f"TarShardSource({len(self.shards)} shards, {len(self)} records)"


def _expand_shards(shards) -> list[str]:
    if isinstance(shards, str | os.PathLike):
        pattern = os.fspath(shards)
        paths = sorted(glob.glob(pattern)) if glob.has_magic(pattern) else [pattern]
    else:
        pattern, paths = list(map(os.fspath, shards)), list(map(os.fspath, shards))
    if not paths:
        raise FileNotFoundError(f"TarShardSource: no shards match {pattern!r}")
    for path in paths:
        if not os.path.isfile(path):
            raise FileNotFoundError(f"TarShardSource: no such shard: {path}")
    return paths


def _index_shard(shard: str):
    """Yields (key, (offset, size) of the image, (offset, size) of the caption or None)."""
    members: dict[str, dict[str, tuple[int, int]]] = {}
    try:
        with tarfile.open(shard, mode="r:") as tar:  # "r:": uncompressed, seekable members.
            for member in tar:
                if not member.isfile():
                    continue
                directory, _, filename = member.name.rpartition("/")
                stem, dot, ext = filename.partition(".")  # webdataset: key ends at first dot
                if not dot or not stem:
                    continue
                key = f"{directory}/{stem}" if directory else stem
                members.setdefault(key, {})[ext.lower()] = (member.offset_data, member.size)
    except (tarfile.TarError, OSError) as e:
        raise ValueError(f"TarShardSource: cannot index shard {shard}: {e}") from e
    size = os.path.getsize(shard)
    for key, parts in members.items():
        image = next((parts[ext] for ext in IMAGE_EXTENSIONS if ext in parts), None)
        if image is None:
            continue
        if sum(image) > size:
            raise ValueError(f"TarShardSource: shard {shard} is truncated (member {key})")
        yield key, image, parts.get("txt")


def _read_member(f, offset: int, size: int, *, name: str) -> bytes:
    f.seek(int(offset))
    data = f.read(int(size))
    if len(data) != size:
        raise CorruptRecordError(f"{name}: member truncated ({len(data)} of {size} bytes)")
    return data


class TfdsSource:
    """A `tensorflow_datasets` data source (`tfds.data_source`, array_record format).

    `image_key` and `caption_key` name the features that become "image" and "caption"
    (captions may be bytes or str); `key_key`, if given, names a feature for "key",
    otherwise the key is "<name>/<split>/<index>". Needs the tfds extra:
    `pip install tensorflow-datasets` (not a dependency of imagen_jax).
    """

    def __init__(
        self,
        name: str,
        *,
        split: str,
        data_dir: str | None = None,
        image_key: str = "image",
        caption_key: str = "caption",
        key_key: str | None = None,
    ):
        try:
            import tensorflow_datasets as tfds
        except ImportError as e:
            raise ImportError(
                "TfdsSource needs tensorflow_datasets, which is not installed; install the "
                "tfds extra: pip install tensorflow-datasets"
            ) from e
        self.name, self.split = name, split
        self._image_key, self._caption_key, self._key_key = image_key, caption_key, key_key
        self._source = tfds.data_source(name, split=split, data_dir=data_dir)

    def __len__(self) -> int:
        return len(self._source)

    def __getitem__(self, index: int) -> dict[str, Any]:
        features = self._source[index]
        image = np.asarray(features[self._image_key], np.uint8)
        if image.ndim == 2 or image.shape[-1] == 1:  # grayscale
            image = np.repeat(image.reshape(*image.shape[:2], 1), 3, axis=-1)
        caption = features[self._caption_key]
        caption = caption.decode("utf-8") if isinstance(caption, bytes) else str(caption)
        key = features[self._key_key] if self._key_key else f"{self.name}/{self.split}/{index}"
        key = key.decode("utf-8") if isinstance(key, bytes) else str(key)
        return {"image": image[..., :3], "caption": caption, "key": key}


__all__ = [
    "IMAGE_EXTENSIONS",
    "CorruptRecordError",
    "ImageFolderSource",
    "TarShardSource",
    "TfdsSource",
]
