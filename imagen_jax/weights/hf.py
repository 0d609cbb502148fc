"""Checkpoints in Hugging Face layout: `config.json` plus safetensors weights.

A model directory holds `config.json` and either `model.safetensors` or a sharded
`model.safetensors.index.json` whose `weight_map` names the shard of every tensor
(transformers' `save_pretrained` writes both forms; diffusers' sub-folders look the same).

safetensors files are read here directly (an 8-byte header length, a JSON header, then the
raw tensors) through `np.memmap`, so that a tensor is read only when it is loaded and
bfloat16 needs no framework (it comes from `ml_dtypes`, which JAX depends on).

`load_into` fills an abstract NNX module (from `nnx.eval_shape`) from a checkpoint through
a key map `{our flat state path: Source}` and is strict: it names every missing,
unexpected and mis-shaped tensor at once, and loads nothing partially unless asked.
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
import struct
from collections.abc import Callable, Iterable, Iterator, Mapping

import jax.numpy as jnp
import ml_dtypes
import numpy as np
from absl import logging
from flax import nnx
from flax.nnx import traversals

CONFIG_NAME = "config.json"
WEIGHTS_NAME = "model.safetensors"
INDEX_NAME = "model.safetensors.index.json"
DIFFUSERS_WEIGHTS_NAME = "diffusion_pytorch_model.safetensors"  # diffusers' models (VAE, UNet)

_DTYPES = {
    "F64": np.float64,
    "F32": np.float32,
    "F16": np.float16,
    "BF16": ml_dtypes.bfloat16,
    "I64": np.int64,
    "I32": np.int32,
    "I16": np.int16,
    "I8": np.int8,
    "U8": np.uint8,
    "BOOL": np.bool_,
}


class CheckpointError(ValueError):
    """A checkpoint directory or its tensors do not fit the model asked for."""


def read_config(path: str | os.PathLike) -> dict:
    """The parsed `config.json` of a model directory."""
    file = os.path.join(path, CONFIG_NAME)
    if not os.path.isdir(path):
        raise CheckpointError(f"{path} is not a directory")
    if not os.path.isfile(file):
        raise CheckpointError(f"{path} has no {CONFIG_NAME}")
    with open(file) as f:
        return json.load(f)


@dataclasses.dataclass(frozen=True)
class TensorInfo:
    """One tensor of a safetensors file: where it lies and what it holds."""

    file: str
    dtype: str  # the safetensors name, e.g. "F32", "BF16"
    shape: tuple[int, ...]
    start: int  # absolute byte offset in the file
    end: int

    def read(self) -> np.ndarray:
        if self.dtype not in _DTYPES:
            raise CheckpointError(f"{self.file}: unsupported safetensors dtype {self.dtype}")
        dtype = np.dtype(_DTYPES[self.dtype])
        count = int(np.prod(self.shape, dtype=np.int64))
        if (self.end - self.start) != count * dtype.itemsize:
            raise CheckpointError(f"{self.file}: tensor of shape {self.shape} has a wrong size")
        if count == 0:
            return np.zeros(self.shape, dtype)
        data = np.memmap(self.file, dtype=dtype, mode="r", offset=self.start, shape=(count,))
        return np.array(data).reshape(self.shape)


def read_safetensors_header(file: str) -> dict[str, TensorInfo]:
    """The tensors of one safetensors file, without reading their data."""
    with open(file, "rb") as f:
        raw = f.read(8)
        if len(raw) != 8:
            raise CheckpointError(f"{file} is not a safetensors file (too short)")
        (n,) = struct.unpack("<Q", raw)
        try:
            header = json.loads(f.read(n))
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise CheckpointError(f"{file} is not a safetensors file ({e})") from None
    base = 8 + n
    tensors = {
        name: TensorInfo(
            file,
            meta["dtype"],
            tuple(meta["shape"]),
            base + meta["data_offsets"][0],
            base + meta["data_offsets"][1],
        )
        for name, meta in header.items()
        if name != "__metadata__"
    }
    # An interrupted copy or download keeps a valid header but loses data at the end.
    size, end = os.path.getsize(file), max((t.end for t in tensors.values()), default=0)
    if size < end:
        raise CheckpointError(f"{file} is truncated: {size} bytes, its header needs {end}")
    return tensors


class Checkpoint(Mapping[str, TensorInfo]):
    """All tensors of a model directory by name, from one file or from its shards."""

    def __init__(self, path: str | os.PathLike, weights_name: str = WEIGHTS_NAME):
        self.path = os.fspath(path)
        self._tensors = _open_weights(self.path, weights_name)

    def __getitem__(self, name: str) -> TensorInfo:
        return self._tensors[name]

    def __iter__(self) -> Iterator[str]:
        return iter(self._tensors)

    def __len__(self) -> int:
        return len(self._tensors)


def _open_weights(path: str, weights_name: str) -> dict[str, TensorInfo]:
    if not os.path.isdir(path):
        raise CheckpointError(f"{path} is not a directory")
    single = os.path.join(path, weights_name)
    index = os.path.join(
        path, weights_name.removesuffix(".safetensors") + ".safetensors.index.json"
    )
    if os.path.isfile(single):
        return read_safetensors_header(single)
    if os.path.isfile(index):
        return _open_sharded(path, index)
    others = sorted(
        f for f in os.listdir(path) if f.endswith((".bin", ".pt", ".ckpt", ".h5", ".msgpack"))
    )
    hint = f" (found {', '.join(others)}: convert them to safetensors)" if others else ""
    raise CheckpointError(
        f"no weights in {path}: expected {weights_name} or {os.path.basename(index)}{hint}"
    )


def _open_sharded(path: str, index_file: str) -> dict[str, TensorInfo]:
    with open(index_file) as f:
        weight_map: dict[str, str] = json.load(f)["weight_map"]
    shards = sorted(set(weight_map.values()))
    absent = [s for s in shards if not os.path.isfile(os.path.join(path, s))]
    if absent:
        raise CheckpointError(
            f"{index_file} names {len(absent)} shard(s) missing from {path}: {', '.join(absent)}"
        )
    tensors: dict[str, TensorInfo] = {}
    for shard in shards:
        tensors.update(read_safetensors_header(os.path.join(path, shard)))
    not_in_shard = sorted(k for k, s in weight_map.items() if k not in tensors)
    if not_in_shard:
        raise CheckpointError(
            f"{index_file} lists tensors that its shards lack: {', '.join(not_in_shard)}"
        )
    return tensors


@dataclasses.dataclass(frozen=True)
class Source:
    """Where one parameter of ours comes from in a checkpoint.

    `names[0]` is the tensor's name; further names are tied copies of it (such as T5's
    `encoder.embed_tokens.weight` beside `shared.weight`) that a checkpoint may hold
    instead or as well. `transpose` turns a PyTorch `nn.Linear` weight [out, in] into a
    Flax kernel [in, out]; `permute` reorders the axes of the checkpoint's tensor
    (`np.transpose(tensor, permute)`), e.g. (2, 3, 1, 0) turns a PyTorch `nn.Conv2d`
    weight [out, in, kh, kw] into a Flax kernel [kh, kw, in, out].
    """

    names: tuple[str, ...]
    transpose: bool = False
    permute: tuple[int, ...] | None = None

    def __post_init__(self):
        if self.transpose and self.permute is not None:
            raise ValueError(f"Source {self.names[0]}: give transpose or permute, not both")

    @classmethod
    def of(
        cls,
        name: str,
        *aliases: str,
        transpose: bool = False,
        permute: tuple[int, ...] | None = None,
    ) -> Source:
        return cls((name, *aliases), transpose, permute)

    def to_ours(self, array: np.ndarray) -> np.ndarray:
        """A checkpoint tensor in our layout."""
        if self.transpose:
            return array.T
        return array if self.permute is None else np.transpose(array, self.permute)

    def to_checkpoint(self, array: np.ndarray) -> np.ndarray:
        """One of our parameters in the checkpoint's layout: the inverse of `to_ours`."""
        if self.transpose:
            return array.T
        return array if self.permute is None else np.transpose(array, np.argsort(self.permute))

    def checkpoint_shape(self, shape: tuple[int, ...]) -> tuple[int, ...]:
        """The shape in the checkpoint of a parameter whose shape is ours `shape`."""
        if self.transpose:
            return tuple(shape[::-1])
        if self.permute is None:
            return tuple(shape)
        out = [0] * len(shape)
        for ours, theirs in enumerate(self.permute):
            out[theirs] = shape[ours]
        return tuple(out)


