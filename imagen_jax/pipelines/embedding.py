"""Image and text embeddings of a two-tower model, compiled once per batch shape.

    embedder = load_embedder("runs/emb/embedding")    # ours, or a CLIP / SigLIP directory
    images = embedder.embed_images([uint8 [H, W, 3], ...])       # float32 [N, P], L2-normalised
    texts = embedder.embed_texts(["a red circle", ...])          # float32 [N, P]
    scores = images @ texts.T

A directory is one of: our frozen-text model (`models.frozen_text_towers`, config.json
model_type "frozen_text_two_towers": the image tower and projections, and the `text` group
of the frozen encoder, all-MiniLM-L6-v2, that its text side reads), or a transformers
CLIPModel / SiglipModel (`models.two_towers`, with tokenizer.json beside it); any other
directory (a GIT captioner, a diffusion stage, a one-tower checkpoint) is refused, named.
Images of any size go through the directory's preprocessor_config.json (CLIP's processor:
shortest side resized to the tower's size, bicubic, then a centre crop), so a folder of
mixed sizes embeds; the crop cuts the long side of non-square images. Calls run in fixed
batches of `batch_size` (the last one padded), so each function compiles once.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from imagen_jax.images import ImageProcessor
from imagen_jax.models import frozen_text_towers, two_towers
from imagen_jax.text.config import make_text_encoder, text_config
from imagen_jax.text.layers import l2_normalize
from imagen_jax.text.tokenizer import Tokenizer
from imagen_jax.weights import CONFIG_NAME, read_config

KINDS = {"frozen_text_two_towers": "ours", "clip": "CLIPModel", "siglip": "SiglipModel"}


class Embedder:
    """`embed_images` / `embed_texts` over a model's two sides.

    image_fn(pixels float32 [b, S, S, 3]) -> [b, P]; text_fn(texts: list[str] of b) ->
    [b, P] (both not yet normalised); processor: the images' preprocessing; name: what
    reports and index files record about the model (its directory).
    """

    def __init__(
        self,
        image_fn: Callable,
        text_fn: Callable,
        processor: ImageProcessor,
        *,
        name: str = "",
        batch_size: int = 64,
    ):
        self.image_fn, self.text_fn, self.processor = image_fn, text_fn, processor
        self.name, self.batch_size = name, batch_size

    def embed_images(self, images: Sequence[np.ndarray]) -> np.ndarray:
        """uint8 [H, W, 3] images (any sizes) -> float32 [N, P], L2-normalised."""
        pixels = [self.processor(np.asarray(im)) for im in images]
        return self._batched(pixels, lambda chunk: self.image_fn(np.stack(chunk)))

    def embed_texts(self, texts: Sequence[str]) -> np.ndarray:
        """Strings -> float32 [N, P], L2-normalised."""
        texts = [str(t) for t in texts]
        return self._batched(texts, self.text_fn)

    def _batched(self, rows: list, fn) -> np.ndarray:
        out = []
        for start in range(0, len(rows), self.batch_size):
            chunk = rows[start : start + self.batch_size]
            real = len(chunk)
            chunk = chunk + [chunk[-1]] * (self.batch_size - real)  # one compiled shape
            out.append(np.asarray(l2_normalize(jnp.asarray(fn(chunk))), np.float32)[:real])
        if not out:
            return np.zeros((0, 0), np.float32)
        return np.concatenate(out)


def model_embedder(
    model: nnx.Module,
    processor: ImageProcessor,
    *,
    encoder=None,
    tokenizer: Tokenizer | None = None,
    name: str = "",
    batch_size: int = 64,
) -> Embedder:
    """The Embedder of a FrozenTextTowers (texts through the frozen `encoder`) or a
    CLIPModel / SiglipModel (texts through `tokenizer`)."""
    graphdef, state = nnx.split(model)
    image_fn = jax.jit(lambda s, x: nnx.merge(graphdef, s).get_image_features(x))
    text_fn = jax.jit(lambda s, a, b: nnx.merge(graphdef, s).get_text_features(a, b))
    if encoder is not None:

        def texts(chunk):
            tokens, mask, _ = encoder.encode(chunk)
            return text_fn(state, jnp.asarray(tokens, jnp.float32), jnp.asarray(mask))

    else:

        def texts(chunk):
            tokens = tokenizer(chunk)
            return text_fn(state, tokens.input_ids, tokens.attention_mask)

    return Embedder(
        lambda pixels: image_fn(state, pixels),
        texts,
        processor,
        name=name,
        batch_size=batch_size,
    )


def model_kind(path: str | os.PathLike) -> str:
    """The config.json model_type of an embedding model directory; ValueError, in one line,
    for a directory that is not one."""
    path = os.fspath(path)
    if not os.path.isfile(os.path.join(path, CONFIG_NAME)):
        raise ValueError(f"{path} is not a model directory (no {CONFIG_NAME})")
    kind = read_config(path).get("model_type")
    if kind not in KINDS:
        raise ValueError(
            f"{path} holds a {kind!r} model, not an image-text embedding model "
            f"(model_type one of {sorted(KINDS)})"
        )
    return kind


def load_embedder(path: str | os.PathLike, *, batch_size: int = 64) -> Embedder:
    """The Embedder of an embedding model directory, loaded strictly."""
    path = os.fspath(path)
    kind = model_kind(path)
    processor = ImageProcessor.from_dir(path)
    kw = dict(name=os.path.abspath(path), batch_size=batch_size)
    if kind == "frozen_text_two_towers":
        model, text = frozen_text_towers.load_frozen_text_towers(path)
        encoder = make_text_encoder(text_config(**{**text, "cache": ""}), batch_size=batch_size)
        return model_embedder(model, processor, encoder=encoder, **kw)
    load = two_towers.load_clip if kind == "clip" else two_towers.load_siglip
    model = load(path)
    length = model.text_model.config.max_position_embeddings
    return model_embedder(model, processor, tokenizer=Tokenizer.from_dir(path, length), **kw)
