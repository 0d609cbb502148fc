"""Low-rank adapters (LoRA; Hu et al. 2021) on the kernels of a network's parameter tree,
and their file in the format diffusers' `load_lora_weights` reads.

    spec = LoraSpec.select(params, rank=4, alpha=4.0, targets=r"attn[12]\\.to_(q|k|v|out\\.0)$")
    adapters = init_adapters(spec, params, key)       # what the optimizer trains
    merged = merge(params, adapters, spec)            # W + (alpha / rank) * down @ up
    tensors = diffusers_tensors(adapters, spec, prefix="unet")   # peft names, torch layout

A kernel is chosen by its module's name written as diffusers writes it (the parameter path
without its leaf, joined by dots: "down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q"),
which `targets` (a regular expression) must `re.search`. Each chosen kernel W gets two
matrices, stored beside it in a tree of the same paths:

    linear W [in, out]:          down [in, r],          up [r, out]
    convolution W [kh, kw, in, out]: down [kh, kw, in, r], up [r, out]

and the adapted kernel is W + s * down @ up (over the last axis of down), s = alpha / r: a
convolution's adapter is a kh x kw convolution to r channels followed by a 1 x 1 one, as
peft's `Conv2d` LoRA. `up` starts at zero (the adapted network starts as the base one) and
`down` uniform in +-1 / sqrt(fan_in) (peft's kaiming-uniform with a = sqrt(5)).

The file: for each chosen module, `{prefix}.{module}.lora_A.weight` (down as torch lays it:
[r, in] or [r, in, kh, kw]) and `.lora_B.weight` (up: [out, r] or [out, r, 1, 1]) with s
folded into lora_B, so that a reader that assumes alpha = r (diffusers does without alpha
metadata) gets the same adapted weights.
"""

from __future__ import annotations

import dataclasses
import os
import re
from collections.abc import Mapping

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from flax.nnx import traversals
from safetensors import SafetensorError
from safetensors.numpy import load_file

from imagen_jax import files
from imagen_jax.weights import CheckpointError

DOWN, UP = "lora_down", "lora_up"
LORA_WEIGHTS_NAME = "pytorch_lora_weights.safetensors"  # diffusers' default weight_name
# Beside an export's weights: where they came from ({"pipeline": the base directory, ...}).
EXPORT_RECORD = "finetune.json"


def module_name(path: tuple) -> str:
    """A kernel's module as diffusers names it: the path without the leaf, dot-joined."""
    return ".".join(str(p) for p in path[:-1])


@dataclasses.dataclass(frozen=True)
class LoraSpec:
    """Which kernels get adapters (their paths in the parameter tree), of what rank and
    scale."""

    rank: int
    alpha: float
    paths: tuple[tuple, ...]

    @property
    def scale(self) -> float:
        return self.alpha / self.rank

    @classmethod
    def select(cls, params, *, rank: int, alpha: float, targets: str) -> LoraSpec:
        """The kernels (2-D linear or 4-D convolution) of `params` (a nested dict of arrays or
        ShapeDtypeStructs) whose module name `re.search`es `targets`; raises ValueError when
        the rank is not positive or when nothing matches (naming a few module names)."""
        if int(rank) < 1:
            raise ValueError(f"lora.rank={rank!r}: an adapter needs rank >= 1")
        alpha = float(alpha) if alpha else float(rank)
        try:
            pattern = re.compile(targets)
        except re.error as e:
            raise ValueError(f"lora.targets={targets!r} is not a regular expression: {e}") from e
        flat = traversals.flatten_mapping(params)
        kernels = [p for p, x in flat.items() if p[-1] == "kernel" and len(x.shape) in (2, 4)]
        paths = tuple(p for p in kernels if pattern.search(module_name(p)))
        if not paths:
            names = sorted({module_name(p) for p in kernels})
            raise ValueError(
                f"lora.targets={targets!r} matches no layer; the {len(names)} layers with "
                f"kernels are named like {names[:3]} ... {names[-2:]}"
            )
        for p in paths:
            if min(flat[p].shape[-2:]) < int(rank):
                raise ValueError(
                    f"lora.rank={rank} exceeds the layer {module_name(p)} ({flat[p].shape})"
                )
        return cls(int(rank), alpha, paths)


