"""What the shapes project's refits share (`layout_fit`, `wording_fit`): a stage read with
the modules a config adds to it grown, and the refitted stage written with the input
stage's sampling settings and a record of the fit.

A refit changes some modules of a trained stage and leaves the rest as they were; the
stage it writes is ready for sample.py and for `train.init_from`.
"""

from __future__ import annotations

import json
import os

import jax
import ml_collections
import numpy as np
from flax import nnx

from imagen_jax import stages
from imagen_jax.training import state as state_lib


def grown_stage(config: ml_collections.ConfigDict, stage: str):
    """(net, model) of `config.model` with `stage`'s weights, on one device, read as
    `train.init_from` reads them: the modules the config adds (`state.GROWN_MODULES`) take
    their initial values, so the model computes what the stage computed."""
    net = state_lib.make_network(config.model)
    fresh, rest = state_lib.init_params_and_rest(net, jax.random.key(config.train.seed))
    device = jax.sharding.SingleDeviceSharding(jax.devices()[0])
    shardings = jax.tree.map(lambda _: device, net.abstract_params)
    params = state_lib.params_from_stage(stage, net, shardings, fresh=fresh)
    return net, net.merge(params, rest)


def save_refit(config, net, model, stage: str, outdir: str, *, fit: str, result: dict) -> None:
    """Writes `model` as a stage to `outdir`: the input `stage`'s sampling settings (its
    layout_scale, sampler...; the config's are training defaults) and identity, and the
    fit's `result` under `fit` in the identity."""
    with open(os.path.join(stage, "stage.json")) as f:
        meta = json.load(f)
    sample = ml_collections.ConfigDict({**config.sample.to_dict(), **meta.get("sample", {})})
    _, params, _ = nnx.split(model, nnx.Param, ...)
    stages.save_stage(
        outdir,
        unet=net.cfg,
        params=jax.tree.map(np.asarray, nnx.to_pure_dict(params)),
        diffusion=config.diffusion,
        sample=sample,
        resolution=config.model.resolution,
        low_resolution=config.model.low_resolution,
        text=config.text.to_dict(),
        identity={"stage": stage, "stage_identity": meta.get("identity", {}), fit: result},
        domain="shapes" if config.data.source == "shapes" else "",
    )
