"""GIT, the Generative Image-to-text Transformer (Wang et al. 2022, "GIT: A Generative
Image-to-text Transformer for Vision and Language"), as transformers' `GitForCausalLM`.

A CLIP ViT encodes the image; its whole last hidden state after `post_layernorm` (class
token and patches, [B, N, Dv], N = (image_size / patch_size)^2 + 1) is projected by a
Linear + LayerNorm (`GitProjection`) to the decoder's width and put before the text
tokens. The text tokens are BERT's embeddings without token types (word + absolute
position, LayerNorm); the decoder is BERT's post-norm layers over [image tokens | text
tokens] with one mask (sec. 2.1 and Fig. 3 of the paper): image tokens attend to each other
both ways and not to text; a text token attends to every image token and causally to the
text before it (a padding mask removes padded text keys); the LM head `output` maps every
position to the vocabulary.

The pieces are the project's: `models.vit.CLIPVisionEncoder` for the image tower and
`text.bert.BertLayer` for the decoder layers, whose `with_kv` gives the key/value cache of
`prefill` / `decode_step`. The image tokens' keys and values are computed once per image
(they never see text) and shared by all beams of that image; text keys and values are
written into a fixed-size cache one token per step. Generation (greedy, beam search) lives
in `imagen_jax.pipelines.captioning`.

Not supported (refused when the config asks for them): several frames per sample
(`num_image_with_embedding`, GIT's video models), tied input/output embeddings, position
embeddings other than absolute, interpolated image positions.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import os
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx, traverse_util

from imagen_jax.models.conv_tower import ConvTokens, check_widths
from imagen_jax.models.vit import CLIPVisionConfig, CLIPVisionEncoder
from imagen_jax.models.vit import hf_key_map as vision_key_map
from imagen_jax.text.bert import BertConfig, BertLayer, layer_key_map
from imagen_jax.text.layers import activation
from imagen_jax.weights import (
    Checkpoint,
    CheckpointError,
    Source,
    checkpoint_tensors,
    load_into,
    read_config,
)

MODEL_TYPE = "git"
ARCHITECTURES = ("GitForCausalLM",)
# A captioner with this project's conv image tower: a model_type transformers does not know,
# so that it refuses the directory instead of loading a ViT around these weights.
CONV_MODEL_TYPE = "imagen_jax_git_conv"
CONV_ARCHITECTURES = ("GitConvForCausalLM",)
IMAGE_TOWERS = ("vit", "conv")
# The GitConfig fields of the image tower's kind (this project's; transformers has none).
_TOWER_FIELDS = ("image_tower", "conv_widths", "conv_foreground", "conv_cell_classes")
# Buffers that older checkpoints hold.
UNUSED = (r"git\.embeddings\.position_ids", r"git\.image_encoder\..*\.position_ids")
_VISION_PREFIX = "git.image_encoder.vision_model."
_CONV_PREFIX = "git.image_encoder.conv."


@dataclasses.dataclass(frozen=True)
class GitConfig:
    # Defaults: transformers' GitConfig (microsoft/git-base); vision: its GitVisionConfig.
    vocab_size: int = 30522
    hidden_size: int = 768
    num_hidden_layers: int = 6
    num_attention_heads: int = 12
    intermediate_size: int = 3072
    hidden_act: str = "gelu"
    max_position_embeddings: int = 1024
    layer_norm_eps: float = 1e-12
    pad_token_id: int | None = 0
    bos_token_id: int | None = 101  # [CLS]: generation starts from it
    eos_token_id: tuple[int, ...] = (102,)  # [SEP]
    vision: CLIPVisionConfig = CLIPVisionConfig(patch_size=16)
    # The image tower: "vit" (transformers' GIT: `vision` is a CLIP ViT) or "conv" (this
    # project's own, not transformers': `conv_tower.ConvTokens` with conv_widths and
    # conv_foreground; of `vision` only image_size, hidden_size and layer_norm_eps are read,
    # and patch_size is the tower's stride, 2 ** len(conv_widths), one token per cell).
    image_tower: str = "vit"
    conv_widths: tuple[int, ...] = ()
    conv_foreground: bool = False
    conv_cell_classes: int = 0  # > 0: the tower's per-cell classifier (`ConvTokens`)

    def __post_init__(self):
        if self.image_tower not in IMAGE_TOWERS:
            raise ValueError(f"image_tower={self.image_tower!r}; expected one of {IMAGE_TOWERS}")
        if self.image_tower == "conv":
            check_widths(self.conv_widths, self.vision.image_size)
            # Only these fields of `vision` mean anything here: the others at their
            # defaults, so that a config equals itself read back from its config.json.
            kept = ("image_size", "hidden_size", "layer_norm_eps", "patch_size")
            vision = CLIPVisionConfig(**{k: getattr(self.vision, k) for k in kept})
            object.__setattr__(self, "vision", vision)
            if self.vision.patch_size != 2 ** len(self.conv_widths):
                raise ValueError(
                    f"vision.patch_size={self.vision.patch_size}: a conv tower's tokens are "
                    f"cells of its stride, 2 ** len(conv_widths={self.conv_widths})"
                )
        elif self.conv_widths or self.conv_foreground or self.conv_cell_classes:
            raise ValueError(
                "conv_widths, conv_foreground and conv_cell_classes are settings of "
                "image_tower='conv'"
            )

    @classmethod
    def from_hf(cls, hf: dict) -> GitConfig:
        """From a GitForCausalLM config.json (or a conv-tower captioner's, model_type
        `CONV_MODEL_TYPE`); ValueError names a setting this code lacks."""
        refused = {
            "num_image_with_embedding": (None,),  # video: several frames per sample
            "tie_word_embeddings": (False, None),
            "position_embedding_type": ("absolute", None),
        }
        for key, allowed in refused.items():
            if hf.get(key) not in allowed:
                raise ValueError(f"{key}={hf[key]!r} is not supported (supported: {allowed[0]!r})")
        fields = {f.name for f in dataclasses.fields(cls)} - {"vision", "eos_token_id"}
        fields -= set(_TOWER_FIELDS)
        values = {k: v for k, v in hf.items() if k in fields}
        eos = hf.get("eos_token_id", 102)
        values["eos_token_id"] = tuple(eos) if isinstance(eos, list | tuple) else (eos,)
        if None in values["eos_token_id"]:
            values["eos_token_id"] = ()
        vision = dict(hf.get("vision_config") or {})
        if hf.get("model_type") == CONV_MODEL_TYPE:
            widths = tuple(hf.get("conv_widths") or ())
            values.update(image_tower="conv", conv_widths=widths)
            values["conv_foreground"] = bool(hf.get("conv_foreground", False))
            values["conv_cell_classes"] = int(hf.get("conv_cell_classes", 0))
            check_widths(widths, vision.get("image_size", 224))
            vision["patch_size"] = 2 ** len(widths)
        config = cls(**values, vision=_vision_config(vision))
        _check_activation("hidden_act", config.hidden_act)
        if config.hidden_size % config.num_attention_heads:
            raise ValueError(
                f"hidden_size={config.hidden_size} is not a multiple of "
                f"num_attention_heads={config.num_attention_heads}"
            )
        return config

    @property
    def decoder(self) -> BertConfig:
        """The decoder layers' settings, in the BERT layer's terms."""
        return BertConfig(
            vocab_size=self.vocab_size,
            hidden_size=self.hidden_size,
            num_hidden_layers=self.num_hidden_layers,
            num_attention_heads=self.num_attention_heads,
            intermediate_size=self.intermediate_size,
            hidden_act=self.hidden_act,
            max_position_embeddings=self.max_position_embeddings,
            layer_norm_eps=self.layer_norm_eps,
            add_pooling_layer=False,
        )

    @property
    def num_image_tokens(self) -> int:
        return self.vision.num_patches + (self.image_tower == "vit")  # the ViT's class token


def _check_activation(key: str, name: str) -> None:
    try:
        activation(name)
    except ValueError as e:
        raise ValueError(f"{key}={name!r}: {e}") from None


def _vision_config(hf: dict) -> CLIPVisionConfig:
    fields = {f.name for f in dataclasses.fields(CLIPVisionConfig)} - {"projection_dim"}
    values = {k: v for k, v in hf.items() if k in fields}
    values.setdefault("patch_size", 16)  # GitVisionConfig's default (CLIP's is 32)
    for key in ("image_size", "patch_size"):
        if not isinstance(values.get(key, 0), int):
            raise ValueError(f"vision_config.{key}={values[key]!r}: only square sizes (an int)")
    config = CLIPVisionConfig(**values, projection_dim=None)
    _check_activation("vision_config.hidden_act", config.hidden_act)
    if config.image_size % config.patch_size:
        raise ValueError(
            f"vision_config.image_size={config.image_size} is not a multiple of "
            f"vision_config.patch_size={config.patch_size}"
        )
    return config


class KVCache(NamedTuple):
    """Keys and values of the decoder layers, stacked over layers.

    image_k, image_v: [layers, B, N, H, Dh], once per image (shared by its beams);
    text_k, text_v: [layers, B * beams, T, H, Dh], text slot s holding the s-th text token
      (prompt tokens first) once it has been through the decoder;
    text_valid: bool [B * beams, T], False for padded prompt slots.
    """

    image_k: jax.Array
    image_v: jax.Array
    text_k: jax.Array
    text_v: jax.Array
    text_valid: jax.Array

    @property
    def beams(self) -> int:
        return self.text_k.shape[1] // self.image_k.shape[1]

    def reorder(self, rows: jax.Array) -> KVCache:
        """The text rows `rows` [B * beams] (beam search keeps the continued beams)."""
        return self._replace(
            text_k=self.text_k[:, rows],
            text_v=self.text_v[:, rows],
            text_valid=self.text_valid[rows],
        )


def image_encoder(config: GitConfig, *, rngs, dtype, param_dtype) -> nnx.Module:
    """The image tower `config.image_tower` names: GIT's CLIP ViT, or `ConvTokens`."""
    kw = dict(rngs=rngs, dtype=dtype, param_dtype=param_dtype)
    if config.image_tower == "conv":
        return ConvTokens(
            config.conv_widths,
            image_size=config.vision.image_size,
            width=config.vision.hidden_size,
            foreground=config.conv_foreground,
            layer_norm_eps=config.vision.layer_norm_eps,
            cell_classes=config.conv_cell_classes,
            **kw,
        )
    return CLIPVisionEncoder(config.vision, **kw)


