"""CLIP score of images and their captions (Hessel et al. 2021, "CLIPScore: A Reference-free
Evaluation Metric for Image Captioning", eq. 1), computed as torchmetrics' `CLIPScore`.

    scorer = load_clip_scorer("/models/clip-vit-large-patch14")
    result = scorer.score(images, prompts)  # {"score", "n", "backbone", "clamp", ...}

For each (image, caption) pair, cos = <E_I, E_C> / (|E_I| |E_C|), where E_I is CLIPModel's
`get_image_features` (the projected class token) and E_C its `get_text_features` (the
projected end-of-text state). Over N pairs the score is

* clamp="mean" (default): max(100 * mean(cos), 0), what torchmetrics' `CLIPScore.compute`
  and functional `clip_score` return (they clamp the mean, not each pair);
* clamp="pair": mean(100 * max(cos, 0)), the paper's CLIP-S with w = 100 (the formula
  in torchmetrics' docstring).

They agree when every cosine is positive, as for real CLIP models on images and their
captions. The number depends on the backbone (torchmetrics' default is
openai/clip-vit-large-patch14), so every result names it (`backbone_name`).

Captions are tokenized from `tokenizer.json` to the text tower's 77 positions. A longer
caption loses its tail but keeps its end-of-text token (as OpenAI's
`clip.tokenize(truncate=True)`) and a warning counts such captions; torchmetrics cuts the
ids after 77, end-of-text token included, and so pools another token: for those captions
the two differ. Images are uint8 RGB, preprocessed by `imagen_jax.images.ImageProcessor` (the
same pixel values as transformers' PIL backend).

An in-domain score: `load_clip_scorer` also takes any other image-text embedding model
directory that `pipelines.embedding` loads (the shapes embedding model that
`configs/shapes_embedding.py` trains, a SiglipModel): the same 100 * cos of its two
embeddings, clamped the same way, its directory named as the backbone. Such scores are
comparable between text-to-image models, not with CLIP's.

The model is a local directory of a full CLIPModel in Hugging Face layout: config.json,
model.safetensors, tokenizer.json (+ tokenizer_config.json, special_tokens_map.json) and
preprocessor_config.json, as published on the Hugging Face hub (e.g.
openai/clip-vit-large-patch14) and downloaded by the user. Both towers load strictly:
every tensor is read (`models.two_towers.load_clip`), only position_ids buffers are skipped.
"""

from __future__ import annotations

import os
import pathlib
import re
from collections.abc import Iterable, Iterator, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from imagen_jax import parallel
from imagen_jax.evaluation.folder import load_image, read_manifest
from imagen_jax.images import PREPROCESSOR_FILE, ImageProcessor
from imagen_jax.models import two_towers
from imagen_jax.models.two_towers import CLIPModel
from imagen_jax.pipelines import embedding
from imagen_jax.text.tokenizer import TOKENIZER_FILE, Tokenizer
from imagen_jax.weights import (
    CONFIG_NAME,
    INDEX_NAME,
    WEIGHTS_NAME,
    read_config,
)

CLAMPS = ("mean", "pair")
DEFAULT_BACKBONE = "openai/clip-vit-large-patch14"  # torchmetrics' default
_DOWNLOAD_HINT = (
    f"CLIP score needs a full CLIPModel in a local directory: {CONFIG_NAME}, {WEIGHTS_NAME}, "
    f"{TOKENIZER_FILE}, tokenizer_config.json, special_tokens_map.json and "
    f"{PREPROCESSOR_FILE}, as published on the Hugging Face hub, e.g. "
    f"{DEFAULT_BACKBONE} (torchmetrics' default); download them there yourself, e.g. "
    f"`hf download {DEFAULT_BACKBONE} --local-dir DIR` where the hub can be reached"
)


# ----------------------------------------------------------------------------------------------
# The model: both towers (`models.two_towers.CLIPModel`)
# ----------------------------------------------------------------------------------------------


