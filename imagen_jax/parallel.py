"""Meshes, shardings, global batches and multi-host start-up.

    mesh = make_mesh([("data", -1)])                # or [("data", -1), ("fsdp", 4)]
    batch = global_batch(local_batch, mesh)        # process-local numpy -> global jax.Arrays
    shardings = param_shardings(abstract_params, mesh, DEFAULT_RULES)

The mesh comes from the config (`config.mesh`: a list of (axis name, size), one size may be
-1 for "all the remaining devices"). The batch is sharded over every data-parallel axis
("data" and "fsdp"); parameters are sharded by rules given as data (big_vision's
`sharding.py`): a list of (regex over the '/'-joined parameter path, spec), first match
wins, where a spec is a tuple of mesh axis names / None per dimension (a PartitionSpec), or
the string "fsdp" for the default FSDP rule (`fsdp_spec`).

Axes are `AxisType.Auto`: the train step pins its inputs and outputs by shardings and XLA
propagates them through the network (explicit sharding-in-types would have every op of the
network name its output sharding).
"""

from __future__ import annotations

import math
import os
import re
from collections.abc import Sequence
from typing import Any

import jax
import numpy as np
from absl import flags, logging
from jax.sharding import AxisType, Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

DATA_AXES = ("data", "fsdp")  # the batch is sharded over these (those present in the mesh)
FSDP = "fsdp"
DEFAULT_RULES = ((".*", FSDP),)  # every parameter: the FSDP rule (replicated without "fsdp")
FSDP_MIN_SIZE = 2**18  # parameters with fewer elements stay replicated under the FSDP rule


def make_mesh(axes: Sequence[tuple[str, int]] = (("data", -1),), devices=None) -> Mesh:
    """A mesh of `devices` (default: all) with named axes; one size may be -1 (the rest)."""
    devices = list(jax.devices() if devices is None else devices)
    names = [str(name) for name, _ in axes]
    sizes = [int(size) for _, size in axes]
    if len(set(names)) != len(names):
        raise ValueError(f"mesh axes {names} repeat a name")
    unknown = [n for n in names if n not in ("data", "fsdp", "model")]
    if unknown:
        raise ValueError(f"unknown mesh axes {unknown}; expected data, fsdp or model")
    if sizes.count(-1) > 1 or any(s < 1 and s != -1 for s in sizes):
        raise ValueError(f"mesh sizes {sizes}: positive, and at most one -1")
    known = math.prod(s for s in sizes if s != -1)
    if -1 in sizes:
        if len(devices) % known:
            raise ValueError(f"mesh {list(axes)} does not divide {len(devices)} devices")
        sizes[sizes.index(-1)] = len(devices) // known
    if math.prod(sizes) != len(devices):
        raise ValueError(
            f"mesh {dict(zip(names, sizes, strict=True))} needs {math.prod(sizes)} devices, "
            f"got {len(devices)}"
        )
    return jax.make_mesh(
        tuple(sizes), tuple(names), axis_types=(AxisType.Auto,) * len(names), devices=devices
    )


def data_axes(mesh: Mesh) -> tuple[str, ...]:
    """The mesh axes the batch is sharded over."""
    return tuple(a for a in DATA_AXES if a in mesh.axis_names)


def data_parallel_size(mesh: Mesh) -> int:
    return math.prod(mesh.shape[a] for a in data_axes(mesh))


def batch_sharding(mesh: Mesh) -> NamedSharding:
    """Leading (batch) dimension over the data axes, the rest replicated."""
    return NamedSharding(mesh, P(data_axes(mesh) or None))


def replicated(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, P())


# ----------------------------------------------------------------------------------------------
# Parameter sharding rules
# ----------------------------------------------------------------------------------------------