class GitForCausalLM(nnx.Module):
    """transformers' GitForCausalLM (inference: no dropout)."""

    def __init__(
        self, config: GitConfig, *, rngs: nnx.Rngs, dtype=jnp.float32, param_dtype=jnp.float32
    ):
        self.config = config
        kw = dict(rngs=rngs, dtype=dtype, param_dtype=param_dtype)
        d = config.hidden_size
        self.image_encoder = image_encoder(config, **kw)
        self.visual_projection = nnx.Linear(config.vision.hidden_size, d, **kw)
        self.visual_projection_norm = nnx.LayerNorm(
            d, epsilon=config.vision.layer_norm_eps, use_fast_variance=False, **kw
        )
        self.word_embeddings = nnx.Embed(config.vocab_size, d, **kw)
        self.position_embeddings = nnx.Embed(config.max_position_embeddings, d, **kw)
        self.embeddings_norm = nnx.LayerNorm(
            d, epsilon=config.layer_norm_eps, use_fast_variance=False, **kw
        )
        decoder = config.decoder
        self.layers = nnx.List([BertLayer(decoder, **kw) for _ in range(config.num_hidden_layers)])
        self.output = nnx.Linear(d, config.vocab_size, **kw)

    def encode_image(self, pixel_values: jax.Array) -> jax.Array:
        """pixel_values [B, S, S, 3] (preprocessed, NHWC) -> image tokens [B, N, D]."""
        return self.project_image(self.image_encoder(pixel_values).last_hidden_state)

    def project_image(self, tower_tokens: jax.Array) -> jax.Array:
        """The tower's last hidden state [B, N, Dv] -> the decoder's image tokens [B, N, D]."""
        x = self.image_encoder.post_layernorm(tower_tokens)  # GIT norms every token
        return self.visual_projection_norm(self.visual_projection(x))

    def embed_text(self, input_ids: jax.Array, position_ids: jax.Array) -> jax.Array:
        """input_ids, position_ids [B, L] -> [B, L, D]."""
        x = self.word_embeddings(input_ids) + self.position_embeddings(position_ids)
        return self.embeddings_norm(x)

    def __call__(
        self,
        pixel_values: jax.Array,
        input_ids: jax.Array,
        attention_mask: jax.Array | None = None,
        position_ids: jax.Array | None = None,
    ) -> jax.Array:
        """Logits [B, N + L, V] over [image tokens | text tokens], as transformers' forward.

        input_ids [B, L]; attention_mask [B, L] (1 = token, 0 = padding) or None;
        position_ids [B, L] or None (0..L-1).
        """
        return self.output(self._decoder(pixel_values, input_ids, attention_mask, position_ids)[0])

    def text_hidden(
        self,
        pixel_values: jax.Array | None,
        input_ids: jax.Array,
        attention_mask: jax.Array | None = None,
        *,
        image: jax.Array | None = None,
    ) -> jax.Array:
        """The decoder's last hidden states of the text positions [B, L, D]: `output` maps
        them to the last L positions of `__call__`'s logits (teacher forcing needs those
        only, or some of their columns). `image`: the image tokens [B, N, D] already
        encoded (`encode_image` / `project_image`), in place of pixel_values."""
        x, _ = self._decoder(pixel_values, input_ids, attention_mask, None, image=image)
        return x[:, self.config.num_image_tokens :]

    def _decoder(self, pixel_values, input_ids, attention_mask, position_ids, *, image=None):
        b, length = input_ids.shape
        if position_ids is None:
            position_ids = jnp.broadcast_to(jnp.arange(length), (b, length))
        if image is None:
            image = self.encode_image(pixel_values)  # [B, N, D]
        x = jnp.concatenate([image, self.embed_text(input_ids, position_ids)], axis=1)
        mask = git_mask(image.shape[1], length, attention_mask)  # [B|1, 1, N + L, N + L]
        kv = []
        for layer in self.layers:
            x, (k, v) = layer.with_kv(x, mask)
            kv.append((k, v))
        return x, kv  # [B, N + L, D]; per layer ([B, N + L, H, Dh],) * 2

    # ------------------------------------------------------------------------------------------
    # Decoding with a key/value cache
    # ------------------------------------------------------------------------------------------

    def prefill(
        self,
        pixel_values: jax.Array,
        input_ids: jax.Array,
        attention_mask: jax.Array,
        *,
        max_length: int,
        beams: int = 1,
    ) -> tuple[jax.Array, KVCache]:
        """Runs the images and the prompts (input_ids [B, P], left-padded as transformers'
        `generate` takes them, attention_mask [B, P]) through the decoder.

        Returns the logits at the last prompt position [B * beams, V] and the cache, with
        text slots for max_length tokens, each image's rows repeated for its beams.
        """
        b, p = input_ids.shape
        if max_length > self.config.max_position_embeddings:
            raise ValueError(
                f"max_length {max_length} exceeds max_position_embeddings "
                f"{self.config.max_position_embeddings}"
            )
        position_ids = prompt_positions(attention_mask)
        x, kv = self._decoder(pixel_values, input_ids, attention_mask, position_ids)
        n = self.config.num_image_tokens
        k, v = (jnp.stack([layer_kv[i] for layer_kv in kv]) for i in (0, 1))  # [layers, B, ...]
        pad = ((0, 0), (0, 0), (0, max_length - p), (0, 0), (0, 0))
        text_k, text_v = (jnp.repeat(jnp.pad(t[:, :, n:], pad), beams, axis=1) for t in (k, v))
        valid = jnp.pad(
            attention_mask.astype(bool), ((0, 0), (0, max_length - p)), constant_values=True
        )
        cache = KVCache(k[:, :, :n], v[:, :, :n], text_k, text_v, jnp.repeat(valid, beams, 0))
        logits = self.output(x[:, -1])  # [B, V]
        return jnp.repeat(logits, beams, axis=0), cache

    def decode_step(
        self, token: jax.Array, position: jax.Array, slot: jax.Array, cache: KVCache
    ) -> tuple[jax.Array, KVCache]:
        """One text token per row: token, position [R] (R = B * beams) at text slot `slot`
        (a scalar, the same for every row) -> logits [R, V] and the cache holding it."""
        x = self.embed_text(token[:, None], position[:, None])  # [R, 1, D]
        t = cache.text_k.shape[2]
        earlier = (jnp.arange(t) < slot)[None] & cache.text_valid  # [R, T]
        r, n = x.shape[0], cache.image_k.shape[2]
        keys = jnp.concatenate(
            [jnp.ones((r, n), bool), earlier, jnp.ones((r, 1), bool)], axis=1
        )  # [R, N + T + 1]: image, earlier text, this token
        mask = keys[:, None, None, :]
        text_k, text_v = cache.text_k, cache.text_v
        for i, layer in enumerate(self.layers):
            past = tuple(
                jnp.concatenate([jnp.repeat(image[i], cache.beams, 0), text[i]], axis=1)
                for image, text in ((cache.image_k, text_k), (cache.image_v, text_v))
            )  # [R, N + T, H, Dh] each
            x, (k, v) = layer.with_kv(x, mask, past)
            text_k = text_k.at[i].set(jax.lax.dynamic_update_slice_in_dim(text_k[i], k, slot, 1))
            text_v = text_v.at[i].set(jax.lax.dynamic_update_slice_in_dim(text_v[i], v, slot, 1))
        return self.output(x[:, 0]), cache._replace(text_k=text_k, text_v=text_v)


