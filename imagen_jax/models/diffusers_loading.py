"""Loading our Flax models whose modules carry diffusers' names (`sd_unet.SDUNet`,
`sd3_transformer.SD3Transformer`) from a diffusers model folder: `config.json` plus
`diffusion_pytorch_model.safetensors` (or a sharded index).

Such a model's state path maps to its diffusers tensor by joining the path with dots and
renaming the leaf (kernel / scale / embedding -> weight); linear kernels [in, out] are
PyTorch's [out, in] transposed, convolution kernels [kh, kw, in, out] PyTorch's
[out, in, kh, kw] permuted; anything else is taken as it is.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx
from flax.nnx import traversals

from imagen_jax.weights import Checkpoint, CheckpointError, Source, load_into, read_config
from imagen_jax.weights.hf import DIFFUSERS_WEIGHTS_NAME as WEIGHTS_NAME

_LEAF_NAMES = {"kernel": "weight", "scale": "weight", "embedding": "weight"}
TORCH_CONV_TO_FLAX = (2, 3, 1, 0)  # [out, in, kh, kw] -> [kh, kw, in, out]


def key_map(flat: Mapping[tuple, Any]) -> dict[tuple, Source]:
    """Flat state {path: array or ShapeDtypeStruct} -> {path: diffusers Source}."""
    sources = {}
    for path, leaf in flat.items():
        *modules, last = path
        name = ".".join(str(p) for p in (*modules, _LEAF_NAMES.get(last, last)))
        if last == "kernel" and len(leaf.shape) == 4:
            sources[path] = Source.of(name, permute=TORCH_CONV_TO_FLAX)
        else:
            sources[path] = Source.of(name, transpose=last == "kernel")
    return sources


class ShapeOnlyRngs:
    """Stands in for `nnx.Rngs` where only shapes are wanted: every key is the same.

    Under `nnx.eval_shape`, each draw from an `nnx.Rngs` updates a traced counter, and in
    this flax version each update costs time proportional to the trace so far: building SDXL
    abstractly took about a minute that way, and takes seconds this way.
    """

    def params(self) -> jax.Array:
        return jax.random.key(0)


def abstract_model(build: Callable[..., nnx.Module], dtype=jnp.float32) -> nnx.Module:
    """`build(rngs=..., dtype=..., param_dtype=...)` with `jax.ShapeDtypeStruct`s for
    parameters: nothing allocated or drawn."""
    rngs: Any = ShapeOnlyRngs()
    return nnx.eval_shape(lambda: build(rngs=rngs, dtype=dtype, param_dtype=dtype))


def flat_state(model: nnx.Module) -> dict[tuple, Any]:
    return traversals.flatten_mapping(nnx.to_pure_dict(nnx.state(model)))


def load_model_dir(
    path: str | os.PathLike,
    *,
    class_name: str,
    folder: str,
    parse_config: Callable[[dict], Any],
    build: Callable[..., nnx.Module],
    dtype=jnp.float32,
    allow_missing: Sequence[str] = (),
    allow_unexpected: Sequence[str] = (),
    what: str,
) -> tuple[nnx.Module, Any]:
    """(model, config) of the diffusers model folder `path` holding a `class_name`.

    parse_config: config.json's dict -> our config (TypeError / ValueError for values it
      does not implement). build(config, rngs=, dtype=, param_dtype=): the model.
    folder: the pipeline folder it belongs in (named in the error for another class).
    The model is built abstractly and filled strictly (`weights.load_into`): missing,
    unexpected and mis-shaped tensors are all named at once.
    """
    path = os.fspath(path)
    hf = read_config(path)
    name = hf.get("_class_name")
    if name != class_name:
        raise CheckpointError(
            f"{os.path.join(path, 'config.json')} describes a {name!r}, not a {class_name} "
            f"(pass the pipeline's {folder}/ folder)"
        )
    try:
        config = parse_config(hf)
    except (TypeError, ValueError) as e:
        raise CheckpointError(f"{path}/config.json: {e}") from None
    checkpoint = Checkpoint(path, WEIGHTS_NAME)
    dtype = jnp.dtype(dtype)
    abstract = abstract_model(lambda **kw: build(config, **kw), dtype)
    model = load_into(
        abstract,
        key_map(flat_state(abstract)),
        checkpoint,
        dtype=dtype,
        allow_missing=allow_missing,
        allow_unexpected=allow_unexpected,
        init_missing=lambda: build(config, rngs=nnx.Rngs(0), dtype=dtype, param_dtype=dtype),
        what=f"{what} ({path})",
    )
    return model, config
