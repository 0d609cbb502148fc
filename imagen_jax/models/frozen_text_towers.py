"""A two-tower image-text model whose text side is a frozen language model (LiT, Zhai et al.
2022, "LiT: Zero-Shot Transfer with Locked-image text Tuning", with the text tower locked
instead): a trained image tower (`vit.CLIPVisionEncoder`, CLIP or SigLIP family) and a
trained projection of the frozen encoder's token embeddings (all-MiniLM-L6-v2 through
`imagen_jax.text`), compared by a scaled cosine as `two_towers.CLIPModel` (softmax loss) or
`SiglipModel` (sigmoid loss, with a learnable bias).

    model = load_frozen_text_towers(DIR)          # model, text group (which frozen encoder)
    image = model.get_image_features(pixels)      # [B, S, S, 3] preprocessed -> [B, P]
    text = model.get_text_features(tokens, mask)  # frozen [B, L, D], bool [B, L] -> [B, P]

The model owns no text encoder (models only predict): the caller encodes the captions with
the encoder the directory's config.json names (`text`: a `text.config.text_config` group)
and passes its token embeddings. Text pooling: "mean" over the mask's tokens (as
sentence-transformers pools MiniLM) or "cls" (the first token), then a linear projection, or
a one-hidden-layer MLP when `text_hidden` > 0.

A directory (`save_frozen_text_towers`) holds config.json (`model_type`
"frozen_text_two_towers"), model.safetensors ("/"-joined parameter paths) and
preprocessor_config.json; the loader is strict: every missing, unexpected or mis-shaped
tensor is named, and a directory of another kind (a CLIPModel, a GIT captioner, a stage) is
refused by its model_type.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx, traverse_util

from imagen_jax.models import conv_tower, vit
from imagen_jax.text.layers import l2_normalize
from imagen_jax.weights import CONFIG_NAME, WEIGHTS_NAME, CheckpointError, read_config

MODEL_TYPE = "frozen_text_two_towers"
POOLINGS = ("mean", "cls")
IMAGE_TOWERS = ("vit", "conv")

# Variants (our own sizes; the shapes one sized for a 2-core CPU and 64 px renders).
VARIANTS = {
    "runlocal": dict(
        vision=dict(
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=1,
            num_attention_heads=2,
            image_size=16,
            patch_size=4,
            hidden_act="gelu_pytorch_tanh",
            layer_norm_eps=1e-6,
            family="siglip",
        ),
        projection_dim=32,
    ),
    "shapes": dict(
        vision=dict(
            hidden_size=128,
            intermediate_size=384,
            num_hidden_layers=4,
            num_attention_heads=4,
            image_size=64,
            patch_size=8,
            hidden_act="gelu_pytorch_tanh",
            layer_norm_eps=1e-6,
            family="siglip",
        ),
        projection_dim=128,
        text_hidden=384,
    ),
}
# The shapes sizes with a convolutional image tower (`ConvTower`): 64 px -> 8x8x128 after
# three stride-2 stages, flattened so that where things are is kept, then 256 wide (of
# `vision`, only image_size and hidden_size are read).
# It also sees a colour-blind foreground channel (`conv_foreground`), from which a shape can
# be told in every colour alike.
VARIANTS["shapes_conv"] = dict(
    VARIANTS["shapes"],
    vision=dict(VARIANTS["shapes"]["vision"], hidden_size=256),
    image_tower="conv",
    conv_widths=(32, 64, 128),
    conv_foreground=True,
)


@dataclasses.dataclass(frozen=True)
class FrozenTextTowersConfig:
    vision: vit.CLIPVisionConfig
    text_dim: int = 384  # the frozen encoder's width (all-MiniLM-L6-v2: 384)
    projection_dim: int = 128  # the shared embedding space
    text_pooling: str = "mean"  # mean | cls
    text_hidden: int = 0  # 0: a linear text projection; > 0: an MLP with this hidden width
    logit_bias: bool = True  # SigLIP's learnable bias (sigmoid loss); False: CLIP (softmax)
    # "vit": `vision` is the image tower; "conv": `ConvTower` (conv_widths, one stride-2
    # stage each), whose output width is vision.hidden_size (the rest of `vision` unused
    # but image_size).
    image_tower: str = "vit"
    conv_widths: tuple[int, ...] = ()
    # conv: a fourth input channel, each pixel's distance from the image's per-channel
    # median colour (`foreground_channel`): on a plain background, the objects' silhouettes
    # whatever their colours, so that a shape detector need not be learnt once per colour.
    conv_foreground: bool = False

    def checked(self) -> FrozenTextTowersConfig:
        if self.image_tower not in IMAGE_TOWERS:
            raise ValueError(f"image_tower={self.image_tower!r}; expected one of {IMAGE_TOWERS}")
        if self.image_tower == "conv":
            conv_tower.check_widths(self.conv_widths, self.vision.image_size)
        if self.text_pooling not in POOLINGS:
            raise ValueError(f"text_pooling={self.text_pooling!r}; expected one of {POOLINGS}")
        if self.vision.projection_dim:
            raise ValueError(
                "the image tower's vision.projection_dim must be unset: the model projects "
                "to projection_dim itself"
            )
        for key in ("text_dim", "projection_dim"):
            if getattr(self, key) < 1:
                raise ValueError(f"{key}={getattr(self, key)} must be positive")
        self.vision.checked()
        return self


def make_config(variant: str, **overrides) -> FrozenTextTowersConfig:
    """A `VARIANTS` entry with overrides (`vision`: a dict of CLIPVisionConfig fields)."""
    if variant not in VARIANTS:
        raise ValueError(f"unknown variant {variant!r}; expected one of {sorted(VARIANTS)}")
    values = {**VARIANTS[variant], **overrides}
    vision = {**VARIANTS[variant]["vision"], **dict(overrides.get("vision") or {})}
    values["vision"] = vit.CLIPVisionConfig(**vision)
    return FrozenTextTowersConfig(**values).checked()


class FrozenTextTowers(nnx.Module):
    """The image tower with its projection, the text projection, logit_scale (and bias)."""

    def __init__(
        self,
        config: FrozenTextTowersConfig,
        *,
        rngs: nnx.Rngs,
        dtype=jnp.float32,
        param_dtype=jnp.float32,
    ):
        self.config = config.checked()
        kw = dict(rngs=rngs, dtype=dtype, param_dtype=param_dtype)
        p = config.projection_dim
        if config.image_tower == "conv":
            self.vision_model = conv_tower.ConvTower(
                config.conv_widths,
                image_size=config.vision.image_size,
                width=config.vision.hidden_size,
                foreground=config.conv_foreground,
                **kw,
            )
        else:
            self.vision_model = vit.CLIPVisionEncoder(config.vision, **kw)
        self.visual_projection = nnx.Linear(config.vision.width, p, use_bias=False, **kw)
        if config.text_hidden:
            self.text_hidden = nnx.Linear(config.text_dim, config.text_hidden, **kw)
            self.text_projection = nnx.Linear(config.text_hidden, p, use_bias=False, **kw)
        else:
            self.text_hidden = None
            self.text_projection = nnx.Linear(config.text_dim, p, use_bias=False, **kw)
        # Inits as two_towers: SigLIP's t' = log 10, b = -10 (sec. 3.2); CLIP's 1 / 0.07.
        scale = math.log(10.0) if config.logit_bias else 2.6592
        self.logit_scale = nnx.Param(jnp.full((1,), scale, param_dtype))
        self.logit_bias = (
            nnx.Param(jnp.full((1,), -10.0, param_dtype)) if config.logit_bias else None
        )

    def get_image_features(self, pixel_values: jax.Array) -> jax.Array:
        """pixel_values [B, S, S, C] (preprocessed, NHWC) -> [B, P], not normalised."""
        return self.visual_projection(self.vision_model(pixel_values).pooled)

    def get_text_features(self, tokens: jax.Array, mask: jax.Array) -> jax.Array:
        """The frozen encoder's token embeddings [B, L, D] and mask [B, L] -> [B, P]."""
        if self.config.text_pooling == "cls":
            pooled = tokens[:, 0]
        else:
            m = mask.astype(tokens.dtype)[..., None]  # [B, L, 1]
            pooled = (tokens * m).sum(1) / jnp.maximum(m.sum(1), 1.0)  # [B, D]
        if self.text_hidden is not None:
            pooled = jax.nn.gelu(self.text_hidden(pooled))
        return self.text_projection(pooled)

    def logits(self, image_embeds: jax.Array, text_embeds: jax.Array) -> jax.Array:
        """logits_per_image [Bi, Bt] of L2-normalised embeddings."""
        logits = (image_embeds @ text_embeds.T) * jnp.exp(self.logit_scale[...])
        if self.logit_bias is not None:
            logits = logits + self.logit_bias[...]
        return logits

    def embed(self, pixel_values, tokens, mask) -> tuple[jax.Array, jax.Array]:
        """(image, text) embeddings, L2-normalised."""
        image = l2_normalize(self.get_image_features(pixel_values))
        return image, l2_normalize(self.get_text_features(tokens, mask))