def git_mask(num_image: int, num_text: int, attention_mask: jax.Array | None) -> jax.Array:
    """bool [B|1, 1, N + L, N + L] for `attention`: image tokens see image tokens; a text
    token sees every image token and the unpadded text up to itself."""
    total = num_image + num_text
    q = jnp.arange(total)[:, None]
    k = jnp.arange(total)[None, :]
    mask = (k <= q) | ((q < num_image) & (k < num_image))  # causal, images both ways
    mask = mask[None, None]
    if attention_mask is not None:
        keys = jnp.concatenate(
            [jnp.ones((attention_mask.shape[0], num_image), bool), attention_mask.astype(bool)],
            axis=1,
        )
        mask = mask & keys[:, None, None, :]
    return mask


def prompt_positions(attention_mask: jax.Array) -> jax.Array:
    """Position ids of (left-)padded prompts [B, P], as transformers' `generate` makes them:
    the count of tokens so far minus one, 0 on padding."""
    m = attention_mask.astype(jnp.int32)
    return jnp.where(m == 0, 0, jnp.cumsum(m, axis=-1) - 1)


# ----------------------------------------------------------------------------------------------
# Weights
# ----------------------------------------------------------------------------------------------


def hf_key_map(config: GitConfig) -> dict[tuple, Source]:
    """Our state paths -> transformers' GitForCausalLM tensor names."""
    if config.image_tower == "conv":
        m = {("image_encoder", *k): Source.of(_CONV_PREFIX + ".".join(map(str, k))) for k in
             _conv_paths(config)}  # fmt: skip
    else:
        vision = vision_key_map(config.vision, _VISION_PREFIX)
        m = {("image_encoder", *k): s for k, s in vision.items()}
    e = "git.embeddings"
    p = "git.visual_projection.visual_projection"  # an nn.Sequential(Linear, LayerNorm)
    m.update(
        {
            ("word_embeddings", "embedding"): Source.of(f"{e}.word_embeddings.weight"),
            ("position_embeddings", "embedding"): Source.of(f"{e}.position_embeddings.weight"),
            ("embeddings_norm", "scale"): Source.of(f"{e}.LayerNorm.weight"),
            ("embeddings_norm", "bias"): Source.of(f"{e}.LayerNorm.bias"),
            ("visual_projection", "kernel"): Source.of(f"{p}.0.weight", transpose=True),
            ("visual_projection", "bias"): Source.of(f"{p}.0.bias"),
            ("visual_projection_norm", "scale"): Source.of(f"{p}.1.weight"),
            ("visual_projection_norm", "bias"): Source.of(f"{p}.1.bias"),
            ("output", "kernel"): Source.of("output.weight", transpose=True),
            ("output", "bias"): Source.of("output.bias"),
        }
    )
    for i in range(config.num_hidden_layers):
        m.update(layer_key_map(f"git.encoder.layer.{i}", ("layers", i)))
    return m