KeyMap = Mapping[tuple, Source]


def checkpoint_tensors(
    params, key_map: KeyMap, *, dtype=np.float32, what: str = "model"
) -> dict[str, np.ndarray]:
    """Our parameters (a module, or the nested dict of `nnx.to_pure_dict`) as a checkpoint's
    tensors by name (`Source.names[0]`), in `dtype`: the inverse of `load_into`, what the
    `save_*` writers of a model store."""
    if isinstance(params, nnx.Module):
        params = nnx.to_pure_dict(nnx.state(params, nnx.Param))
    flat = traversals.flatten_mapping(params)
    missing = sorted(set(key_map) - set(flat), key=str)
    unexpected = sorted(set(flat) - set(key_map), key=str)
    if missing or unexpected:
        raise ValueError(
            f"the parameters do not fit the {what} config: missing {missing[:4]}, unexpected "
            f"{unexpected[:4]} ({len(missing)} and {len(unexpected)} in all)"
        )
    return {  # np.array, not np.ascontiguousarray: that makes a scalar 1-D
        src.names[0]: np.array(
            src.to_checkpoint(np.asarray(flat[path], np.float32)), dtype=dtype, order="C"
        )
        for path, src in key_map.items()
    }


def load_into(
    abstract: nnx.Module,
    key_map: KeyMap,
    checkpoint: Mapping[str, TensorInfo],
    *,
    dtype=jnp.float32,
    unused: Iterable[str] = (),
    allow_missing: Iterable[str] = (),
    allow_unexpected: Iterable[str] = (),
    init_missing: Callable[[], nnx.Module] | None = None,
    what: str = "model",
) -> nnx.Module:
    """Fills the abstract module `abstract` with the checkpoint's tensors, cast to `dtype`.

    Args:
      abstract: the module from `nnx.eval_shape(lambda: Model(...))`.
      key_map: every parameter path of `abstract` (as in `nnx.to_flat_state`) to its Source.
      checkpoint: tensor name -> TensorInfo (a `Checkpoint`).
      dtype: the dtype the parameters are stored in.
      unused: regexes (full match) of checkpoint tensors that the model does not use by
        design (a decoder, a language-model head, buffers); they are skipped and logged.
      allow_missing: regexes of our tensor names (`Source.names[0]`) that may be absent;
        those parameters keep the fresh initialization of `init_missing()`.
      allow_unexpected: regexes of further checkpoint tensors to skip.
      init_missing: builds a concrete, initialized module; called only when an allowed
        tensor is missing.
      what: the model's name in error messages.

    Returns:
      The module with every parameter set (as jax arrays of `dtype`).

    Raises:
      CheckpointError: naming every missing, unexpected and mis-shaped tensor.
    """
    graphdef, state = nnx.split(abstract)
    expected = traversals.flatten_mapping(nnx.to_pure_dict(state))
    if set(expected) != set(key_map):
        raise AssertionError(  # a bug in a key map, not in the checkpoint
            f"key map of {what} does not cover its state: "
            f"unmapped {sorted(set(expected) - set(key_map), key=str)}, "
            f"stale {sorted(set(key_map) - set(expected), key=str)}"
        )
    chosen = _match(key_map, expected, checkpoint, unused, allow_missing, allow_unexpected, what)
    values, fresh = {}, None
    for path, src in key_map.items():
        if path in chosen:
            array = checkpoint[chosen[path]].read()
            values[path] = jnp.asarray(src.to_ours(array).astype(dtype))
            continue
        logging.warning("%s: %s is missing; keeping its initialization", what, src.names[0])
        if fresh is None:
            if init_missing is None:
                raise CheckpointError(
                    f"{what}: {src.names[0]} is missing and cannot be initialized"
                )
            fresh = traversals.flatten_mapping(nnx.to_pure_dict(nnx.state(init_missing())))
        values[path] = jnp.asarray(fresh[path], dtype)
    nnx.replace_by_pure_dict(state, traversals.unflatten_mapping(values))
    return nnx.merge(graphdef, state)