# ----------------------------------------------------------------------------------------------
# Directories
# ----------------------------------------------------------------------------------------------


def flatten(tree: dict) -> dict:
    """{"a/b/0": array} of a nested dict of parameters."""
    return {"/".join(map(str, k)): v for k, v in traverse_util.flatten_dict(tree).items()}


def unflatten(flat: dict) -> dict:
    def part(p: str):
        return int(p) if p.isdigit() else p

    return traverse_util.unflatten_dict(
        {tuple(map(part, k.split("/"))): v for k, v in flat.items()}
    )


def config_to_json(config: FrozenTextTowersConfig) -> dict:
    return dataclasses.asdict(config)


def config_from_json(hf: dict, where: str) -> FrozenTextTowersConfig:
    """The config of a directory's config.json; CheckpointError names what is wrong."""
    if hf.get("model_type") != MODEL_TYPE:
        raise CheckpointError(
            f"{where}: model_type {hf.get('model_type')!r}, not a {MODEL_TYPE!r} embedding "
            "model (imagen_jax.models.frozen_text_towers)"
        )
    fields = {f.name for f in dataclasses.fields(FrozenTextTowersConfig)}
    try:
        values = {k: hf[k] for k in fields if k in hf}
        values["vision"] = vit.CLIPVisionConfig(**hf["vision"])
        if "conv_widths" in values:
            values["conv_widths"] = tuple(values["conv_widths"])
        return FrozenTextTowersConfig(**values).checked()
    except (KeyError, TypeError, ValueError) as e:
        raise CheckpointError(f"{where}: {e}") from None