def check_model_dir(path: str | os.PathLike) -> None:
    """Raises FileNotFoundError naming every file of a CLIP model directory that is absent
    (and where such models are published)."""
    path = os.fspath(path)
    if not os.path.isdir(path):
        raise FileNotFoundError(f"CLIP model directory {path!r} does not exist. {_DOWNLOAD_HINT}")
    missing = [
        name
        for name in (CONFIG_NAME, TOKENIZER_FILE, PREPROCESSOR_FILE)
        if not os.path.isfile(os.path.join(path, name))
    ]
    if not any(os.path.isfile(os.path.join(path, f)) for f in (WEIGHTS_NAME, INDEX_NAME)):
        others = sorted(f for f in os.listdir(path) if f.endswith((".bin", ".pt", ".msgpack")))
        found = f" (it has {', '.join(others)}: not read; convert to safetensors)" if others else ""
        missing.insert(0, f"{WEIGHTS_NAME}{found}")
    if missing:
        raise FileNotFoundError(f"{path} lacks {'; '.join(missing)}. {_DOWNLOAD_HINT}")


def load_clip_model(path: str | os.PathLike, *, dtype=jnp.float32) -> CLIPModel:
    """Both towers of a CLIPModel directory, every tensor checked (`two_towers.load_clip`)."""
    return two_towers.load_clip(path, dtype=dtype)


_HUB_ID = re.compile(r"[\w.-]+/[\w.-]+")


def backbone_name(path: str | os.PathLike, hf_config: dict | None = None) -> str:
    """The name a score is reported with: config.json's `_name_or_path` if it is a hub id
    ("org/name", not a local path); else "org/name" from a hub cache snapshot
    (`models--org--name/snapshots/<hash>`); else the directory's name."""
    name = (hf_config or {}).get("_name_or_path")
    if isinstance(name, str) and _HUB_ID.fullmatch(name) and not os.path.exists(name):
        return name
    parts = os.path.normpath(os.path.abspath(path)).split(os.sep)
    if len(parts) >= 3 and parts[-2] == "snapshots" and parts[-3].startswith("models--"):
        return parts[-3].removeprefix("models--").replace("--", "/")
    return parts[-1]


# ----------------------------------------------------------------------------------------------
# Scores
# ----------------------------------------------------------------------------------------------


def pair_scores(image_embeds: np.ndarray, text_embeds: np.ndarray) -> np.ndarray:
    """100 * cos of each pair, [N] float64, from embeddings [N, P] (not normalized)."""
    a = np.asarray(image_embeds, np.float64)
    b = np.asarray(text_embeds, np.float64)
    if a.shape != b.shape or a.ndim != 2 or len(a) == 0:
        raise ValueError(f"expected two non-empty [N, P] arrays, got {a.shape} and {b.shape}")
    a = a / np.linalg.norm(a, axis=-1, keepdims=True)
    b = b / np.linalg.norm(b, axis=-1, keepdims=True)
    return 100.0 * (a * b).sum(axis=-1)


def clip_score(image_embeds: np.ndarray, text_embeds: np.ndarray, *, clamp: str = "mean") -> float:
    """The CLIP score of N pairs of embeddings [N, P] (see the module docstring for clamp)."""
    if clamp not in CLAMPS:
        raise ValueError(f"clamp must be one of {CLAMPS}, got {clamp!r}")
    scores = pair_scores(image_embeds, text_embeds)
    if clamp == "pair":
        return float(np.maximum(scores, 0.0).mean())
    return float(max(scores.mean(), 0.0))


def _image_features(graphdef, state, pixel_values):
    return two_towers.image_embeds(graphdef, state, pixel_values, normalize=False)


def _text_features(graphdef, state, input_ids, attention_mask):
    return two_towers.text_embeds(graphdef, state, input_ids, attention_mask, normalize=False)