def _conv_paths(config: GitConfig) -> list[tuple]:
    """The conv tower's parameter paths (its tensors are stored under `_CONV_PREFIX` and
    the "."-joined path, in our layout: kernels HWIO, no transposes)."""
    kw = dict(dtype=jnp.float32, param_dtype=jnp.float32)
    tower = nnx.eval_shape(lambda: image_encoder(config, rngs=nnx.Rngs(0), **kw))
    state = nnx.to_pure_dict(nnx.state(tower, nnx.Param))
    return [tuple(k) for k in traverse_util.flatten_dict(state)]


def hf_config(config: GitConfig) -> dict:
    """The config.json of a transformers GitForCausalLM with `config` (float32 weights:
    transformers' `dtype="auto"` then builds a float32 model whatever the stored dtype)."""
    text = dataclasses.asdict(config)
    vision = text.pop("vision")
    vision.pop("projection_dim")
    eos = list(config.eos_token_id)
    text["eos_token_id"] = eos[0] if len(eos) == 1 else (eos or None)
    tower = {k: text.pop(k) for k in _TOWER_FIELDS}
    common = {
        **text,
        "position_embedding_type": "absolute",
        "tie_word_embeddings": False,
        "dtype": "float32",
    }
    if config.image_tower == "conv":
        kept = ("image_size", "hidden_size", "layer_norm_eps")
        return {
            "model_type": CONV_MODEL_TYPE,
            "architectures": list(CONV_ARCHITECTURES),
            **common,
            "conv_widths": list(tower["conv_widths"]),
            "conv_foreground": tower["conv_foreground"],
            "conv_cell_classes": tower["conv_cell_classes"],
            "vision_config": {"model_type": "conv_tokens", **{k: vision[k] for k in kept}},
        }
    return {
        "model_type": MODEL_TYPE,
        "architectures": list(ARCHITECTURES),
        **common,
        "vision_config": {"model_type": "git_vision_model", **vision},
    }


