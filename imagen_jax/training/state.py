"""The train state, created already sharded, and the optimizer, schedule and EMA it holds.

    net = make_network(config)                      # static: graphdef, abstract params
    tx, lr_schedule = make_optimizer(config.optim, total_steps=config.train.steps)
    state, shardings = create_train_state(config, net, tx, mesh)

`TrainState` is a pytree of arrays only (what a checkpoint holds): the parameters and
their EMA as nested dicts (`nnx.to_pure_dict` of the network's `nnx.Param` state), the
optax state, the step and the run's base key. The network's graph and its non-parameter
state (the dropout RNG streams, reseeded every step) live in `Network`.

The network is the `model.family`'s: ImagenUNet ("imagen", the default), LatentUNet
("sd_unet", our SDUNet with a learned null text), LatentMMDiT ("mmdit", our SD3 MMDiT with
a learned null text), PipelineUNet ("pipeline": a public pipeline's UNet, its weights loaded
by `pipeline_start.py`) or AutoencoderKL ("vae"); `Network`'s properties (`low_res`,
`dropout`, `text_dim`, `num_levels`) answer for all of them.

With low-rank adapters (`model.lora.rank > 0`, `models.lora`) the trained parameters are
the adapters only: `TrainState.params` (and the optimizer's moments, the EMA and the
checkpoints) hold them, and the frozen network's weights travel in `rest`, as
{"nnx": the non-parameter state, "base": the frozen parameters} (sharded as parameters
are); `Network.merge` adds the adapters to the base weights.

Creation follows the flax/big_vision recipe: shapes from `nnx.eval_shape` (nothing is
allocated), shardings from the parameter rules (`parallel.param_shardings`), then one
jitted init with those `out_shardings`, so no parameter is ever whole on one device.
"""

from __future__ import annotations

import dataclasses
import os
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
from absl import logging
from flax import nnx
from safetensors.numpy import load_file

from imagen_jax import parallel, stages
from imagen_jax.models import (
    frozen_text_towers,
    git,
    imagen_unet,
    latent_mmdit,
    latent_unet,
    lora,
    vae,
)
from imagen_jax.training.config import LATENT_FAMILIES, is_latent_stage, network_config

DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}
# Families that train low-rank adapters (`model.lora.rank > 0`) on frozen weights: those of
# `train.init_from` (a stage directory) or of the pipeline (`model.pipeline`).
ADAPTED_FAMILIES = ("imagen", "pipeline")


class TrainState(NamedTuple):
    step: jax.Array  # int32 []: optimizer updates done
    params: Any  # nested dict of float arrays (param_dtype)
    ema_params: Any  # the same structure: the exponential moving average of params
    opt_state: Any  # optax state
    rng: jax.Array  # uint32 [2]: raw base key; step s draws from fold_in(rng, s)


