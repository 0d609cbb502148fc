"""The CLIP image tower (Radford et al. 2021, "Learning Transferable Visual Models From
Natural Language Supervision", sec. 2.4), as transformers' `CLIPVisionModel` and
`CLIPVisionModelWithProjection`; GIT's image encoder is the same network
(`imagen_jax.models.git`).

The tower is a pre-norm ViT: non-overlapping patches embedded by a bias-free convolution,
a learned class token, learned absolute positions, a layer norm before the encoder
(transformers spells it `pre_layrnorm`), the text tower's encoder layers without a mask
(`imagen_jax.text.clip.CLIPLayer`), a layer norm on the class token's final state, and
(WithProjection, or inside a CLIPModel) the bias-free `visual_projection`. Images are
NHWC: pixel_values [B, image_size, image_size, 3], float, already normalized (by
`imagen_jax.images.ImageProcessor`, CLIP's preprocessing). Position embeddings are not
interpolated: other image sizes are refused.
"""

from __future__ import annotations

import dataclasses
import functools
import os
from collections.abc import Collection
from typing import NamedTuple

import jax
import jax.numpy as jnp
from flax import nnx

from imagen_jax.text.clip import CLIPLayer, layer_key_map
from imagen_jax.text.layers import activation
from imagen_jax.weights import Checkpoint, CheckpointError, Source, load_into, read_config

MODEL_TYPES = ("clip_vision_model", "clip")
ARCHITECTURES = ("CLIPVisionModel", "CLIPVisionModelWithProjection", "CLIPModel")
_WITH_PROJECTION = ("CLIPVisionModelWithProjection", "CLIPModel")