def hf_tensors(params, config: GitConfig, dtype=np.float32) -> dict[str, np.ndarray]:
    """Our parameters (a model, or the nested dict of `nnx.to_pure_dict`) as transformers'
    tensors, by name, in `dtype`: the inverse of `hf_key_map`."""
    return checkpoint_tensors(params, hf_key_map(config), dtype=dtype, what="GIT")


def save_git(path: str | os.PathLike, params, config: GitConfig, *, dtype=np.float32) -> str:
    """Writes config.json and model.safetensors (tensors in `dtype`) of a GitForCausalLM
    that `load_git` and transformers' `GitForCausalLM.from_pretrained` read; returns path."""
    from safetensors.numpy import save_file  # lazy: only writers need it

    path = os.fspath(path)
    os.makedirs(path, exist_ok=True)
    with open(os.path.join(path, "config.json"), "w") as f:
        json.dump(hf_config(config), f, indent=2)
    tensors = hf_tensors(params, config, dtype)
    save_file(tensors, os.path.join(path, "model.safetensors"), metadata={"format": "pt"})
    return path


# Sizes of the networks the project trains (`training.caption_trainer`); a config group's
# keys override them (`make_config`). "shapes": configs/shapes_captioner.py's captioner.
VARIANTS = {
    "runlocal": dict(
        hidden_size=32,
        num_hidden_layers=1,
        num_attention_heads=2,
        intermediate_size=64,
        max_position_embeddings=32,
        vision=dict(
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=1,
            num_attention_heads=2,
            patch_size=4,
        ),
    ),
    "shapes": dict(
        hidden_size=64,
        num_hidden_layers=3,
        num_attention_heads=4,
        intermediate_size=256,
        max_position_embeddings=64,
        vision=dict(
            hidden_size=96,
            intermediate_size=384,
            num_hidden_layers=4,
            num_attention_heads=4,
            patch_size=8,
        ),
    ),
}
# The shapes captioner with the conv image tower: 64 px -> 8x8 cells of 128 channels (three
# stride-2 stages), each a token of width 96, and a colour-blind foreground channel.
VARIANTS["shapes_conv"] = dict(
    VARIANTS["shapes"],
    image_tower="conv",
    conv_widths=(32, 64, 128),
    conv_foreground=True,
    vision=dict(hidden_size=96),
)
VARIANTS["runlocal_conv"] = dict(
    VARIANTS["runlocal"],
    image_tower="conv",
    conv_widths=(8, 16),
    conv_foreground=True,
    vision=dict(hidden_size=32),
)