@dataclasses.dataclass(frozen=True)
class Network:
    """The static half of the network: its graph and config; `rest` is the non-parameter
    state (replicated arrays), created by `init_rest`."""

    cfg: Any  # UNetConfig | LatentUNetConfig | LatentMMDiTConfig | VAEConfig | GitConfig
    graphdef: Any
    abstract_params: Any  # nested dict of ShapeDtypeStruct
    abstract_rest: Any  # nnx.State of ShapeDtypeStruct
    dtype: Any
    param_dtype: Any
    family: str = "imagen"  # imagen | sd_unet | mmdit | pipeline | vae | git | two_towers
    lora: lora.LoraSpec | None = None  # adapters: params are them, rest holds the base

    def build(self, rngs: nnx.Rngs) -> nnx.Module:
        kw = dict(rngs=rngs, dtype=self.dtype, param_dtype=self.param_dtype)
        if self.family == "sd_unet":
            return latent_unet.LatentUNet(self.cfg, **kw)
        if self.family == "mmdit":
            return latent_mmdit.LatentMMDiT(self.cfg, **kw)
        if self.family == "pipeline":
            if isinstance(self.cfg, latent_mmdit.PipelineMMDiTConfig):  # SD 3
                return latent_mmdit.PipelineMMDiT(self.cfg, **kw)
            return latent_unet.PipelineUNet(self.cfg, **kw)
        if self.family == "vae":
            return vae.AutoencoderKL(self.cfg, **kw)
        if self.family == "git":
            return git.GitForCausalLM(self.cfg, **kw)
        if self.family == "two_towers":
            if isinstance(self.cfg, frozen_text_towers.FrozenTextTowersConfig):
                return frozen_text_towers.FrozenTextTowers(self.cfg, **kw)
            return self.cfg.build(**kw)  # models.two_towers.TowersConfig
        return imagen_unet.ImagenUNet(self.cfg, **kw)

    def merge(self, params, rest) -> nnx.Module:
        if self.lora is not None:
            merged = lora.merge(rest["base"], params, self.lora)
            return nnx.merge(self.graphdef, merged, rest["nnx"])
        return nnx.merge(self.graphdef, params, rest)

    @property
    def low_res(self) -> bool:
        """Whether it is a super-resolution stage (told a low-resolution image)."""
        return self.family in ("imagen", "pipeline") and bool(getattr(self.cfg, "low_res", 0))

    @property
    def upscales_low_res(self) -> bool:
        """Whether its low-resolution input is upscaled to the output size before it is
        noised (DeepFloyd IF stage II) rather than noised at its own size (Imagen's)."""
        return self.family == "pipeline" and self.low_res

    @property
    def dropout(self) -> float:
        return self.cfg.dropout if self.family == "imagen" else 0.0

    @property
    def text_dim(self) -> int | None:
        """The width of the text tokens it attends to (None for the VAE and the captioner);
        a two_towers model's frozen encoder width (None with a trained text tower)."""
        if self.family == "two_towers":
            return getattr(self.cfg, "text_dim", None)
        return None if self.family in ("vae", "git") else self.cfg.text_dim

    @property
    def text_dim_key(self) -> str:
        """The config key that sets `text_dim`."""
        keys = {
            "sd_unet": "model.cross_attention_dim",
            "mmdit": "model.joint_attention_dim",
            "pipeline": "encoder_hid_dim or cross_attention_dim of model.pipeline's "
            "unet/config.json (SD 3: transformer/config.json's joint_attention_dim)",
        }
        return keys.get(self.family, "model.text_dim")

    @property
    def num_levels(self) -> int:
        """Resolutions it works at: the input's side must divide by 2 ** (num_levels - 1)."""
        if self.family == "imagen":
            return len(self.cfg.channel_mult)
        if self.family in LATENT_FAMILIES:
            return self.cfg.num_levels
        if self.family in ("git", "two_towers"):
            return 1  # any size the patches tile (the vision config checks it)
        return len(self.cfg.block_out_channels)


def _dtype(name: str, key: str):
    if name not in DTYPES:
        raise ValueError(f"{key}={name!r}; expected one of {tuple(DTYPES)}")
    return DTYPES[name]


def make_network(model: ml_collections.ConfigDict) -> Network:
    """The `model` config group -> Network (shapes only; nothing is allocated)."""
    family = model.get("family", "imagen")
    cfg = network_config(model)
    if family == "imagen" and cfg.low_res != bool(model.low_resolution):
        kind = "a super-resolution" if cfg.low_res else "a base"
        raise ValueError(
            f"model.variant={model.variant!r} is {kind} UNet but model.low_resolution="
            f"{model.low_resolution}"
        )
    if is_latent_stage(model) and model.low_resolution:
        raise ValueError(
            f"model.low_resolution={model.low_resolution}: latent ({family}) stages take no "
            "low-resolution input; latent super-resolution is not implemented"
        )
    dtype = _dtype(model.dtype, "model.dtype")
    param_dtype = _dtype(model.param_dtype, "model.param_dtype")
    net = Network(cfg, None, None, None, dtype, param_dtype, family)
    abstract = nnx.eval_shape(lambda: net.build(nnx.Rngs(params=0, dropout=0)))
    graphdef, params, rest = nnx.split(abstract, nnx.Param, ...)
    params = nnx.to_pure_dict(params)
    if family in ADAPTED_FAMILIES and int(model.lora.rank) > 0:
        spec = lora.LoraSpec.select(
            params, rank=model.lora.rank, alpha=model.lora.alpha, targets=model.lora.targets
        )
        return dataclasses.replace(
            net,
            graphdef=graphdef,
            abstract_params=lora.abstract_adapters(spec, params),
            abstract_rest={"nnx": rest, "base": params},
            lora=spec,
        )
    return dataclasses.replace(net, graphdef=graphdef, abstract_params=params, abstract_rest=rest)


def init_params_and_rest(net: Network, key):
    """Fresh parameters (nested dict) and non-parameter state of the network; with adapters,
    fresh adapters and {"nnx": the state, "base": fresh base weights}."""
    key_params, key_dropout = jax.random.split(key)
    model = net.build(nnx.Rngs(params=key_params, dropout=key_dropout))
    _, params, rest = nnx.split(model, nnx.Param, ...)
    params = nnx.to_pure_dict(params)
    if net.lora is not None:
        adapters = lora.init_adapters(net.lora, params, jax.random.fold_in(key_params, 1))
        return adapters, {"nnx": rest, "base": params}
    return params, rest


