"""The CLIP text transformer (Radford et al. 2021, "Learning Transferable Visual Models From
Natural Language Supervision"), as transformers' `CLIPTextModel` and
`CLIPTextModelWithProjection`.

Pre-norm layers with a causal mask, learned absolute positions, a final layer norm, and a
pooled output taken at the end-of-text token (projected by WithProjection). Stable
Diffusion 1.x/2.x condition on the last hidden state; SDXL on the penultimate layer
(`hidden_states[-2]`, without the final norm) of two encoders plus the projected pooled
output of the second; SD3 on two such CLIPs and a T5.

SigLIP's text tower (Zhai et al. 2023; transformers' `SiglipTextModel`) is the same network
with `family="siglip"`: no causal mask (only the padding mask), the pooled state is the
last position's (SigLIP pads to a fixed length), and its projection (`head`) has a bias.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Collection
from typing import Protocol

import jax
import jax.numpy as jnp
from flax import nnx

from imagen_jax.text.layers import EncoderOutput, activation, attention
from imagen_jax.weights import Source

MODEL_TYPES = ("clip_text_model", "clip")
ARCHITECTURES = ("CLIPTextModel", "CLIPTextModelWithProjection", "CLIPModel")
_WITH_PROJECTION = ("CLIPTextModelWithProjection", "CLIPModel")
FAMILIES = ("clip", "siglip")  # the towers' two forms (see the module docstrings)

# A full CLIPModel checkpoint also holds the vision tower; older ones the position_ids buffer.
UNUSED = (
    r"vision_model\..*",
    r"visual_projection\.weight",
    r"logit_scale",
    r"(text_model\.)?embeddings\.position_ids",
)


@dataclasses.dataclass(frozen=True)
class CLIPTextConfig:
    # Defaults: transformers' CLIPTextConfig.
    vocab_size: int = 49408
    hidden_size: int = 512
    intermediate_size: int = 2048
    num_hidden_layers: int = 12
    num_attention_heads: int = 8
    max_position_embeddings: int = 77
    hidden_act: str = "quick_gelu"  # quick_gelu (OpenAI CLIP) | gelu (OpenCLIP: SD2, SDXL's 2nd)
    layer_norm_eps: float = 1e-5
    eos_token_id: int = 49407  # 2 in configs from before transformers PR #24773: see pool_eos
    projection_dim: int | None = None  # set: CLIPTextModelWithProjection's text_projection
    family: str = "clip"  # clip | siglip (see the module docstring)

    @classmethod
    def from_hf(cls, hf: dict) -> CLIPTextConfig:
        """From a config.json of a CLIPTextModel[WithProjection] or a full CLIPModel."""
        architectures = hf.get("architectures") or ()
        projection = any(a in _WITH_PROJECTION for a in architectures)
        if hf.get("model_type") == "clip":  # full CLIPModel: its text tower; the projection
            # is the model's (text_config holds a projection_dim of its own that is unused)
            hf = {**(hf.get("text_config") or {}), "projection_dim": hf.get("projection_dim", 512)}
        fields = {f.name for f in dataclasses.fields(cls)}
        values = {k: v for k, v in hf.items() if k in fields}
        values["projection_dim"] = hf.get("projection_dim", 512) if projection else None
        return cls(**values).checked()

    @classmethod
    def siglip_from_hf(cls, hf: dict) -> CLIPTextConfig:
        """From the config.json of a SiglipTextModel or the text_config of a SiglipModel."""
        if hf.get("model_type") == "siglip":
            hf = hf.get("text_config") or {}
        fields = {f.name for f in dataclasses.fields(cls)}
        fields -= {"projection_dim", "family", "eos_token_id"}
        # transformers' SiglipTextConfig defaults (google/siglip-base-patch16-224)
        values = dict(
            vocab_size=32000,
            hidden_size=768,
            intermediate_size=3072,
            num_attention_heads=12,
            max_position_embeddings=64,
            hidden_act="gelu_pytorch_tanh",
            layer_norm_eps=1e-6,
        )
        values.update({k: v for k, v in hf.items() if k in fields})
        projection = hf.get("projection_size") or values["hidden_size"]
        return cls(**values, projection_dim=projection, family="siglip").checked()

    def checked(self) -> CLIPTextConfig:
        """self, or ValueError naming a setting that the tower cannot take."""
        check_layer_config(self)
        return self

    @property
    def width(self) -> int:
        """The width of the pooled output: projection_dim, else hidden_size."""
        return self.projection_dim or self.hidden_size


class LayerConfig(Protocol):
    """What CLIPAttention and CLIPLayer read from a config: a CLIPTextConfig here, or the
    image tower's CLIPVisionConfig (imagen_jax/models/vit.py), whose layers are
    the same apart from the mask."""

    hidden_size: int
    intermediate_size: int
    num_attention_heads: int
    hidden_act: str
    layer_norm_eps: float
    family: str


def check_layer_config(config: LayerConfig) -> None:
    """ValueError naming a setting of either tower that CLIPLayer cannot take."""
    if config.family not in FAMILIES:
        raise ValueError(f"family={config.family!r}; expected one of {FAMILIES}")
    try:
        activation(config.hidden_act)
    except ValueError as e:
        raise ValueError(f"hidden_act={config.hidden_act!r}: {e}") from None
    if config.hidden_size % config.num_attention_heads:
        raise ValueError(
            f"hidden_size={config.hidden_size} is not a multiple of "
            f"num_attention_heads={config.num_attention_heads}"
        )


def pool_eos(hidden: jax.Array, input_ids: jax.Array, eos_token_id: int) -> jax.Array:
    """The state at each sequence's end-of-text token, [B, L, D] -> [B, D].

    transformers' rule, kept exactly: configs with the legacy eos_token_id == 2 take the
    position of the largest token id (the EOS token has the largest id in CLIP's
    vocabulary, unless tokens were added); others the first position of eos_token_id
    (position 0 if there is none).
    """
    if eos_token_id == 2:
        index = jnp.argmax(input_ids, axis=-1)
    else:
        index = jnp.argmax((input_ids == eos_token_id).astype(jnp.int32), axis=-1)
    return jnp.take_along_axis(hidden, index[:, None, None], axis=1)[:, 0]


class CLIPAttention(nnx.Module):
    def __init__(self, config: LayerConfig, *, rngs, dtype, param_dtype):
        d = config.hidden_size
        self.num_heads = config.num_attention_heads
        linear = functools.partial(
            nnx.Linear, d, d, dtype=dtype, param_dtype=param_dtype, rngs=rngs
        )
        self.q_proj, self.k_proj, self.v_proj, self.out_proj = (linear() for _ in range(4))

    def __call__(self, x, mask):  # x [B, L, D]; mask: bool [B|1, 1, L, L], or None
        heads = (*x.shape[:2], self.num_heads, -1)
        q, k, v = (f(x).reshape(heads) for f in (self.q_proj, self.k_proj, self.v_proj))
        out = attention(q, k, v, scale=q.shape[-1] ** -0.5, mask=mask)  # [B, L, H, Dh]
        return self.out_proj(out.reshape(*x.shape[:2], -1))


class CLIPLayer(nnx.Module):
    def __init__(self, config: LayerConfig, *, rngs, dtype, param_dtype):
        kw = dict(rngs=rngs, dtype=dtype, param_dtype=param_dtype)
        d = config.hidden_size
        self.layer_norm1 = nnx.LayerNorm(
            d, epsilon=config.layer_norm_eps, use_fast_variance=False, **kw
        )
        self.self_attn = CLIPAttention(config, **kw)
        self.layer_norm2 = nnx.LayerNorm(
            d, epsilon=config.layer_norm_eps, use_fast_variance=False, **kw
        )
        self.fc1 = nnx.Linear(d, config.intermediate_size, **kw)
        self.fc2 = nnx.Linear(config.intermediate_size, d, **kw)
        self.act = activation(config.hidden_act)

    def __call__(self, x, mask):
        x = x + self.self_attn(self.layer_norm1(x), mask)
        return x + self.fc2(self.act(self.fc1(self.layer_norm2(x))))


class CLIPTextEncoder(nnx.Module):
    """transformers' CLIPTextModel, or CLIPTextModelWithProjection if projection_dim is set;
    SiglipTextModel if family == "siglip"."""

    def __init__(
        self,
        config: CLIPTextConfig,
        *,
        rngs: nnx.Rngs,
        dtype=jnp.float32,
        param_dtype=jnp.float32,
    ):
        self.config = config
        kw = dict(rngs=rngs, dtype=dtype, param_dtype=param_dtype)
        d = config.hidden_size
        self.token_embedding = nnx.Embed(config.vocab_size, d, **kw)
        self.position_embedding = nnx.Embed(config.max_position_embeddings, d, **kw)
        self.layers = nnx.List([CLIPLayer(config, **kw) for _ in range(config.num_hidden_layers)])
        self.final_layer_norm = nnx.LayerNorm(
            d, epsilon=config.layer_norm_eps, use_fast_variance=False, **kw
        )
        self.text_projection = (
            nnx.Linear(d, config.projection_dim, use_bias=config.family == "siglip", **kw)
            if config.projection_dim
            else None
        )

    def __call__(self, input_ids: jax.Array, attention_mask: jax.Array | None = None):
        """input_ids [B, L] int; attention_mask [B, L] (1 = token) or None -> EncoderOutput.

        The mask is causal (not in SigLIP); attention_mask also hides padded keys. Stable
        Diffusion passes none (its padding is the EOS token, which later tokens do attend to).
        """
        length = input_ids.shape[1]
        if length > self.config.max_position_embeddings:
            raise ValueError(
                f"sequence length {length} exceeds max_position_embeddings "
                f"{self.config.max_position_embeddings}"
            )
        x = self.token_embedding(input_ids) + self.position_embedding(jnp.arange(length))
        siglip = self.config.family == "siglip"
        mask = None if siglip else jnp.tril(jnp.ones((length, length), bool))[None, None]
        if attention_mask is not None:  # [B, 1, 1, L] keys, with the causal [1, 1, L, L]
            keys = attention_mask.astype(bool)[:, None, None, :]
            mask = keys if mask is None else mask & keys
        hidden = [x]  # [B, L, D] each
        for layer in self.layers:
            x = layer(x, mask)
            hidden.append(x)
        last = self.final_layer_norm(x)
        eos = self.config.eos_token_id
        pooled = last[:, -1] if siglip else pool_eos(last, input_ids, eos)  # [B, D]
        if self.text_projection is not None:
            pooled = self.text_projection(pooled)  # [B, projection_dim]
        return EncoderOutput(last, tuple(hidden), pooled)


def checkpoint_prefix(keys: Collection[str]) -> str:
    """Checkpoints of transformers < 5 (all public ones) and of CLIPTextModelWithProjection
    or CLIPModel nest the text tower under `text_model.`; v5's CLIPTextModel does not."""
    return "text_model." if "text_model.embeddings.token_embedding.weight" in keys else ""


