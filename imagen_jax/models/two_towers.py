"""Two-tower image-text models: CLIP (Radford et al. 2021, "Learning Transferable Visual
Models From Natural Language Supervision") and SigLIP (Zhai et al. 2023, "Sigmoid Loss for
Language Image Pre-Training"), as transformers' `CLIPModel` and `SiglipModel`.

    model = load_siglip("/models/siglip-base-patch16-224")   # or load_clip(DIR)
    out = model(pixel_values, input_ids, attention_mask)      # TwoTowerOutput
    image = embed_images(model, pixel_values)                 # [B, P], L2-normalised

An image tower (`models.vit.CLIPVisionEncoder`) and a text tower
(`text.clip.CLIPTextEncoder`), each with `family="clip"` or `"siglip"`, embed into one
space of width P; both embeddings are L2-normalised and compared by a scaled dot product:

* CLIP: logits_per_image = exp(logit_scale) * img @ txt.T (the towers' projections,
  `visual_projection` and `text_projection`, have no bias; P = projection_dim);
* SigLIP: logits_per_image = exp(logit_scale) * img @ txt.T + logit_bias (the image tower
  pools with its attention head, the text tower projects by its `head`; P = the image
  tower's hidden_size).

logits_per_text is the transpose. The losses that train them (softmax for CLIP, sigmoid for
SigLIP) are in `imagen_jax.training.contrastive`; models only predict.

Weights come from, and go to, a local directory in Hugging Face layout (config.json +
model.safetensors; the tokenizer beside it is read by `text.tokenizer.Tokenizer`):
`load_clip` / `load_siglip` are strict (every missing, unexpected or mis-shaped tensor, and
every config setting this code lacks, is named before anything runs; a checkpoint of one
tower is refused as such), `save_clip` / `save_siglip` write what transformers'
`from_pretrained` and these loaders read back.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import math
import os
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from imagen_jax.models import vit
from imagen_jax.text import clip
from imagen_jax.text.layers import l2_normalize
from imagen_jax.weights import (
    CONFIG_NAME,
    WEIGHTS_NAME,
    Checkpoint,
    CheckpointError,
    Source,
    checkpoint_tensors,
    load_into,
    read_config,
)

# Buffers that checkpoints of transformers < 5 hold.
UNUSED = (r"(text|vision)_model\.embeddings\.position_ids",)
# config.json model types of one tower alone: what each holds.
ONE_TOWER = {
    "clip_vision_model": "image",
    "clip_text_model": "text",
    "siglip_vision_model": "image",
    "siglip_text_model": "text",
}


class TwoTowerOutput(NamedTuple):
    """logits_per_image [Bi, Bt], logits_per_text [Bt, Bi]; image_embeds [Bi, P] and
    text_embeds [Bt, P], L2-normalised (transformers' CLIPOutput / SiglipOutput)."""

    logits_per_image: jax.Array
    logits_per_text: jax.Array
    image_embeds: jax.Array
    text_embeds: jax.Array


class TwoTowers(nnx.Module):
    """What CLIPModel and SiglipModel share: the towers, the embeddings and the logits."""

    FAMILY = ""

    def __init__(self, text_config, vision_config, *, rngs, dtype, param_dtype):
        check_towers(self.FAMILY, text_config, vision_config)
        kw = dict(rngs=rngs, dtype=dtype, param_dtype=param_dtype)
        self.text_model = clip.CLIPTextEncoder(text_config, **kw)
        self.vision_model = vit.CLIPVisionEncoder(vision_config, **kw)

    def get_image_features(self, pixel_values: jax.Array) -> jax.Array:
        """pixel_values [B, S, S, C] (preprocessed, NHWC) -> [B, P], not normalised."""
        return self.vision_model(pixel_values).pooled

    def get_text_features(
        self, input_ids: jax.Array, attention_mask: jax.Array | None = None
    ) -> jax.Array:
        """input_ids [B, L] (and attention_mask [B, L], 1 = token) -> [B, P], not normalised."""
        return self.text_model(input_ids, attention_mask).pooled

    def logits(self, image_embeds: jax.Array, text_embeds: jax.Array) -> jax.Array:
        """logits_per_image [Bi, Bt] of L2-normalised embeddings [Bi, P] and [Bt, P]."""
        logits = (image_embeds @ text_embeds.T) * jnp.exp(self.logit_scale[...])
        if self.logit_bias is not None:
            logits = logits + self.logit_bias[...]
        return logits

    def __call__(
        self,
        pixel_values: jax.Array,
        input_ids: jax.Array,
        attention_mask: jax.Array | None = None,
    ) -> TwoTowerOutput:
        image = l2_normalize(self.get_image_features(pixel_values))
        text = l2_normalize(self.get_text_features(input_ids, attention_mask))
        logits = self.logits(image, text)
        return TwoTowerOutput(logits, logits.T, image, text)


class CLIPModel(TwoTowers):
    """transformers' CLIPModel: logit_scale is a scalar (exp(2.6592) = 1 / 0.07 at init)."""

    FAMILY = "clip"

    def __init__(
        self,
        text_config: clip.CLIPTextConfig,
        vision_config: vit.CLIPVisionConfig,
        *,
        logit_scale_init: float = 2.6592,
        rngs: nnx.Rngs,
        dtype=jnp.float32,
        param_dtype=jnp.float32,
    ):
        kw = dict(rngs=rngs, dtype=dtype, param_dtype=param_dtype)
        super().__init__(text_config, vision_config, **kw)
        self.logit_scale = nnx.Param(jnp.asarray(logit_scale_init, param_dtype))
        self.logit_bias = None


class SiglipModel(TwoTowers):
    """transformers' SiglipModel: logit_scale and logit_bias of shape [1], initialised as in
    the paper (sec. 3.2: t' = log 10, b = -10; transformers' own init is zeros)."""

    FAMILY = "siglip"

    def __init__(
        self,
        text_config: clip.CLIPTextConfig,
        vision_config: vit.CLIPVisionConfig,
        *,
        logit_scale_init: float = math.log(10.0),
        logit_bias_init: float = -10.0,
        rngs: nnx.Rngs,
        dtype=jnp.float32,
        param_dtype=jnp.float32,
    ):
        kw = dict(rngs=rngs, dtype=dtype, param_dtype=param_dtype)
        super().__init__(text_config, vision_config, **kw)
        self.logit_scale = nnx.Param(jnp.full((1,), logit_scale_init, param_dtype))
        self.logit_bias = nnx.Param(jnp.full((1,), logit_bias_init, param_dtype))


MODELS = {"clip": CLIPModel, "siglip": SiglipModel}


@dataclasses.dataclass(frozen=True)
class TowersConfig:
    """A CLIPModel (family "clip") or SiglipModel ("siglip") to build: a trainer's network."""

    text: clip.CLIPTextConfig
    vision: vit.CLIPVisionConfig
    family: str = "siglip"

    def build(self, **kw) -> TwoTowers:
        return MODELS[self.family](self.text, self.vision, **kw)


def check_towers(family: str, text: clip.CLIPTextConfig, vision: vit.CLIPVisionConfig) -> None:
    """ValueError unless both towers are of `family` and embed into the same width."""
    if (text.family, vision.family) != (family, family):
        raise ValueError(
            f"a {MODELS[family].__name__} needs {family} towers, got a {text.family} text "
            f"tower and a {vision.family} image tower"
        )
    if family == "clip" and not (text.projection_dim and vision.projection_dim):
        raise ValueError("a CLIPModel has a projection_dim on both towers")
    if text.width != vision.width:
        what = (
            ("text projection_dim", "image projection_dim")
            if family == "clip"
            else ("text projection_size", "image hidden_size")
        )
        raise ValueError(
            f"the towers' widths differ: the text tower embeds into {text.width} dimensions "
            f"({what[0]}), the image tower into {vision.width} ({what[1]})"
        )


# ----------------------------------------------------------------------------------------------
# Embeddings, compiled once per model structure and input shape
# ----------------------------------------------------------------------------------------------


@functools.partial(jax.jit, static_argnames=("graphdef", "normalize"))
def image_embeds(graphdef, state, pixel_values, normalize: bool = True) -> jax.Array:
    """`embed_images` of a split model (`nnx.split`), for callers that keep state placed."""
    x = nnx.merge(graphdef, state).get_image_features(pixel_values)
    return l2_normalize(x) if normalize else x


@functools.partial(jax.jit, static_argnames=("graphdef", "normalize"))
def text_embeds(graphdef, state, input_ids, attention_mask, normalize: bool = True) -> jax.Array:
    """`embed_texts` of a split model (`nnx.split`)."""
    x = nnx.merge(graphdef, state).get_text_features(input_ids, attention_mask)
    return l2_normalize(x) if normalize else x


def embed_images(model: TwoTowers, pixel_values, *, normalize: bool = True) -> jax.Array:
    """Preprocessed pixel_values [B, S, S, C] -> image embeddings [B, P], L2-normalised
    unless normalize=False (then transformers' `get_image_features`)."""
    graphdef, state = nnx.split(model)
    return image_embeds(graphdef, state, jnp.asarray(pixel_values), normalize)


def embed_texts(
    model: TwoTowers, input_ids, attention_mask=None, *, normalize: bool = True
) -> jax.Array:
    """input_ids [B, L] (attention_mask [B, L] or None) -> text embeddings [B, P],
    L2-normalised unless normalize=False (then `get_text_features`)."""
    graphdef, state = nnx.split(model)
    mask = None if attention_mask is None else jnp.asarray(attention_mask)
    return text_embeds(graphdef, state, jnp.asarray(input_ids), mask, normalize)


# ----------------------------------------------------------------------------------------------
# Weights
# ----------------------------------------------------------------------------------------------

_ARCHITECTURE = {"clip": "CLIPModel", "siglip": "SiglipModel"}


def configs_from_hf(hf: dict, family: str) -> tuple[clip.CLIPTextConfig, vit.CLIPVisionConfig]:
    """The two towers' configs from the config.json of a CLIPModel (family "clip") or a
    SiglipModel ("siglip"); ValueError names what does not fit."""
    arch = _ARCHITECTURE[family]
    model_type = hf.get("model_type")
    architectures = list(hf.get("architectures") or [arch])
    if model_type in ONE_TOWER:
        raise ValueError(
            f"model_type {model_type!r} ({', '.join(architectures)}) holds only the "
            f"{ONE_TOWER[model_type]} tower: not a full {arch}, which has both towers"
        )
    if model_type != family or arch not in architectures:
        raise ValueError(
            f"model_type {model_type!r}, architectures {architectures}: not a full {arch} "
            f"(model_type {family!r}, both towers)"
        )
    for key in ("text_config", "vision_config"):
        if not isinstance(hf.get(key), dict):
            raise ValueError(f"no {key}: a full {arch} has both towers")
    towers = {}
    configs = (("text_config", clip.CLIPTextConfig), ("vision_config", vit.CLIPVisionConfig))
    for key, config in configs:
        try:
            if family == "clip":
                towers[key] = config.from_hf({**hf, "architectures": [arch]})
            else:
                towers[key] = config.siglip_from_hf(hf)
        except (TypeError, ValueError) as e:
            raise ValueError(f"{key}: {e}") from None
    text, vision = towers["text_config"], towers["vision_config"]
    check_towers(family, text, vision)
    return text, vision


def hf_key_map(model: TwoTowers | type[TwoTowers], text, vision) -> dict[tuple, Source]:
    """Our state paths -> the tensor names of transformers' CLIPModel / SiglipModel."""
    m = {("logit_scale",): Source.of("logit_scale")}
    if model.FAMILY == "siglip":
        m[("logit_bias",)] = Source.of("logit_bias")
    for name, tower in (
        ("text_model", clip.hf_key_map(text, "text_model.")),
        ("vision_model", vit.hf_key_map(vision, "vision_model.")),
    ):
        m.update({(name, *path): src for path, src in tower.items()})
    return m


def load_clip(path: str | os.PathLike, *, dtype=jnp.float32) -> CLIPModel:
    """A CLIPModel directory (config.json, model.safetensors), loaded strictly."""
    return _load(path, "clip", dtype)


def load_siglip(path: str | os.PathLike, *, dtype=jnp.float32) -> SiglipModel:
    """A SiglipModel directory (config.json, model.safetensors), loaded strictly."""
    return _load(path, "siglip", dtype)


def _load(path, family: str, dtype) -> TwoTowers:
    path = os.fspath(path)
    hf = read_config(path)
    try:
        text, vision = configs_from_hf(hf, family)
    except ValueError as e:
        raise CheckpointError(f"{os.path.join(path, CONFIG_NAME)}: {e}") from None
    checkpoint = Checkpoint(path)
    for prefix, absent, held in (
        ("text_model.", "text", "image"),
        ("vision_model.", "image", "text"),
    ):
        if not any(name.startswith(prefix) for name in checkpoint):
            raise CheckpointError(
                f"checkpoint {path} holds only the {held} tower (no {prefix}* tensors, no "
                f"{absent} tower): not a full {_ARCHITECTURE[family]}"
            )
    cls = MODELS[family]
    build = functools.partial(cls, text, vision, dtype=dtype, param_dtype=dtype)
    return load_into(
        nnx.eval_shape(lambda: build(rngs=nnx.Rngs(0))),
        hf_key_map(cls, text, vision),
        checkpoint,
        dtype=dtype,
        unused=UNUSED,
        what=cls.__name__,
    )


def hf_config(model: TwoTowers) -> dict:
    """The config.json of the transformers CLIPModel / SiglipModel that `model` is."""
    text, vision = model.text_model.config, model.vision_model.config
    keys = ("hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads")
    keys += ("hidden_act", "layer_norm_eps")
    text_hf = {k: getattr(text, k) for k in (*keys, "vocab_size", "max_position_embeddings")}
    vision_hf = {k: getattr(vision, k) for k in (*keys, "num_channels", "image_size", "patch_size")}
    family = model.FAMILY
    hf = {"model_type": family, "architectures": [_ARCHITECTURE[family]], "dtype": "float32"}
    if family == "clip":
        text_hf["eos_token_id"] = text.eos_token_id
        hf["projection_dim"] = text.projection_dim
        hf["logit_scale_init_value"] = float(model.logit_scale[...])
    else:
        text_hf["projection_size"] = text.projection_dim
        vision_hf["vision_use_head"] = True
    text_hf["model_type"] = f"{family}_text_model"
    vision_hf["model_type"] = f"{family}_vision_model"
    return {**hf, "text_config": text_hf, "vision_config": vision_hf}


def save_clip(path: str | os.PathLike, model: CLIPModel, *, dtype=np.float32) -> str:
    """Writes config.json and model.safetensors (tensors in `dtype`) that `load_clip` and
    transformers' `CLIPModel.from_pretrained` read; returns path."""
    return _save(path, model, "clip", dtype)


def save_siglip(path: str | os.PathLike, model: SiglipModel, *, dtype=np.float32) -> str:
    """Writes config.json and model.safetensors that `load_siglip` and transformers'
    `SiglipModel.from_pretrained` read; returns path."""
    return _save(path, model, "siglip", dtype)


def _save(path, model: TwoTowers, family: str, dtype) -> str:
    from safetensors.numpy import save_file  # lazy: only writers need it

    if not isinstance(model, MODELS[family]):
        raise TypeError(f"expected a {MODELS[family].__name__}, got {type(model).__name__}")
    text, vision = model.text_model.config, model.vision_model.config
    tensors = checkpoint_tensors(
        model, hf_key_map(model, text, vision), dtype=dtype, what=type(model).__name__
    )
    path = os.fspath(path)
    os.makedirs(path, exist_ok=True)
    with open(os.path.join(path, CONFIG_NAME), "w") as f:
        json.dump(hf_config(model), f, indent=2)
    save_file(tensors, os.path.join(path, WEIGHTS_NAME), metadata={"format": "pt"})
    return path
