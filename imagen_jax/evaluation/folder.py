"""FID and KID of a folder of generated images (what `eval/fid.py` runs).

The images are those that `manifest.jsonl` lists (one JSON object per line with a "file"
relative to the folder, as `imagen_jax/shapes/accuracy.py` documents; other fields are
ignored), or, without a manifest, every PNG / JPEG under the folder (recursively, sorted).
Each is read with Pillow and converted to RGB, as pytorch-fid does.

The result names what the number depends on: the Inception weights file (path and
SHA-256), the resize convention, the image count, and the reference files.
"""

from __future__ import annotations

import collections
import json
import os
import pathlib
from collections.abc import Iterator
from typing import Any

import numpy as np
from PIL import Image

from imagen_jax import files as files_lib
from imagen_jax.evaluation import fid, inception

MANIFEST = "manifest.jsonl"
IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg")
GRID = "grid.png"  # a sampling job's contact sheet, beside its manifest


def list_images(folder: str | os.PathLike) -> list[pathlib.Path]:
    """The image files of a folder: its manifest's entries in order, else every PNG/JPEG."""
    folder = pathlib.Path(folder)
    if not folder.is_dir():
        raise FileNotFoundError(f"samples folder {str(folder)!r} does not exist")
    manifest = folder / MANIFEST
    if manifest.is_file():
        files = []
        for i, entry in files_lib.read_jsonl(manifest):
            path = folder / entry["file"]
            if not path.is_file():
                raise FileNotFoundError(f"{manifest}:{i}: image {str(path)!r} is missing")
            files.append(path)
        if not files:
            raise ValueError(f"{manifest} lists no images")
        return files
    files = sorted(
        p for p in folder.rglob("*") if p.suffix.lower() in IMAGE_EXTENSIONS and p.is_file()
    )
    if not files:
        raise ValueError(
            f"no images in {str(folder)!r}: expected {MANIFEST} or PNG/JPEG files "
            f"({', '.join(IMAGE_EXTENSIONS)})"
        )
    return files


def read_manifest(
    folder: str | os.PathLike, *, purpose: str = "evaluation"
) -> list[tuple[pathlib.Path, dict[str, Any]]]:
    """(image file, record) of every line of `folder/manifest.jsonl` (sample.py's: one JSON
    object per image with "file", relative to the folder, and "prompt"; other fields are
    kept), checked against the folder: every listed file exists, none is listed twice, and
    no PNG/JPEG beside the listed files is left out (a stale manifest; a job's `grid.png`
    is not a sample). `purpose` names what needs the prompts, in error messages."""
    folder = pathlib.Path(folder)
    if not folder.is_dir():
        raise FileNotFoundError(f"samples folder {str(folder)!r} does not exist")
    manifest = folder / MANIFEST
    if not manifest.is_file():
        raise FileNotFoundError(
            f"no {MANIFEST} in {str(folder)!r}: {purpose} needs each image's prompt, one JSON "
            'object per line with "file" and "prompt" (sample.py writes it)'
        )
    records, seen = [], {}
    for i, line in enumerate(manifest.read_text(encoding="utf-8").splitlines(), 1):
        if not line.strip():
            continue
        try:
            entry = json.loads(line)
        except json.JSONDecodeError as e:
            raise ValueError(f"{manifest}:{i}: not JSON ({e})") from None
        if not isinstance(entry, dict) or not all(
            isinstance(entry.get(k), str) for k in ("file", "prompt")
        ):
            raise ValueError(f"{manifest}:{i}: expected an object with string 'file' and 'prompt'")
        path = folder / entry["file"]
        if not path.is_file():
            raise FileNotFoundError(
                f"{manifest}:{i}: image {str(path)!r} is missing: the manifest does not match "
                "the folder"
            )
        key = path.resolve()
        if key in seen:
            raise ValueError(
                f"{manifest}:{i}: {entry['file']!r} is listed again (line {seen[key]})"
            )
        seen[key] = i
        records.append((path, entry))
    if not records:
        raise ValueError(f"{manifest} lists no images: {purpose} needs at least 1")
    _check_unlisted(manifest, set(seen))
    return records


def _check_unlisted(manifest: pathlib.Path, listed: set[pathlib.Path]) -> None:
    dirs = {p.parent for p in listed}
    unlisted = sorted(
        p
        for d in dirs
        for p in d.iterdir()
        if p.suffix.lower() in IMAGE_EXTENSIONS
        and p.is_file()
        and p.name != GRID
        and p.resolve() not in listed
    )
    if unlisted:
        raise ValueError(
            f"{manifest} does not match the folder: {len(unlisted)} image(s) beside the listed "
            f"ones are not in it, e.g. {str(unlisted[0])!r} (rebuild the manifest, e.g. rerun "
            "the sampling job, which writes it from the images at its end)"
        )