# ----------------------------------------------------------------------------------------------
# Optimizer
# ----------------------------------------------------------------------------------------------


def make_lr_schedule(cfg: ml_collections.ConfigDict, total_steps: int) -> optax.Schedule:
    """Linear warm-up from 0 to `lr` over `warmup_steps`, then cosine | linear decay to
    `lr * end_lr_factor` at `total_steps`, or constant. A constant schedule with
    `cooldown_steps` > 0 decays linearly to `lr * end_lr_factor` over the last
    `cooldown_steps` before `total_steps` (warm-up, stable, decay: a constant-rate run that
    is extended by resuming ends with its own cool-down, set when resuming for the last
    time)."""
    warmup = max(0, int(cfg.warmup_steps))
    end = cfg.lr * cfg.end_lr_factor
    cooldown = int(cfg.get("cooldown_steps", 0))
    if cooldown and cfg.decay != "constant":
        raise ValueError(f"optim.cooldown_steps={cooldown} needs optim.decay='constant'")
    if cfg.decay == "cosine":
        return optax.warmup_cosine_decay_schedule(
            0.0, cfg.lr, warmup, max(total_steps, warmup + 1), end_value=end
        )
    if cfg.decay == "linear":
        decay = optax.linear_schedule(cfg.lr, end, max(1, total_steps - warmup))
    elif cfg.decay == "constant":
        decay = optax.constant_schedule(cfg.lr)
        if cooldown:  # counted from the warm-up's end, as `decay` is
            stable = max(0, total_steps - warmup - cooldown)
            tail = optax.linear_schedule(cfg.lr, end, max(1, total_steps - warmup - stable))
            decay = optax.join_schedules([decay, tail], [stable])
    else:
        raise ValueError(f"optim.decay={cfg.decay!r}; expected cosine | linear | constant")
    if not warmup:
        return decay
    return optax.join_schedules([optax.linear_schedule(0.0, cfg.lr, warmup), decay], [warmup])


def _decay_mask(params):
    """Weight decay on kernels and other matrices, not on biases, norms or embeddings of
    rank 1 (as in most diffusion trainers)."""
    return jax.tree.map(lambda x: x.ndim > 1, params)


def make_optimizer(
    cfg: ml_collections.ConfigDict, total_steps: int
) -> tuple[optax.GradientTransformation, optax.Schedule]:
    """Global-norm clipping, then AdamW (or Adafactor) on the warm-up/decay schedule.

    Gradient accumulation is not an optax wrapper: the train step scans over
    `accum_steps` micro-batches and makes one update (see `step.py`).
    """
    schedule = make_lr_schedule(cfg, total_steps)
    if cfg.optimizer == "adamw":
        opt = optax.adamw(
            schedule,
            b1=cfg.b1,
            b2=cfg.b2,
            eps=cfg.eps,
            weight_decay=cfg.weight_decay,
            mask=_decay_mask,
        )
    elif cfg.optimizer == "adafactor":
        opt = optax.adafactor(schedule, weight_decay_rate=cfg.weight_decay or None)
    else:
        raise ValueError(f"optim.optimizer={cfg.optimizer!r}; expected adamw | adafactor")
    parts = [optax.clip_by_global_norm(cfg.grad_clip_norm)] if cfg.grad_clip_norm > 0 else []
    return optax.chain(*parts, opt), schedule


# ----------------------------------------------------------------------------------------------
# EMA
# ----------------------------------------------------------------------------------------------


def ema_decay(step, *, decay: float, warmup_power: float = 0.0):
    """The EMA decay at an update step: `decay`, or with a warm-up (ema-pytorch's
    `inv_gamma=1`, `power`; Karras et al. use 2/3 for long runs) min(decay,
    1 - (1 + step)^-power), which starts at 0 (the EMA copies the first weights)."""
    if warmup_power <= 0:
        return jnp.asarray(decay, jnp.float32)
    step = jnp.asarray(step, jnp.float32)
    return jnp.minimum(decay, 1.0 - (1.0 + step) ** (-warmup_power))


def ema_update(ema_params, params, decay):
    return jax.tree.map(
        lambda e, p: (decay * e.astype(jnp.float32) + (1.0 - decay) * p).astype(e.dtype),
        ema_params,
        params,
    )