def hf_key_map(config: CLIPTextConfig, prefix: str = "text_model.") -> dict[tuple, Source]:
    """Our state paths -> transformers' CLIPTextModel[WithProjection] tensor names."""
    t = prefix
    m = {
        ("token_embedding", "embedding"): Source.of(f"{t}embeddings.token_embedding.weight"),
        ("position_embedding", "embedding"): Source.of(f"{t}embeddings.position_embedding.weight"),
        ("final_layer_norm", "scale"): Source.of(f"{t}final_layer_norm.weight"),
        ("final_layer_norm", "bias"): Source.of(f"{t}final_layer_norm.bias"),
    }
    if config.family == "siglip":  # the projection is the tower's own `head`, with a bias
        m[("text_projection", "kernel")] = Source.of(f"{t}head.weight", transpose=True)
        m[("text_projection", "bias")] = Source.of(f"{t}head.bias")
    elif config.projection_dim:
        m[("text_projection", "kernel")] = Source.of("text_projection.weight", transpose=True)
    for i in range(config.num_hidden_layers):
        m.update(layer_key_map(f"{t}encoder.layers.{i}", ("layers", i)))
    return m


def layer_key_map(hf: str, ours: tuple) -> dict[tuple, Source]:
    """One CLIPLayer's state paths (under `ours`) -> the tensors of transformers'
    CLIPEncoderLayer named `hf` (text and image towers alike)."""
    m = {}
    for n in ("layer_norm1", "layer_norm2"):
        m[(*ours, n, "scale")] = Source.of(f"{hf}.{n}.weight")
        m[(*ours, n, "bias")] = Source.of(f"{hf}.{n}.bias")
    for n in ("q_proj", "k_proj", "v_proj", "out_proj"):
        m[(*ours, "self_attn", n, "kernel")] = Source.of(
            f"{hf}.self_attn.{n}.weight", transpose=True
        )
        m[(*ours, "self_attn", n, "bias")] = Source.of(f"{hf}.self_attn.{n}.bias")
    for n in ("fc1", "fc2"):
        m[(*ours, n, "kernel")] = Source.of(f"{hf}.mlp.{n}.weight", transpose=True)
        m[(*ours, n, "bias")] = Source.of(f"{hf}.mlp.{n}.bias")
    return m