def _shapes(kernel_shape: tuple, rank: int) -> tuple[tuple, tuple]:
    return (*kernel_shape[:-1], rank), (rank, kernel_shape[-1])


def abstract_adapters(spec: LoraSpec, params) -> dict:
    """The adapters' tree of ShapeDtypeStructs (float32), nested as the kernels' paths."""
    flat = traversals.flatten_mapping(params)
    out = {}
    for p in spec.paths:
        down, up = _shapes(tuple(flat[p].shape), spec.rank)
        out[p[:-1] + (DOWN,)] = jax.ShapeDtypeStruct(down, jnp.float32)
        out[p[:-1] + (UP,)] = jax.ShapeDtypeStruct(up, jnp.float32)
    return traversals.unflatten_mapping(out)


def init_adapters(spec: LoraSpec, params, key) -> dict:
    """Fresh adapters: up zeros, down uniform in +-1 / sqrt(fan_in)."""
    flat = traversals.flatten_mapping(params)
    out = {}
    for i, p in enumerate(spec.paths):
        down, up = _shapes(tuple(flat[p].shape), spec.rank)
        bound = 1.0 / np.sqrt(float(np.prod(down[:-1])))
        k = jax.random.fold_in(key, i)
        out[p[:-1] + (DOWN,)] = jax.random.uniform(k, down, jnp.float32, -bound, bound)
        out[p[:-1] + (UP,)] = jnp.zeros(up, jnp.float32)
    return traversals.unflatten_mapping(out)


def delta(down, up, scale: float):
    """s * down @ up over down's last axis: the kernel's update, in the kernel's layout."""
    return scale * jnp.tensordot(down, up, axes=1)


def merge(params, adapters, spec: LoraSpec):
    """`params` with every chosen kernel W replaced by W + s * down @ up (in W's dtype)."""
    flat = dict(traversals.flatten_mapping(params))
    ad = traversals.flatten_mapping(adapters)
    for p in spec.paths:
        w = flat[p]
        d = delta(ad[p[:-1] + (DOWN,)], ad[p[:-1] + (UP,)], spec.scale)
        flat[p] = (w.astype(jnp.float32) + d).astype(w.dtype)
    return traversals.unflatten_mapping(flat)


def diffusers_tensors(adapters, spec: LoraSpec, *, prefix: str = "unet") -> dict[str, np.ndarray]:
    """The adapters as the tensors of a diffusers LoRA file (peft names, torch layouts, the
    scale folded into lora_B; see the module docstring)."""
    ad = traversals.flatten_mapping(adapters)
    out = {}
    for p in spec.paths:
        down = np.asarray(ad[p[:-1] + (DOWN,)], np.float32)
        up = np.asarray(ad[p[:-1] + (UP,)], np.float32) * spec.scale
        name = f"{prefix}.{module_name(p)}" if prefix else module_name(p)
        if down.ndim == 2:  # linear: torch weights are [out, in]
            a, b = down.T, up.T
        else:  # [kh, kw, in, r] -> [r, in, kh, kw]; [r, out] -> [out, r, 1, 1]
            a, b = np.transpose(down, (3, 2, 0, 1)), up.T[:, :, None, None]
        out[f"{name}.lora_A.weight"] = np.ascontiguousarray(a)
        out[f"{name}.lora_B.weight"] = np.ascontiguousarray(b)
    return out