def path_str(path) -> str:
    """A pytree key path as 'a/b/0/kernel' (attribute keys such as nnx's `.value` dropped)."""
    parts = []
    for k in path:
        if isinstance(k, jax.tree_util.DictKey):
            parts.append(str(k.key))
        elif isinstance(k, jax.tree_util.SequenceKey):
            parts.append(str(k.idx))
        elif isinstance(k, jax.tree_util.FlattenedIndexKey):
            parts.append(str(k.key))
    return "/".join(parts)


def fsdp_spec(shape: Sequence[int], mesh: Mesh, *, min_size: int = FSDP_MIN_SIZE) -> P:
    """The default FSDP rule: the largest dimension divisible by the "fsdp" axis is sharded
    over it (the last such on ties: the output features of a kernel); parameters smaller
    than `min_size` elements, or without such a dimension, are replicated."""
    n = mesh.shape.get(FSDP, 1)
    if n == 1 or math.prod(shape) < min_size:
        return P()
    dims = [i for i, d in enumerate(shape) if d % n == 0]
    if not dims:
        return P()
    best = max(dims, key=lambda i: (shape[i], i))
    return P(*[FSDP if i == best else None for i in range(len(shape))])


def spec_for(path: str, shape, mesh: Mesh, rules, *, min_size: int = FSDP_MIN_SIZE) -> P:
    """The PartitionSpec of the first rule whose regex matches `path` (re.fullmatch)."""
    for pattern, spec in rules:
        if re.fullmatch(pattern, path):
            if spec == FSDP:
                return fsdp_spec(shape, mesh, min_size=min_size)
            spec = P(*spec)
            if len(spec) > len(shape):
                raise ValueError(f"rule {pattern!r}: spec {spec} has more dims than {path} {shape}")
            return spec
    return P()


def param_shardings(tree, mesh: Mesh, rules=DEFAULT_RULES, *, min_size: int = FSDP_MIN_SIZE):
    """NamedShardings for every array leaf of `tree` (arrays or ShapeDtypeStructs)."""

    def leaf(path, x):
        return NamedSharding(
            mesh, spec_for(path_str(path), x.shape, mesh, rules, min_size=min_size)
        )

    return jax.tree_util.tree_map_with_path(leaf, tree)


def describe_shardings(tree, shardings) -> str:
    """One line per sharded leaf, for the log: 'path shape -> spec'."""
    lines = []
    for (path, x), s in zip(
        jax.tree_util.tree_flatten_with_path(tree)[0], jax.tree.leaves(shardings), strict=True
    ):
        if any(a is not None for a in s.spec):
            lines.append(f"{path_str(path)} {tuple(x.shape)} -> {s.spec}")
    return "\n".join(lines) or "(all parameters replicated)"


# ----------------------------------------------------------------------------------------------
# Global batches
# ----------------------------------------------------------------------------------------------


def global_batch(local_batch: dict[str, Any], mesh: Mesh) -> dict[str, jax.Array]:
    """This process's numpy batch -> global jax.Arrays sharded over the data axes.

    Every process passes its own rows; the global batch is their concatenation in process
    order. Non-numeric entries (captions, keys) are left out.
    """
    sharding = batch_sharding(mesh)
    out = {}
    for name, x in local_batch.items():
        x = np.asarray(x)
        if x.dtype == object:
            continue
        out[name] = jax.make_array_from_process_local_data(sharding, x)
    return out


def replicate(tree, mesh: Mesh):
    """Host arrays equal on every process -> fully replicated global jax.Arrays."""
    sharding = replicated(mesh)
    return jax.tree.map(
        lambda x: jax.make_array_from_process_local_data(sharding, np.asarray(x), np.shape(x)),
        tree,
    )


# ----------------------------------------------------------------------------------------------
# Multi-host start-up
# ----------------------------------------------------------------------------------------------