def save_frozen_text_towers(
    path, config: FrozenTextTowersConfig, params: dict, *, text: dict, processor: dict,
    dtype=np.float16, identity: dict | None = None,
) -> str:  # fmt: skip
    """Writes config.json (the model and its frozen `text` group), model.safetensors
    (`params`, a nested dict, in `dtype`; the logit scale and bias in float32) and
    preprocessor_config.json (`processor`); returns path."""
    from safetensors.numpy import save_file

    path = os.fspath(path)
    os.makedirs(path, exist_ok=True)
    tensors = {}
    for key, value in flatten(params).items():
        value = np.asarray(value)
        keep = key.startswith("logit_") or not np.issubdtype(value.dtype, np.floating)
        tensors[key] = np.ascontiguousarray(value if keep else value.astype(dtype))
    hf = {"model_type": MODEL_TYPE, **config_to_json(config), "text": dict(text)}
    if identity:
        hf["identity"] = identity
    with open(os.path.join(path, CONFIG_NAME), "w") as f:
        json.dump(hf, f, indent=2)
    with open(os.path.join(path, "preprocessor_config.json"), "w") as f:
        json.dump(processor, f, indent=2)
    save_file(tensors, os.path.join(path, WEIGHTS_NAME))
    return path


def load_frozen_text_towers(path, *, dtype=jnp.float32) -> tuple[FrozenTextTowers, dict]:
    """(the model, its `text` group) of a directory written by `save_frozen_text_towers`,
    loaded strictly."""
    from safetensors.numpy import load_file

    path = os.fspath(path)
    config = config_from_json(read_config(path), os.path.join(path, CONFIG_NAME))
    text = read_config(path).get("text")
    if not isinstance(text, dict):
        raise CheckpointError(f"{path}/{CONFIG_NAME} names no frozen text encoder ('text')")
    file = os.path.join(path, WEIGHTS_NAME)
    if not os.path.isfile(file):
        raise CheckpointError(f"{path} has no {WEIGHTS_NAME}")
    abstract = nnx.eval_shape(
        lambda: FrozenTextTowers(config, rngs=nnx.Rngs(0), dtype=dtype, param_dtype=dtype)
    )
    graphdef, state = nnx.split(abstract)
    expected = flatten(nnx.to_pure_dict(state))
    loaded = load_file(file)
    check_tensors(file, loaded, expected)
    pure = unflatten({k: jnp.asarray(v, dtype) for k, v in loaded.items()})
    nnx.replace_by_pure_dict(state, pure)
    return nnx.merge(graphdef, state), text


def check_tensors(file: str, loaded: dict, expected: dict) -> None:
    """CheckpointError naming every missing, unexpected and mis-shaped tensor."""
    problems = [
        f"missing {k} {tuple(expected[k].shape)}" for k in sorted(set(expected) - set(loaded))
    ]
    problems += [
        f"unexpected {k} {tuple(loaded[k].shape)}" for k in sorted(set(loaded) - set(expected))
    ]
    problems += [
        f"{k}: file {tuple(loaded[k].shape)}, model {tuple(expected[k].shape)}"
        for k in sorted(set(loaded) & set(expected))
        if tuple(loaded[k].shape) != tuple(expected[k].shape)
    ]  # fmt: skip
    if problems:
        more = f" (and {len(problems) - 12} more)" if len(problems) > 12 else ""
        raise CheckpointError(f"{file} does not fit the model: {'; '.join(problems[:12])}{more}")