def adapters_from_diffusers(
    tensors: Mapping[str, np.ndarray], params, *, prefix: str = "unet", file: str = "LoRA file"
) -> tuple[LoraSpec, dict]:
    """(spec with scale 1, adapters) of a diffusers LoRA file's tensors (peft names,
    `diffusers_tensors`' layout) for the network whose parameters are `params`; raises
    ValueError naming a module the network lacks, a tensor of the wrong shape, or a rank
    that differs between modules (one spec has one rank)."""
    flat = traversals.flatten_mapping(params)
    by_name = {module_name(p): p for p in flat if p[-1] == "kernel"}
    head = f"{prefix}." if prefix else ""
    modules = sorted(
        {k[len(head) : -len(".lora_A.weight")] for k in tensors if k.endswith(".lora_A.weight")}
    )
    stray = sorted(
        k
        for k in tensors
        if not (k.startswith(head) and k.endswith((".lora_A.weight", ".lora_B.weight")))
    )
    if stray or not modules:
        raise ValueError(
            f"{file}: expected {head}<module>.lora_A.weight / .lora_B.weight tensors, found "
            f"{stray[:3] or sorted(tensors)[:3]}"
        )
    out, paths, ranks = {}, [], set()
    for name in modules:
        if name not in by_name:
            raise ValueError(f"{file}: the network has no layer {name!r}")
        path = by_name[name]
        kernel = tuple(flat[path].shape)
        a, b = tensors[f"{head}{name}.lora_A.weight"], tensors.get(f"{head}{name}.lora_B.weight")
        if b is None:
            raise ValueError(f"{file}: {head}{name}.lora_A.weight has no lora_B beside it")
        a, b = np.asarray(a, np.float32), np.asarray(b, np.float32)
        r = a.shape[0]
        down_shape, up_shape = _shapes(kernel, r)
        down = a.T if a.ndim == 2 else np.transpose(a, (2, 3, 1, 0))
        up = b.T if b.ndim == 2 else b[:, :, 0, 0].T if b.shape[2:] == (1, 1) else None
        if up is None or down.shape != down_shape or up.shape != up_shape:
            raise ValueError(
                f"{file}: the adapter of {name} (lora_A {a.shape}, lora_B {b.shape}) does not "
                f"fit its kernel {kernel}"
            )
        ranks.add(r)
        paths.append(path)
        out[path[:-1] + (DOWN,)], out[path[:-1] + (UP,)] = down, up
    if len(ranks) > 1:
        raise ValueError(f"{file}: adapters of several ranks {sorted(ranks)}")
    rank = ranks.pop()
    return LoraSpec(rank, float(rank), tuple(paths)), traversals.unflatten_mapping(out)


def read_diffusers_lora(path: str | os.PathLike) -> tuple[str, dict[str, np.ndarray]]:
    """(file, tensors) of a diffusers LoRA file, or of a directory holding
    `LORA_WEIGHTS_NAME`; raises FileNotFoundError / CheckpointError naming the file."""
    path = os.fspath(path)
    file = os.path.join(path, LORA_WEIGHTS_NAME) if os.path.isdir(path) else path
    if not os.path.isfile(file):
        raise FileNotFoundError(f"--lora={path}: no LoRA file {file}")
    try:
        return file, load_file(file)
    except (SafetensorError, OSError) as e:
        raise CheckpointError(f"{file} is not a readable safetensors file: {e}") from e


def file_record(file: str) -> dict:
    """What an image's metadata records of a LoRA file merged into its network."""
    return {"lora": dict(file=file, sha256=files.file_sha256(file))}


def apply_diffusers_lora(model: nnx.Module, path: str | os.PathLike, *, prefix="unet") -> str:
    """Merges the adapters of a diffusers LoRA file (`read_diffusers_lora`) into `model`'s
    kernels in place (W + lora_B @ lora_A as diffusers' fused weights); returns the file."""
    file, tensors = read_diffusers_lora(path)
    state = nnx.state(model, nnx.Param)
    params = nnx.to_pure_dict(state)
    spec, adapters = adapters_from_diffusers(tensors, params, prefix=prefix, file=file)
    nnx.replace_by_pure_dict(state, merge(params, adapters, spec))
    nnx.update(model, state)
    return file