@dataclasses.dataclass(frozen=True)
class CLIPVisionConfig:
    # Defaults: transformers' CLIPVisionConfig (ViT-B/32).
    hidden_size: int = 768
    intermediate_size: int = 3072
    num_hidden_layers: int = 12
    num_attention_heads: int = 12
    num_channels: int = 3
    image_size: int = 224
    patch_size: int = 32
    hidden_act: str = "quick_gelu"  # quick_gelu (OpenAI CLIP) | gelu (OpenCLIP)
    layer_norm_eps: float = 1e-5
    projection_dim: int | None = None  # set: visual_projection (WithProjection, CLIPModel)

    @classmethod
    def from_hf(cls, hf: dict) -> CLIPVisionConfig:
        """From a config.json of a CLIPVisionModel[WithProjection] or a full CLIPModel."""
        architectures = hf.get("architectures") or ()
        projection = any(a in _WITH_PROJECTION for a in architectures)
        if hf.get("model_type") == "clip":  # the model's projection_dim, not vision_config's
            hf = {
                **(hf.get("vision_config") or {}),
                "projection_dim": hf.get("projection_dim", 512),
            }
        fields = {f.name for f in dataclasses.fields(cls)}
        values = {k: v for k, v in hf.items() if k in fields}
        values["projection_dim"] = hf.get("projection_dim", 512) if projection else None
        config = cls(**values)
        activation(config.hidden_act)
        if config.image_size % config.patch_size:
            raise ValueError(
                f"image_size {config.image_size} is not a multiple of patch_size "
                f"{config.patch_size}"
            )
        return config

    @property
    def num_patches(self) -> int:
        return (self.image_size // self.patch_size) ** 2


class VisionOutput(NamedTuple):
    """last_hidden_state [B, 1 + N, D] (the last layer's output, class token first, no final
    norm); hidden_states: the embeddings after pre_layrnorm, then every layer's output;
    pooled [B, D]: post_layernorm of the class token, projected to [B, P] if the model has
    a visual_projection (transformers' `image_embeds` / `get_image_features`)."""

    last_hidden_state: jax.Array
    hidden_states: tuple[jax.Array, ...]
    pooled: jax.Array


class PatchEmbedding(nnx.Module):
    """The bias-free Conv2d with kernel = stride = patch_size, computed as one matmul over
    the non-overlapping patches; the weight keeps PyTorch's layout [D, C, p, p] so that the
    checkpoint tensor loads unchanged."""

    def __init__(self, channels: int, dim: int, patch: int, *, rngs, dtype, param_dtype):
        init = nnx.initializers.lecun_normal(in_axis=(1, 2, 3), out_axis=0)
        self.weight = nnx.Param(init(rngs.params(), (dim, channels, patch, patch), param_dtype))
        self.patch = patch
        self.dtype = dtype

    def __call__(self, x: jax.Array) -> jax.Array:  # [B, H, W, C] -> [B, N, D]
        b, h, w, c = x.shape
        p = self.patch
        gh, gw = h // p, w // p
        x = x[:, : gh * p, : gw * p].reshape(b, gh, p, gw, p, c).astype(self.dtype)
        out = jnp.einsum("byixjc,dcij->byxd", x, self.weight[...].astype(self.dtype))
        return out.reshape(b, gh * gw, -1)  # row-major over the grid, as torch's flatten(2)


class CLIPVisionEncoder(nnx.Module):
    """transformers' CLIPVisionModel, or CLIPVisionModelWithProjection if projection_dim."""

    def __init__(
        self,
        config: CLIPVisionConfig,
        *,
        rngs: nnx.Rngs,
        dtype=jnp.float32,
        param_dtype=jnp.float32,
    ):
        self.config = config
        kw = dict(rngs=rngs, dtype=dtype, param_dtype=param_dtype)
        d = config.hidden_size
        norm = functools.partial(
            nnx.LayerNorm, d, epsilon=config.layer_norm_eps, use_fast_variance=False, **kw
        )
        self.patch_embedding = PatchEmbedding(config.num_channels, d, config.patch_size, **kw)
        self.class_embedding = nnx.Param(
            nnx.initializers.normal(d**-0.5)(rngs.params(), (d,), param_dtype)
        )
        self.position_embedding = nnx.Embed(config.num_patches + 1, d, **kw)
        self.pre_layrnorm = norm()
        self.layers = nnx.List([CLIPLayer(config, **kw) for _ in range(config.num_hidden_layers)])
        self.post_layernorm = norm()
        self.visual_projection = (
            nnx.Linear(d, config.projection_dim, use_bias=False, **kw)
            if config.projection_dim
            else None
        )

    def __call__(self, pixel_values: jax.Array) -> VisionOutput:
        """pixel_values [B, image_size, image_size, C], preprocessed -> VisionOutput."""
        b, h, w, _ = pixel_values.shape
        size = self.config.image_size
        if (h, w) != (size, size):
            raise ValueError(f"input images are {h}x{w}; the model takes {size}x{size}")
        x = self.patch_embedding(pixel_values)  # [B, N, D]
        cls = jnp.broadcast_to(self.class_embedding[...].astype(x.dtype), (b, 1, x.shape[-1]))
        x = jnp.concatenate([cls, x], axis=1)  # [B, 1 + N, D]
        x = x + self.position_embedding(jnp.arange(x.shape[1]))
        x = self.pre_layrnorm(x)
        hidden = [x]
        for layer in self.layers:
            x = layer(x, None)
            hidden.append(x)
        pooled = self.post_layernorm(x[:, 0])  # [B, D]
        if self.visual_projection is not None:
            pooled = self.visual_projection(pooled)  # [B, projection_dim]
        return VisionOutput(x, tuple(hidden), pooled)


# ----------------------------------------------------------------------------------------------
# Weights
# ----------------------------------------------------------------------------------------------

# In a full CLIPModel checkpoint: the text tower and the logit scale; position_ids buffers.
UNUSED = (
    r"text_model\..*",
    r"text_projection\.weight",
    r"logit_scale",
    r"(vision_model\.)?embeddings\.position_ids",
)


def checkpoint_prefix(keys: Collection[str]) -> str:
    """CLIPModel, CLIPVisionModelWithProjection and CLIPVisionModel of transformers < 5 nest
    the tower under `vision_model.`; v5's CLIPVisionModel does not."""
    return "vision_model." if "vision_model.embeddings.class_embedding" in keys else ""


def hf_key_map(config: CLIPVisionConfig, prefix: str = "vision_model.") -> dict[tuple, Source]:
    """Our state paths -> transformers' CLIPVisionModel[WithProjection] tensor names."""
    v = prefix
    m = {
        ("patch_embedding", "weight"): Source.of(f"{v}embeddings.patch_embedding.weight"),
        ("class_embedding",): Source.of(f"{v}embeddings.class_embedding"),
        ("position_embedding", "embedding"): Source.of(f"{v}embeddings.position_embedding.weight"),
    }
    for n in ("pre_layrnorm", "post_layernorm"):
        m[(n, "scale")] = Source.of(f"{v}{n}.weight")
        m[(n, "bias")] = Source.of(f"{v}{n}.bias")
    if config.projection_dim:
        m[("visual_projection", "kernel")] = Source.of("visual_projection.weight", transpose=True)
    for i in range(config.num_hidden_layers):
        m.update(layer_key_map(f"{v}encoder.layers.{i}", ("layers", i)))
    return m


def load_vision_model(path: str | os.PathLike, *, dtype=jnp.float32) -> CLIPVisionEncoder:
    """The image tower of a Hugging Face-layout directory (CLIPVisionModel,
    CLIPVisionModelWithProjection, or a full CLIPModel whose text tower is skipped), loaded
    strictly (`imagen_jax.weights.load_into`)."""
    path = os.fspath(path)
    hf = read_config(path)
    architectures = list(hf.get("architectures") or [])
    bad_arch = architectures and not any(a in ARCHITECTURES for a in architectures)
    if hf.get("model_type") not in MODEL_TYPES or bad_arch:
        raise CheckpointError(
            f"{os.path.join(path, 'config.json')} is model_type {hf.get('model_type')!r}, "
            f"architectures {architectures}: not a CLIP image tower ({', '.join(ARCHITECTURES)})"
        )
    try:
        config = CLIPVisionConfig.from_hf(hf)
    except (TypeError, ValueError) as e:
        raise CheckpointError(f"{path}/config.json: {e}") from None
    checkpoint = Checkpoint(path)
    build = functools.partial(CLIPVisionEncoder, config, dtype=dtype, param_dtype=dtype)
    return load_into(
        nnx.eval_shape(lambda: build(rngs=nnx.Rngs(0))),
        hf_key_map(config, checkpoint_prefix(frozenset(checkpoint))),
        checkpoint,
        dtype=dtype,
        unused=UNUSED,
        what=f"CLIPVisionEncoder ({hf.get('model_type')})",
    )