# ----------------------------------------------------------------------------------------------
# Creation, sharded
# ----------------------------------------------------------------------------------------------


def opt_state_shardings(abstract_opt_state, abstract_params, param_shardings, mesh):
    """Optimizer-state leaves that mirror a parameter (same path suffix and shape: Adam's
    moments) get its sharding; every other leaf (counts, factored moments) is replicated."""
    by_path = {}
    for (path, x), s in zip(
        jax.tree_util.tree_flatten_with_path(abstract_params)[0],
        jax.tree.leaves(param_shardings),
        strict=True,
    ):
        by_path[parallel.path_str(path)] = (tuple(x.shape), s)

    def leaf(path, x):
        parts = parallel.path_str(path).split("/")
        for i in range(len(parts)):
            shape, sharding = by_path.get("/".join(parts[i:]), (None, None))
            if shape == tuple(x.shape):
                return sharding
        return parallel.replicated(mesh)

    return jax.tree_util.tree_map_with_path(leaf, abstract_opt_state)


def state_shardings(config, net: Network, tx, mesh):
    """(abstract TrainState, TrainState of NamedShardings) for the current mesh."""
    rules = [(pattern, spec) for pattern, spec in config.train.sharding_rules]
    params = net.abstract_params
    p_sh = parallel.param_shardings(params, mesh, rules, min_size=config.train.fsdp_min_size)
    opt = jax.eval_shape(tx.init, params)
    rep = parallel.replicated(mesh)
    abstract = TrainState(
        step=jax.ShapeDtypeStruct((), jnp.int32),
        params=params,
        ema_params=params,
        opt_state=opt,
        rng=jax.ShapeDtypeStruct((2,), jnp.uint32),
    )
    shardings = TrainState(rep, p_sh, p_sh, opt_state_shardings(opt, params, p_sh, mesh), rep)
    return abstract, shardings


def abstract_with_shardings(abstract, shardings):
    """ShapeDtypeStructs that carry their target sharding (an Orbax restore target)."""
    return jax.tree.map(
        lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), abstract, shardings
    )


def create_train_state(config, net: Network, tx, mesh):
    """A fresh TrainState, initialised in one jitted call straight into its shardings.

    Returns (state, shardings, rest); `rest` is the network's non-parameter state,
    replicated. The parameters depend on `train.seed` only, not on the mesh.
    """
    _, shardings = state_shardings(config, net, tx, mesh)
    seed_key = jax.random.key(config.train.seed)

    def init():
        params, rest = init_params_and_rest(net, jax.random.fold_in(seed_key, 0))
        state = TrainState(
            step=jnp.zeros((), jnp.int32),
            params=params,
            ema_params=jax.tree.map(jnp.copy, params),
            opt_state=tx.init(params),
            rng=jax.random.key_data(seed_key),
        )
        return state, rest

    state, rest = jax.jit(init, out_shardings=(shardings, rest_shardings(config, net, mesh)))()
    return state, shardings, rest


# The networks whose exported stage directory a run can start from: pixel stages, and
# latent stages (whose VAE is the run's own `latent.vae`, e.g. the stage's vae/ copy).
INIT_FAMILIES = ("imagen", "mmdit", "sd_unet")


def params_from_stage(
    path: str, net: Network, shardings, fresh: dict | None = None, *, abstract=None
) -> dict:
    """The parameters of a stage directory written by `imagen_jax.training.export`, as
    `net`'s params tree in its param_dtype, placed in `shardings`; strict (every missing,
    unexpected or mis-shaped parameter is named), except for the modules a run may add to a
    trained stage (`GROWN_MODULES`), which take their values from `fresh` (the new run's
    initial parameters; zeros without it). abstract: the tree to fill (default the network's
    parameters; an adapted network's frozen base, `abstract_rest["base"]`)."""
    abstract = net.abstract_params if abstract is None else abstract
    if net.family not in INIT_FAMILIES:
        raise ValueError(
            f"train.init_from reads the stage directories of {', '.join(INIT_FAMILIES)} runs; "
            f"this is {net.family!r}"
        )
    file = os.path.join(path, "params.safetensors")
    if not os.path.isfile(file):
        raise FileNotFoundError(
            f"train.init_from={path!r} is not a stage directory (imagen_jax.training.export "
            f"writes one): {file} is missing"
        )
    expected = stages.flatten(abstract)
    loaded = load_file(file)
    grown = grown_keys(loaded, expected)
    zeros = {key: np.zeros(expected[key].shape, expected[key].dtype) for key in grown}
    stages.check_params(file, {**loaded, **zeros}, expected)
    tree = stages.unflatten({**loaded, **zeros})

    params = place_params(tree, abstract, shardings)
    if not grown:
        return params
    for module in sorted({_grown_module(key) for key in grown}):
        count = sum(_grown_module(key) == module for key in grown)
        logging.info(
            "train.init_from: %d arrays of %s are new (%s)",
            count,
            module,
            "fresh initialisation" if fresh is not None else "zeros",
        )
    if fresh is None:
        return params
    flat, new = stages.flatten(params), stages.flatten(fresh)
    return stages.unflatten({**flat, **{key: new[key] for key in grown}})