def _match(key_map, expected, checkpoint, unused, allow_missing, allow_unexpected, what):
    """{our path: the checkpoint tensor to read}, or CheckpointError naming every problem."""
    allow_missing = [re.compile(p) for p in allow_missing]
    skip = [re.compile(p) for p in (*unused, *allow_unexpected)]
    missing, misshaped, consumed, chosen = [], [], set(), {}
    for path, src in key_map.items():
        present = [n for n in src.names if n in checkpoint]
        consumed.update(present)
        want = src.checkpoint_shape(tuple(expected[path].shape))  # in the checkpoint's layout
        if not present:
            if not any(p.fullmatch(src.names[0]) for p in allow_missing):
                missing.append(f"{src.names[0]} (expected shape {want})")
            continue
        for name in present:
            if tuple(checkpoint[name].shape) != want:
                misshaped.append(
                    f"{name}: checkpoint {tuple(checkpoint[name].shape)}, expected {want}"
                )
        chosen[path] = present[0]
    rest = sorted(set(checkpoint) - consumed)
    unexpected = [n for n in rest if not any(p.fullmatch(n) for p in skip)]
    if missing or unexpected or misshaped:
        path = getattr(checkpoint, "path", "checkpoint")
        raise CheckpointError(_mismatch_message(what, path, missing, unexpected, misshaped))
    if rest:
        logging.info(
            "%s: %d checkpoint tensors unused by design, e.g. %s", what, len(rest), rest[0]
        )
    return chosen


def _mismatch_message(what, path, missing, unexpected, misshaped) -> str:
    lines = [f"checkpoint {path} does not match {what}:"]
    for label, items in (
        ("missing", missing),
        ("unexpected", unexpected),
        ("mis-shaped", misshaped),
    ):
        if items:
            lines.append(f"  {len(items)} {label}: " + "; ".join(items))
    lines.append(
        "  (allow_missing=/allow_unexpected= take regexes of tensor names to accept on purpose)"
    )
    return "\n".join(lines)