class CLIPScorer:
    """A CLIPModel with its tokenizer and image preprocessing, run in batches of a fixed size
    sharded over the local devices (a 1-D "data" mesh; the last batch is padded), so one
    program is compiled per tower.

    Matmuls run at full float32 precision ("highest"): on GPUs the default would use TF32
    and move the score in its third digit.
    """

    def __init__(
        self,
        model: CLIPModel,
        tokenizer: Tokenizer,
        processor: ImageProcessor,
        *,
        backbone: str,
        batch_size: int = 32,
        devices: Sequence[jax.Device] | None = None,
    ):
        size = model.vision_model.config.image_size
        if processor.crop is not None and tuple(processor.crop) != (size, size):
            raise ValueError(
                f"the preprocessing crops to {processor.crop}, the image tower takes {size}x{size}"
            )
        self.tokenizer = tokenizer
        self.processor = processor
        self.backbone = backbone
        devices = list(jax.local_devices() if devices is None else devices)
        self.mesh = parallel.make_mesh([("data", -1)], devices=devices)
        self.batch_size = -(-max(int(batch_size), 1) // len(devices)) * len(devices)
        self.graphdef, state = nnx.split(model)
        self.state = jax.device_put(state, parallel.replicated(self.mesh))
        self._batch_sharding = parallel.batch_sharding(self.mesh)

    def _run(self, fn, *arrays: np.ndarray) -> np.ndarray:
        """fn over rows [n <= batch_size, ...] of each array, padded to a full batch."""
        real = len(arrays[0])
        padded = []
        for x in arrays:
            pad = np.zeros((self.batch_size - real, *x.shape[1:]), x.dtype)
            padded.append(jax.device_put(np.concatenate([x, pad]), self._batch_sharding))
        with jax.default_matmul_precision("highest"):
            out = fn(self.graphdef, self.state, *padded)
        return np.asarray(out, np.float32)[:real]

    def pixel_embeddings(self, pixel_values: np.ndarray) -> np.ndarray:
        """Preprocessed pixel_values [N, S, S, 3] -> image embeddings [N, P] float32
        (`get_image_features`, not normalized)."""
        x = np.asarray(pixel_values, np.float32)
        chunks = [
            self._run(_image_features, x[i : i + self.batch_size])
            for i in range(0, len(x), self.batch_size)
        ]
        if not chunks:
            raise ValueError("no images to embed")
        return np.concatenate(chunks)

    def _pixel_batches(self, images: Iterable[np.ndarray]) -> Iterator[np.ndarray]:
        batch = []
        for i, image in enumerate(images):
            try:
                batch.append(self.processor(image))
            except ValueError as e:
                raise ValueError(f"image {i}: {e}") from None
            if len(batch) == self.batch_size:
                yield np.stack(batch)
                batch = []
        if batch:
            yield np.stack(batch)

    def image_embeddings(self, images: Iterable[np.ndarray]) -> np.ndarray:
        """uint8 RGB images [H, W, 3] (any sizes; an iterable is read once, batch by batch)
        -> image embeddings [N, P] float32."""
        chunks = [self._run(_image_features, x) for x in self._pixel_batches(images)]
        if not chunks:
            raise ValueError("no images to embed")
        return np.concatenate(chunks)

    def _encode_text(self, prompts: Sequence[str]) -> tuple[np.ndarray, int]:
        if isinstance(prompts, str):
            raise TypeError("prompts must be a sequence of strings, not one string")
        if len(prompts) == 0:
            raise ValueError("no prompts to embed")
        tokens = self.tokenizer(prompts)  # warns about truncated prompts
        chunks = [
            self._run(
                _text_features,
                tokens.input_ids[i : i + self.batch_size],
                tokens.attention_mask[i : i + self.batch_size],
            )
            for i in range(0, len(prompts), self.batch_size)
        ]
        return np.concatenate(chunks), int((tokens.num_truncated > 0).sum())

    def text_embeddings(self, prompts: Sequence[str]) -> np.ndarray:
        """Captions -> text embeddings [N, P] float32 (`get_text_features`, not normalized)."""
        return self._encode_text(prompts)[0]

    def score(
        self,
        images: Iterable[np.ndarray],
        prompts: Sequence[str],
        *,
        clamp: str = "mean",
    ) -> dict[str, Any]:
        """The CLIP score of images[i] with prompts[i]: {"score", "n", "backbone", "clamp",
        "truncated_prompts"} (prompts that lost tokens to the 77-token limit)."""
        if clamp not in CLAMPS:
            raise ValueError(f"clamp must be one of {CLAMPS}, got {clamp!r}")
        text, truncated = self._encode_text(prompts)
        image = self.image_embeddings(images)
        if len(image) != len(text):
            raise ValueError(f"{len(image)} images but {len(text)} prompts")
        return self.result(image, text, clamp=clamp, truncated_prompts=truncated)

    def result(self, image_embeds, text_embeds, *, clamp="mean", **extra) -> dict[str, Any]:
        """The result dict of a score from embeddings [N, P]."""
        return score_result(image_embeds, text_embeds, backbone=self.backbone, clamp=clamp, **extra)


def score_result(image_embeds, text_embeds, *, backbone: str, clamp="mean", **extra) -> dict:
    """{"score", "n", "backbone", "clamp", **extra} of embeddings [N, P]."""
    return dict(
        score=clip_score(image_embeds, text_embeds, clamp=clamp),
        n=len(image_embeds),
        backbone=backbone,
        clamp=clamp,
        **extra,
    )


class EmbedderScorer:
    """The score of `CLIPScorer.score` from any `pipelines.embedding.Embedder` (an in-domain
    embedding model): 100 * cos of its image and text embeddings, the same clamps."""

    def __init__(self, embedder, *, backbone: str):
        self.embedder, self.backbone = embedder, backbone

    def score(self, images, prompts: Sequence[str], *, clamp: str = "mean") -> dict[str, Any]:
        if clamp not in CLAMPS:
            raise ValueError(f"clamp must be one of {CLAMPS}, got {clamp!r}")
        if isinstance(prompts, str):
            raise TypeError("prompts must be a sequence of strings, not one string")
        if len(prompts) == 0:
            raise ValueError("no prompts to embed")
        text = self.embedder.embed_texts(prompts)
        image = self.embedder.embed_images(list(images))
        if len(image) != len(text):
            raise ValueError(f"{len(image)} images but {len(text)} prompts")
        return score_result(image, text, backbone=self.backbone, clamp=clamp, truncated_prompts=0)


def _embedding_model(path: str) -> bool:
    """Whether `path` holds an embedding model other than a CLIPModel (ours, SigLIP)."""
    if not os.path.isfile(os.path.join(path, CONFIG_NAME)):
        return False
    kind = read_config(path).get("model_type")
    return kind != "clip" and kind in embedding.KINDS


def load_clip_scorer(
    path: str | os.PathLike,
    *,
    batch_size: int = 32,
    dtype=jnp.float32,
    backbone: str | None = None,
    devices: Sequence[jax.Device] | None = None,
) -> CLIPScorer | EmbedderScorer:
    """A CLIPScorer from a CLIPModel directory (see the module docstring), or an
    EmbedderScorer from another embedding model directory (an in-domain score); `backbone`
    overrides the reported name (default: `backbone_name`)."""
    path = os.fspath(path)
    if _embedding_model(path):
        embedder = embedding.load_embedder(path, batch_size=batch_size)
        return EmbedderScorer(embedder, backbone=backbone or backbone_name(path))
    check_model_dir(path)
    model = load_clip_model(path, dtype=dtype)
    max_length = model.text_model.config.max_position_embeddings
    return CLIPScorer(
        model,
        Tokenizer.from_dir(path, max_length),
        ImageProcessor.from_dir(path),
        backbone=backbone or backbone_name(path, read_config(path)),
        batch_size=batch_size,
        devices=devices,
    )


# ----------------------------------------------------------------------------------------------
# A folder of samples
# ----------------------------------------------------------------------------------------------


def read_pairs(folder: str | os.PathLike) -> list[tuple[pathlib.Path, str]]:
    """(image file, prompt) of every line of `folder/manifest.jsonl`, checked against the
    folder (`folder.read_manifest`)."""
    return [(path, r["prompt"]) for path, r in read_manifest(folder, purpose="CLIP score")]


def evaluate_folder(
    samples: str | os.PathLike,
    *,
    clip_path: str | os.PathLike,
    clamp: str = "mean",
    batch_size: int = 32,
    backbone: str | None = None,
    dtype=jnp.float32,
    devices: Sequence[jax.Device] | None = None,
) -> dict[str, Any]:
    """The CLIP score of a folder's images with their manifest prompts (what
    `eval/clip_score.py` runs): {"score", "n", "backbone", "clamp", "truncated_prompts",
    "samples", "clip"}. The inputs are checked before the model is loaded."""
    if clamp not in CLAMPS:
        raise ValueError(f"clamp must be one of {CLAMPS}, got {clamp!r}")
    pairs = read_pairs(samples)
    if not _embedding_model(os.fspath(clip_path)):
        check_model_dir(clip_path)
    scorer = load_clip_scorer(
        clip_path, batch_size=batch_size, dtype=dtype, backbone=backbone, devices=devices
    )
    result = scorer.score(
        (load_image(path) for path, _ in pairs), [prompt for _, prompt in pairs], clamp=clamp
    )
    return dict(result, samples=os.fspath(samples), clip=os.fspath(clip_path))
