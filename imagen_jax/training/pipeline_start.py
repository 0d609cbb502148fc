"""Training a public pipeline's UNet (SD 3: transformer) further (`model.family =
"pipeline"`): its first weights and the encoding of "" that stands for dropped captions.

    state, rest = start_from_pipeline(config, net, encoder, state, rest, shardings)

A fresh run (step 0) starts from the weights of `model.pipeline`'s unet/ folder (read
strictly: every missing, unexpected or mis-shaped tensor is named): the parameters and their
EMA for full fine-tuning; with adapters (`model.lora.rank > 0`) the frozen base in `rest`
(the adapters start as `models.lora.init_adapters` draws them, so the adapted UNet starts as
the public one). A resumed run of adapters reads the base weights again (its checkpoints hold
the adapters only). Every run sets the network's `empty_text` from the stage's text
encoder, the tokens CFG dropout gives a dropped caption (as Stable Diffusion's empty
prompt).
"""

from __future__ import annotations

import os

import jax
import numpy as np
from absl import logging
from flax import nnx

from imagen_jax.models import latent_mmdit, sd3_transformer, sd_unet
from imagen_jax.text.config import encode_captions
from imagen_jax.training import state as state_lib
from imagen_jax.weights import CheckpointError


def pipeline_params(net: state_lib.Network, path: str) -> dict:
    """The UNet (SD 3: transformer) weights of the pipeline directory `path` as the network's
    (base) parameter tree of numpy arrays in its param_dtype; raises CheckpointError when
    they do not fit."""
    if isinstance(net.cfg, latent_mmdit.PipelineMMDiTConfig):
        name, config = "transformer", net.cfg.transformer
        folder = os.path.join(path, name)
        model, cfg = sd3_transformer.load_sd3_transformer(folder, net.param_dtype)
        _check_position_table(model, folder)
    else:
        name, config = "unet", net.cfg.unet
        folder = os.path.join(path, name)
        model, cfg = sd_unet.load_unet(folder, net.param_dtype)
    if cfg != config:
        raise CheckpointError(f"{folder}: its config changed since the run's network was built")
    tree = {name: nnx.to_pure_dict(nnx.state(model, nnx.Param))}
    return jax.tree.map(np.asarray, tree)


def _check_position_table(model: sd3_transformer.SD3Transformer, folder: str) -> None:
    """The trained network computes SD 3's position table from its config (a fixed buffer):
    a checkpoint whose stored table differs is refused rather than silently replaced."""
    embed = model.pos_embed
    if embed.pos_embed is None:
        return
    m, dim = embed.max_size, model.config.inner_dim
    want = sd3_transformer.sincos_pos_table(dim, m, m, embed.base_size)[None]
    got = np.asarray(embed.pos_embed[...], np.float32)
    if not np.allclose(got, want, atol=1e-3):
        raise CheckpointError(
            f"{folder}: pos_embed.pos_embed is not the sin-cos table of its config (largest "
            f"difference {np.abs(got - want).max():.3g}); training assumes it is"
        )


def empty_text(encoder, text_len: int) -> dict[str, np.ndarray]:
    """The encoder's encoding of "": {"empty_text": tokens [1, L, D]} and, where the
    network is conditioned on the pooled text (SDXL), "empty_pooled" [1, P]. L must be the
    network's `model.text_len`."""
    out = encode_captions(encoder, [""], to_host=True)
    tokens = np.asarray(out["text"], np.float32)
    if tokens.shape[1] != text_len:
        raise ValueError(
            f"the text encoder gives {tokens.shape[1]} tokens (text.max_length) but the "
            f"network's empty text has model.text_len={text_len}; set them equal (CLIP: 77)"
        )
    if "text_pooled" in out:
        return {"empty_text": tokens, "empty_pooled": np.asarray(out["text_pooled"], np.float32)}
    return {"empty_text": tokens}


def _with_empty_text(nnx_rest, empty: dict[str, np.ndarray]):
    values = nnx.to_pure_dict(nnx_rest)
    for name, value in empty.items():
        if name not in values:
            raise ValueError(
                f"the text encoder gives a pooled text ({name}) that the network does not take"
            )
        if np.shape(values[name]) != value.shape:
            raise ValueError(
                f"the text encoder's {name} has shape {value.shape}; the network takes "
                f"{np.shape(values[name])}"
            )
        sharding = jax.tree.leaves(jax.tree.map(lambda x: x.sharding, values[name]))[0]
        values[name] = jax.device_put(value, sharding)
    nnx.replace_by_pure_dict(nnx_rest, values)
    return nnx_rest


def start_from_pipeline(config, net: state_lib.Network, encoder, state, rest, shardings):
    """(state, rest) with the pipeline's weights where the run starts from them, and the
    empty text set (see the module docstring)."""
    path = config.model.pipeline
    fresh = int(state.step) == 0
    if fresh or net.lora is not None:
        params = pipeline_params(net, path)
        if net.lora is None:
            placed = state_lib.place_params(params, net.abstract_params, shardings.params)
            state = state._replace(params=placed, ema_params=state_lib.copy_tree(placed))
        else:
            base_shardings = jax.tree.map(lambda x: x.sharding, rest["base"])
            base = state_lib.place_params(params, net.abstract_rest["base"], base_shardings)
            rest = dict(rest, base=base)
        logging.info("The weights of %s%s", path, " (frozen, with adapters)" if net.lora else "")
    empty = empty_text(encoder, net.cfg.text_len)
    if net.cfg.pooled_dim and "empty_pooled" not in empty:
        raise ValueError(
            "the network takes a pooled text (SDXL, SD 3) that the text encoder does not "
            "give: text.kind must be 'sdxl' or 'sd3'"
        )
    if net.lora is None:
        return state, _with_empty_text(rest, empty)
    return state, dict(rest, nnx=_with_empty_text(rest["nnx"], empty))
