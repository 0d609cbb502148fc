"""Small image-caption data sets written with PIL into tmp_path: folders and tar shards."""

import io
import pathlib
import tarfile

import numpy as np
import pytest
from PIL import Image


def make_image(seed: int, height: int, width: int) -> np.ndarray:
    """A smooth random uint8 [H, W, 3] image (three plane waves), distinct per seed."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:height, 0:width] / max(height, width)
    coeffs = rng.uniform(-1, 1, (3, 3))
    channels = [128 + 100 * np.sin(3 * (a * x + b * y) + c) for a, b, c in coeffs]
    return np.clip(np.stack(channels, -1), 0, 255).astype(np.uint8)


def encode(image: np.ndarray, fmt: str = "png") -> bytes:
    buf = io.BytesIO()
    Image.fromarray(image).save(buf, format={"jpg": "JPEG"}.get(fmt, fmt.upper()))
    return buf.getvalue()


class Dataset:
    """Records {key: (image bytes, image extension, caption or None)} and their writers."""

    def __init__(self, num: int, *, seed: int = 0, sizes=((24, 40), (40, 24), (32, 32))):
        self.records: dict[str, tuple[bytes, str, str | None]] = {}
        self.images: dict[str, np.ndarray] = {}
        for i in range(num):
            key = f"d{i % 3}/img{i:03d}"  # nested folders
            image = make_image(seed * 1000 + i, *sizes[i % len(sizes)])
            self.images[key] = image
            self.records[key] = (encode(image), "png", f"caption {i}")

    def add(self, key: str, data: bytes, ext: str = "png", caption: str | None = "x"):
        self.records[key] = (data, ext, caption)
        return self

    def members(self):
        for key, (data, ext, caption) in sorted(self.records.items()):
            yield f"{key}.{ext}", data
            if caption is not None:
                yield f"{key}.txt", f"{caption}\n".encode()

    def write_folder(self, root: pathlib.Path) -> pathlib.Path:
        for name, data in self.members():
            (root / name).parent.mkdir(parents=True, exist_ok=True)
            (root / name).write_bytes(data)
        return root

    def write_shards(self, root: pathlib.Path, per_shard: int) -> list[pathlib.Path]:
        root.mkdir(parents=True, exist_ok=True)
        members = list(self.members())
        keys = sorted(self.records)
        shards = []
        for start in range(0, len(keys), per_shard):
            shard = root / f"shard-{len(shards):05d}.tar"
            chunk = set(keys[start : start + per_shard])
            with tarfile.open(shard, "w") as tar:
                for name, data in members:
                    if name.rsplit(".", 1)[0] in chunk:
                        info = tarfile.TarInfo(name)
                        info.size = len(data)
                        tar.addfile(info, io.BytesIO(data))
            shards.append(shard)
        return shards


@pytest.fixture
def dataset():
    return Dataset