def define_distributed_flags() -> None:
    """Defines the multi-host flags every main shares (call it at a main's import):
    --coordinator_address, --num_processes, --process_id, --jax_distributed. They are the
    calling main's own (key) flags, so its --help lists them."""
    # Flags defined from here on belong to the module that calls this one (absl's way for
    # modules that define flags on behalf of others), not to imagen_jax.parallel.
    flags.disclaim_key_flags()
    flags.DEFINE_string(
        "coordinator_address",
        None,
        "Multi-host: host:port of process 0 (default: $JAX_COORDINATOR_ADDRESS; none: one "
        "process).",
    )
    flags.DEFINE_integer(
        "num_processes", None, "Multi-host: processes in the job (default: $JAX_NUM_PROCESSES)."
    )
    flags.DEFINE_integer(
        "process_id", None, "Multi-host: this process's index (default: $JAX_PROCESS_ID)."
    )
    flags.DEFINE_bool(
        "jax_distributed",
        False,
        "Multi-host: join the job jax finds itself (Slurm, TPU pods; no --coordinator_address).",
    )


def initialize_from_flags(values=None) -> None:
    """Joins the job the flags of `define_distributed_flags` describe (default: absl's
    FLAGS): with --jax_distributed and no coordinator, jax finds the job itself (Slurm, TPU
    pods); else `initialize_distributed` with the flags (or the JAX_* environment)."""
    f = values or flags.FLAGS
    if f.jax_distributed and not f.coordinator_address:
        jax.distributed.initialize()
        return
    initialize_distributed(
        coordinator_address=f.coordinator_address,
        num_processes=f.num_processes,
        process_id=f.process_id,
    )


def initialize_distributed(
    config=None,
    *,
    coordinator_address: str | None = None,
    num_processes: int | None = None,
    process_id: int | None = None,
    local_device_ids: Sequence[int] | None = None,
) -> bool:
    """Joins this process to a multi-process job with `jax.distributed.initialize`.

    Each setting is taken from, in order: the keyword argument (train.py's flags), `config`
    (any mapping with keys coordinator_address, num_processes, process_id), the environment
    (JAX_COORDINATOR_ADDRESS, JAX_NUM_PROCESSES, JAX_PROCESS_ID). With no coordinator and at
    most one process there is nothing to join and False is returned; otherwise True once
    joined. Collectives between CPU processes run over gloo (the setting only concerns the
    CPU backend). Must run before anything touches a device.
    """
    config = config or {}
    env = os.environ

    def setting(value, name, cast):
        if value is None:
            value = config.get(name) if hasattr(config, "get") else None
        if value in (None, "") and env.get("JAX_" + name.upper()):
            value = env["JAX_" + name.upper()]
        return None if value in (None, "") else cast(value)

    coordinator_address = setting(coordinator_address, "coordinator_address", str)
    num_processes = setting(num_processes, "num_processes", int)
    process_id = setting(process_id, "process_id", int)
    if coordinator_address is None and (num_processes or 1) == 1:
        return False
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    jax.distributed.initialize(
        coordinator_address=coordinator_address,
        num_processes=num_processes,
        process_id=process_id,
        local_device_ids=local_device_ids,
    )
    logging.info(
        "jax.distributed: process %d of %d, %d local / %d global devices",
        jax.process_index(),
        jax.process_count(),
        jax.local_device_count(),
        jax.device_count(),
    )
    return True


# A process may reach a barrier long after the others: the hosts of a sampling job finish
# their shares at different times (uneven shares, compilation, restarts).
BARRIER_TIMEOUT_S = 24 * 3600


def barrier(name: str, *, timeout_s: float = BARRIER_TIMEOUT_S) -> None:
    """Blocks until every process of the job has reached the barrier `name` (a no-op with
    one process); every process must call it, in the same order as its other barriers.

    It waits on jax.distributed's coordination service (through orbax's barrier), not on a
    device collective: `multihost_utils.sync_global_devices` runs an all-gather, which on
    CPU (gloo) fails when the processes arrive more than 30 s apart.
    """
    if jax.process_count() == 1:
        return
    from orbax.checkpoint import multihost  # lazy: only multi-process jobs need it

    multihost.get_barrier_sync_fn()(key=name, timeout_ms=int(timeout_s * 1000))