def with_frozen_base(config, net: Network, rest):
    """`rest` with an adapted own stage's frozen weights read from `train.init_from` (a run
    of adapters reads them at every start: its checkpoints hold the adapters only); `rest`
    as it is for other networks (a pipeline's base comes from `pipeline_start`)."""
    if net.lora is None or net.family == "pipeline":
        return rest
    if not config.train.init_from:
        raise ValueError(
            f"model.lora.rank={config.model.lora.rank} trains adapters on frozen weights: set "
            "train.init_from to the stage directory they adapt"
        )
    base_shardings = jax.tree.map(lambda x: x.sharding, rest["base"])
    base = params_from_stage(
        config.train.init_from, net, base_shardings, abstract=net.abstract_rest["base"]
    )
    logging.info("Adapters on the frozen weights of %s", config.train.init_from)
    return dict(rest, base=base)


def place_params(tree, abstract, shardings):
    """Host arrays (a nested dict) as global arrays of `abstract`'s dtypes in `shardings`:
    each device receives its shard only."""

    def place(array, spec, sharding):
        array = np.asarray(array, spec.dtype)
        return jax.make_array_from_callback(array.shape, sharding, lambda index: array[index])

    return jax.tree.map(place, tree, abstract, shardings)


# Modules a run may add to a stage trained without them: each starts as the identity (its
# output projection at zero), so the grown network computes the stage's function.
#   pos           model.pos_emb: .../pos/{kernel,bias} in the attention blocks
#   text_refiner  model.text_refiner: the token refiner's layers
#   layout        model.layout_grid: the layout head and the convolution that reads it
#   layout_refiner  model.layout_depth: the self-attention layers inside the layout head
GROWN_MODULES = ("pos", "text_refiner", "layout", "layout_refiner")


def _grown_module(key: str) -> str | None:
    parts = key.split("/")
    if parts[0] == "text_refiner":
        return "text_refiner"
    if parts[:2] == ["layout", "refiner"]:
        return "layout_refiner"
    if parts[0] in ("layout", "layout_in"):
        return "layout"
    if parts[-2:-1] == ["pos"]:
        return "pos"
    return None


def grown_keys(loaded: dict, expected: dict) -> set[str]:
    """The keys of `expected` that `loaded` lacks and may grow: those of a module in
    `GROWN_MODULES` of which the stage holds no array at all (a stage that has part of one
    is incomplete, and `check_params` names what it misses)."""
    present = {_grown_module(key) for key in loaded}
    return {
        key
        for key in expected
        if key not in loaded
        and _grown_module(key) is not None
        and _grown_module(key) not in present
    }


@jax.jit
def copy_tree(tree):
    """New buffers holding `tree`'s values, in its shardings (the state's params and EMA
    must not share buffers: the train step donates both)."""
    return jax.tree.map(jnp.copy, tree)


def rest_shardings(config, net: Network, mesh):
    """The shardings of `rest`: the non-parameter state replicated; an adapted network's
    frozen base weights sharded by the parameter rules (`train.sharding_rules`)."""
    rep = parallel.replicated(mesh)
    if net.lora is None:
        return jax.tree.map(lambda _: rep, net.abstract_rest)
    rules = [(pattern, spec) for pattern, spec in config.train.sharding_rules]
    base = net.abstract_rest["base"]
    return {
        "nnx": jax.tree.map(lambda _: rep, net.abstract_rest["nnx"]),
        "base": parallel.param_shardings(base, mesh, rules, min_size=config.train.fsdp_min_size),
    }


def init_rest(config, net: Network, mesh):
    """The network's non-parameter state (dropout streams; an adapted network's fresh base
    weights too) as `create_train_state` makes it, in `rest_shardings` (for a state
    restored from a checkpoint)."""
    key = jax.random.fold_in(jax.random.key(config.train.seed), 0)
    return jax.jit(
        lambda: init_params_and_rest(net, key)[1],
        out_shardings=rest_shardings(config, net, mesh),
    )()