def load_image(path: str | os.PathLike) -> np.ndarray:
    """A uint8 RGB image [H, W, 3]."""
    with Image.open(path) as im:
        return np.asarray(im.convert("RGB"))


def folder_features(
    folder: str | os.PathLike, extractor: inception.FeatureExtractor
) -> tuple[np.ndarray, list[pathlib.Path]]:
    """Pool3 features [N, 2048] float32 of the folder's N images, and the image files."""
    files = list_images(folder)
    return extractor(_images(files)), files


def _images(files: list[pathlib.Path]) -> Iterator[np.ndarray]:
    for path in files:
        yield load_image(path)


def _check_reference(stats: dict, path: str, resize: str) -> None:
    if stats["mu"].shape != (inception.FEATURE_DIM,):
        raise ValueError(
            f"reference statistics {path!r} have dimension {stats['mu'].shape[0]}, not the "
            f"{inception.FEATURE_DIM} of pool3 features"
        )
    if stats.get("resize", resize) != resize:
        raise ValueError(
            f"reference statistics {path!r} were computed with resize={stats['resize']!r}, "
            f"not {resize!r}: FIDs across conventions are not comparable"
        )


def evaluate_folder(
    folder: str | os.PathLike,
    *,
    inception_path: str | os.PathLike,
    ref_stats: str | os.PathLike | None = None,
    kid_ref_features: str | os.PathLike | None = None,
    resize: str = "pytorch_fid",
    batch_size: int = 50,
    kid_subsets: int = fid.KID_SUBSETS,
    kid_subset_size: int = fid.KID_SUBSET_SIZE,
    kid_seed: int = fid.KID_SEED,
    save_stats: str | os.PathLike | None = None,
    save_features: str | os.PathLike | None = None,
    devices=None,
) -> dict[str, Any]:
    """FID against `ref_stats` and KID against `kid_ref_features` (each if given) of the
    folder's images; also writes the folder's statistics / features if asked.

    KID's subset size is `kid_subset_size` capped at the smaller image count (recorded).
    Returns a JSON-able dict: samples, num_images, inception {path, sha256}, resize, and
    fid / kid blocks.
    """
    inception.check_resize(resize)
    files = list_images(folder)  # the inputs are checked before the long part
    reference = None
    if ref_stats is not None:
        reference = fid.load_stats(ref_stats)
        _check_reference(reference, os.fspath(ref_stats), resize)
    if (ref_stats is not None or save_stats is not None) and len(files) < 2:
        raise ValueError(
            f"{os.fspath(folder)!r} holds {len(files)} image: FID statistics need at least 2"
        )
    ref_features = None
    if kid_ref_features is not None:
        ref_features = fid.load_features(kid_ref_features)
        if ref_features.shape[1] != inception.FEATURE_DIM:
            raise ValueError(
                f"KID reference features {os.fspath(kid_ref_features)!r} have dimension "
                f"{ref_features.shape[1]}, not {inception.FEATURE_DIM}"
            )
    extractor = inception.FeatureExtractor(
        inception.load_inception(inception_path),
        resize=resize,
        batch_size=batch_size,
        devices=devices,
    )
    sizes: collections.Counter = collections.Counter()

    def counted(images):
        for image in images:
            sizes[f"{image.shape[0]}x{image.shape[1]}"] += 1
            yield image

    features = extractor(counted(_images(files)))  # [N, 2048]
    result: dict[str, Any] = {
        "samples": os.fspath(folder),
        "num_images": len(files),
        # height x width -> count: mixed sizes are each resized by the convention
        "image_sizes": dict(sorted(sizes.items())),
        "inception": {
            "path": os.fspath(inception_path),
            "sha256": inception.file_sha256(inception_path),
        },
        "resize": resize,
    }
    if save_features is not None:
        fid.save_features(save_features, features)
        result["saved_features"] = os.fspath(save_features)
    if reference is not None or save_stats is not None:
        mu, sigma = fid.statistics(features)
        if save_stats is not None:
            fid.save_stats(save_stats, mu, sigma, num_images=len(files), resize=resize)
            result["saved_stats"] = os.fspath(save_stats)
        if reference is not None:
            result["fid"] = fid.frechet_distance(mu, sigma, reference["mu"], reference["sigma"])
            result["ref_stats"] = os.fspath(ref_stats)
            result["ref_num_images"] = reference.get("num_images")
    if ref_features is not None:
        size = min(kid_subset_size, len(features), len(ref_features))
        mean, std = fid.kernel_inception_distance(
            features, ref_features, num_subsets=kid_subsets, subset_size=size, seed=kid_seed
        )
        result["kid"] = {
            "mean": mean,
            "std": std,
            "num_subsets": kid_subsets,
            "subset_size": size,
            "seed": kid_seed,
            "ref_features": os.fspath(kid_ref_features),
            "ref_num_images": len(ref_features),
        }
    return result