def make_config(variant: str, *, image_size: int, **overrides) -> GitConfig:
    """The GitConfig of a `VARIANTS` entry at `image_size`, with GitConfig fields (and
    `vision`, a dict of CLIPVisionConfig fields) overridden."""
    if variant not in VARIANTS:
        raise ValueError(f"unknown GIT variant {variant!r}; expected one of {tuple(VARIANTS)}")
    values = {**VARIANTS[variant], **overrides}
    vision = {**VARIANTS[variant]["vision"], **dict(overrides.get("vision") or {})}
    if values.get("image_tower") == "conv":
        values["conv_widths"] = tuple(values.get("conv_widths") or ())
        vision["patch_size"] = 2 ** len(values["conv_widths"])
    values["vision"] = CLIPVisionConfig(**vision, image_size=image_size, projection_dim=None)
    if "eos_token_id" in values:
        values["eos_token_id"] = tuple(np.atleast_1d(values["eos_token_id"]).tolist())
    return GitConfig(**values)


def read_git_config(path: str | os.PathLike) -> GitConfig:
    """The GitConfig of a model directory; CheckpointError if its config.json is not a
    GitForCausalLM's or asks for something this code does not support."""
    path = os.fspath(path)
    hf = read_config(path)
    architectures = list(hf.get("architectures") or [])
    known = {MODEL_TYPE: ARCHITECTURES, CONV_MODEL_TYPE: CONV_ARCHITECTURES}
    allowed = known.get(hf.get("model_type"))
    if allowed is None or (architectures and not any(a in allowed for a in architectures)):
        raise CheckpointError(
            f"{os.path.join(path, 'config.json')} is model_type {hf.get('model_type')!r}, "
            f"architectures {architectures}: not a GIT captioning model "
            f"(model_type {MODEL_TYPE!r}, {', '.join(ARCHITECTURES)}; or "
            f"{CONV_MODEL_TYPE!r}, {', '.join(CONV_ARCHITECTURES)})"
        )
    try:
        return GitConfig.from_hf(hf)
    except (TypeError, ValueError) as e:
        raise CheckpointError(f"{os.path.join(path, 'config.json')}: {e}") from None


def load_git(path: str | os.PathLike, *, dtype=jnp.float32) -> GitForCausalLM:
    """A GitForCausalLM from a Hugging Face-layout directory (config.json and
    model.safetensors, or its sharded index), loaded strictly (`weights.load_into`): the
    config and every tensor name and shape are checked before anything is computed."""
    config = read_git_config(path)
    checkpoint = Checkpoint(path)
    build = functools.partial(GitForCausalLM, config, dtype=dtype, param_dtype=dtype)
    return load_into(
        nnx.eval_shape(lambda: build(rngs=nnx.Rngs(0))),
        hf_key_map(config),
        checkpoint,
        dtype=dtype,
        unused=UNUSED,
        what="GitForCausalLM",
    )
