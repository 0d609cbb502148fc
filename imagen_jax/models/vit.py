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

SigLIP's image tower (Zhai et al. 2023, "Sigmoid Loss for Language Image Pre-Training";
transformers' `SiglipVisionModel`) is the same network with `family="siglip"`: the patch
convolution has a bias, there is no class token and no pre-encoder layer norm, and the
pooled output is a multi-head attention-pooling head (`MAPHead`, big_vision's "map") over
all post-normed tokens, without a projection.
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

from imagen_jax.text.clip import CLIPLayer, check_layer_config, layer_key_map
from imagen_jax.text.layers import activation, attention
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
    family: str = "clip"  # clip | siglip (see the module docstring)

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
        return cls(**values).checked()

    @classmethod
    def siglip_from_hf(cls, hf: dict) -> CLIPVisionConfig:
        """From the config.json of a SiglipVisionModel or the vision_config of a SiglipModel;
        ValueError names a setting this code lacks."""
        if hf.get("model_type") == "siglip":
            hf = hf.get("vision_config") or {}
        if not hf.get("vision_use_head", True):
            raise ValueError("vision_use_head=False is not supported (a SigLIP tower pools)")
        fields = {f.name for f in dataclasses.fields(cls)} - {"projection_dim", "family"}
        # transformers' SiglipVisionConfig defaults (google/siglip-base-patch16-224)
        values = dict(patch_size=16, hidden_act="gelu_pytorch_tanh", layer_norm_eps=1e-6)
        values.update({k: v for k, v in hf.items() if k in fields})
        return cls(**values, family="siglip").checked()

    def checked(self) -> CLIPVisionConfig:
        """self, or ValueError naming a setting that the tower cannot take."""
        check_layer_config(self)
        for key in ("image_size", "patch_size"):
            if not isinstance(getattr(self, key), int):
                raise ValueError(f"{key}={getattr(self, key)!r}: only square sizes (an int)")
        if self.image_size % self.patch_size:
            raise ValueError(
                f"image_size {self.image_size} is not a multiple of patch_size {self.patch_size}"
            )
        return self

    @property
    def num_patches(self) -> int:
        return (self.image_size // self.patch_size) ** 2

    @property
    def class_token(self) -> bool:
        """CLIP's towers prepend a learned class token (and norm before the encoder)."""
        return self.family == "clip"

    @property
    def width(self) -> int:
        """The width of the pooled output: projection_dim, else hidden_size."""
        return self.projection_dim or self.hidden_size


class VisionOutput(NamedTuple):
    """last_hidden_state [B, 1 + N, D] (the last layer's output, class token first, no final
    norm; SigLIP: [B, N, D]); hidden_states: the embeddings after pre_layrnorm (SigLIP: the
    embeddings), then every layer's output; pooled [B, D]: post_layernorm of the class
    token, projected to [B, P] if the model has a visual_projection (transformers'
    `image_embeds` / `get_image_features`); SigLIP: the MAP head's output."""

    last_hidden_state: jax.Array
    hidden_states: tuple[jax.Array, ...]
    pooled: jax.Array


class PatchEmbedding(nnx.Module):
    """The bias-free Conv2d with kernel = stride = patch_size, computed as one matmul over
    the non-overlapping patches; the weight keeps PyTorch's layout [D, C, p, p] so that the
    checkpoint tensor loads unchanged."""

    def __init__(
        self, channels: int, dim: int, patch: int, *, bias=False, rngs, dtype, param_dtype
    ):
        init = nnx.initializers.lecun_normal(in_axis=(1, 2, 3), out_axis=0)
        self.weight = nnx.Param(init(rngs.params(), (dim, channels, patch, patch), param_dtype))
        self.bias = nnx.Param(jnp.zeros((dim,), param_dtype)) if bias else None
        self.patch = patch
        self.dtype = dtype

    def __call__(self, x: jax.Array) -> jax.Array:  # [B, H, W, C] -> [B, N, D]
        b, h, w, c = x.shape
        p = self.patch
        gh, gw = h // p, w // p
        x = x[:, : gh * p, : gw * p].reshape(b, gh, p, gw, p, c).astype(self.dtype)
        out = jnp.einsum("byixjc,dcij->byxd", x, self.weight[...].astype(self.dtype))
        if self.bias is not None:
            out = out + self.bias[...].astype(self.dtype)
        return out.reshape(b, gh * gw, -1)  # row-major over the grid, as torch's flatten(2)


class MAPHead(nnx.Module):
    """Multi-head attention pooling (big_vision's `MAPHead`, transformers'
    `SiglipMultiheadAttentionPoolingHead`): one learned probe attends over the tokens
    (torch's nn.MultiheadAttention, whose fused `in_proj` is kept as one [D, 3D] kernel),
    then a pre-norm MLP with a residual; the probe's output is the pooled vector."""

    def __init__(self, config: CLIPVisionConfig, *, rngs, dtype, param_dtype):
        kw = dict(rngs=rngs, dtype=dtype, param_dtype=param_dtype)
        d = config.hidden_size
        init = nnx.initializers.xavier_uniform(in_axis=-1, out_axis=-2)
        self.probe = nnx.Param(init(rngs.params(), (1, 1, d), param_dtype))
        self.in_proj = nnx.Linear(d, 3 * d, **kw)  # [q | k | v]
        self.out_proj = nnx.Linear(d, d, **kw)
        self.layernorm = nnx.LayerNorm(
            d, epsilon=config.layer_norm_eps, use_fast_variance=False, **kw
        )
        self.fc1 = nnx.Linear(d, config.intermediate_size, **kw)
        self.fc2 = nnx.Linear(config.intermediate_size, d, **kw)
        self.act = activation(config.hidden_act)
        self.num_heads = config.num_attention_heads
        self.dtype = dtype

    def __call__(self, x: jax.Array) -> jax.Array:  # [B, N, D] -> [B, D]
        b, _, d = x.shape
        w = self.in_proj.kernel[...].astype(self.dtype)  # [D, 3D]
        bias = self.in_proj.bias[...].astype(self.dtype)
        probe = self.probe[...].astype(self.dtype)  # [1, 1, D]
        q = jnp.broadcast_to(probe @ w[:, :d] + bias[:d], (b, 1, d))
        k, v = jnp.split(x.astype(self.dtype) @ w[:, d:] + bias[d:], 2, axis=-1)  # [B, N, D]
        h = self.num_heads
        q, k, v = (t.reshape(*t.shape[:2], h, d // h) for t in (q, k, v))
        out = attention(q, k, v, scale=(d // h) ** -0.5)  # [B, 1, H, Dh]
        out = self.out_proj(out.reshape(b, 1, d))
        out = out + self.fc2(self.act(self.fc1(self.layernorm(out))))
        return out[:, 0]


class CLIPVisionEncoder(nnx.Module):
    """transformers' CLIPVisionModel, or CLIPVisionModelWithProjection if projection_dim;
    SiglipVisionModel if family == "siglip"."""

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
        clip = config.class_token
        self.patch_embedding = PatchEmbedding(
            config.num_channels, d, config.patch_size, bias=not clip, **kw
        )
        self.class_embedding = (
            nnx.Param(nnx.initializers.normal(d**-0.5)(rngs.params(), (d,), param_dtype))
            if clip
            else None
        )
        self.position_embedding = nnx.Embed(config.num_patches + clip, d, **kw)
        self.pre_layrnorm = norm() if clip else None
        self.layers = nnx.List([CLIPLayer(config, **kw) for _ in range(config.num_hidden_layers)])
        self.post_layernorm = norm()
        self.head = None if clip else MAPHead(config, **kw)
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
        if self.class_embedding is not None:
            cls = self.class_embedding[...].astype(x.dtype)
            x = jnp.concatenate([jnp.broadcast_to(cls, (b, 1, x.shape[-1])), x], axis=1)
        x = x + self.position_embedding(jnp.arange(x.shape[1]))  # [B, 1 + N, D] (SigLIP: N)
        if self.pre_layrnorm is not None:
            x = self.pre_layrnorm(x)
        hidden = [x]
        for layer in self.layers:
            x = layer(x, None)
            hidden.append(x)
        if self.head is not None:
            pooled = self.head(self.post_layernorm(x))  # [B, D]
        else:
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
        ("position_embedding", "embedding"): Source.of(f"{v}embeddings.position_embedding.weight"),
    }
    norms = ["post_layernorm"]
    if config.class_token:
        m[("class_embedding",)] = Source.of(f"{v}embeddings.class_embedding")
        norms.append("pre_layrnorm")
    else:
        m[("patch_embedding", "bias")] = Source.of(f"{v}embeddings.patch_embedding.bias")
        m.update(map_head_key_map(f"{v}head", ("head",)))
    for n in norms:
        m[(n, "scale")] = Source.of(f"{v}{n}.weight")
        m[(n, "bias")] = Source.of(f"{v}{n}.bias")
    if config.projection_dim:
        m[("visual_projection", "kernel")] = Source.of("visual_projection.weight", transpose=True)
    for i in range(config.num_hidden_layers):
        m.update(layer_key_map(f"{v}encoder.layers.{i}", ("layers", i)))
    return m


def map_head_key_map(hf: str, ours: tuple) -> dict[tuple, Source]:
    """MAPHead's state paths (under `ours`) -> the tensors of transformers'
    SiglipMultiheadAttentionPoolingHead named `hf`."""
    a = f"{hf}.attention"
    m = {
        (*ours, "probe"): Source.of(f"{hf}.probe"),
        (*ours, "in_proj", "kernel"): Source.of(f"{a}.in_proj_weight", transpose=True),
        (*ours, "in_proj", "bias"): Source.of(f"{a}.in_proj_bias"),
        (*ours, "out_proj", "kernel"): Source.of(f"{a}.out_proj.weight", transpose=True),
        (*ours, "out_proj", "bias"): Source.of(f"{a}.out_proj.bias"),
        (*ours, "layernorm", "scale"): Source.of(f"{hf}.layernorm.weight"),
        (*ours, "layernorm", "bias"): Source.of(f"{hf}.layernorm.bias"),
    }
    for n in ("fc1", "fc2"):
        m[(*ours, n, "kernel")] = Source.of(f"{hf}.mlp.{n}.weight", transpose=True)
        m[(*ours, n, "bias")] = Source.of(f"{hf}.mlp.{n}.bias")
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
