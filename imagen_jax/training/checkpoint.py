"""Checkpoints: an Orbax CheckpointManager in `workdir/checkpoints`, resumed automatically.

Layout of one checkpoint, `workdir/checkpoints/<step>/`:
  state/   the TrainState (params, EMA params, optax state, step, base RNG key) as an Orbax
           PyTree (StandardSave): restored into the current mesh's shardings, so a
           checkpoint written on 8 devices restores onto 1, or onto another FSDP layout.
  data/    the input iterator's state, one JSON file per process (grain's CheckpointSave).
  model/   JSON: the UNet config and every parameter's shape. A workdir holding another
           model's checkpoint stops the run with the differences named, before anything
           is restored.
The last `train.keep_checkpoints` are kept. Saves are asynchronous (Orbax copies the
arrays to host memory before `save` returns, so the next step may donate them).

A replicated array is written by its replicas together (each a slice) only where each
slice holds at least `REPLICA_PARALLEL_MIN_BYTES`: Orbax's default on CPU and TPU splits
every replicated array however small, one device slice per replica and array, which made
a save of the runlocal stage on 8 devices cost about 3 s more than writing each small
array whole from its first replica.
"""

from __future__ import annotations

import dataclasses
import json
import os

import grain
import jax
import numpy as np
import orbax.checkpoint as ocp
from absl import logging

from imagen_jax import parallel

REPLICA_PARALLEL_MIN_BYTES = 2**20


def _use_array_handler() -> None:
    """Orbax's handler of jax.Array (its global registry; the same handler otherwise),
    splitting replicated arrays across their replicas only in slices of at least
    REPLICA_PARALLEL_MIN_BYTES."""
    handler = ocp.type_handlers.get_type_handler(jax.Array)
    if handler._min_slice_bytes_for_replica_parallel == REPLICA_PARALLEL_MIN_BYTES:
        return
    ocp.type_handlers.register_type_handler(
        jax.Array,
        ocp.type_handlers.ArrayHandler(
            array_metadata_store=handler._array_metadata_store,  # Orbax's (version pinned)
            min_slice_bytes_for_replica_parallel=REPLICA_PARALLEL_MIN_BYTES,
        ),
        override=True,
    )


class CheckpointMismatchError(ValueError):
    """The workdir holds a checkpoint of a different model."""


def model_signature(net) -> dict:
    """JSON-able description of the network that a checkpoint must match."""
    shapes = {}
    for path, x in jax.tree_util.tree_flatten_with_path(net.abstract_params)[0]:
        shapes[parallel.path_str(path)] = list(x.shape)
    unet = json.loads(json.dumps(dataclasses.asdict(net.cfg)))
    defaults = {
        f.name: dataclasses.asdict(f.default) if dataclasses.is_dataclass(f.default) else f.default
        for f in dataclasses.fields(net.cfg)
        if f.default is not dataclasses.MISSING
    }
    return {"unet": unet, "param_shapes": shapes, "defaults": json.loads(json.dumps(defaults))}


def describe_mismatch(saved: dict, current: dict, limit: int = 8) -> list[str]:
    """Human-readable differences between two model signatures (empty if they agree). A
    field the checkpoint does not record (one added to the config since) agrees when the
    config leaves it at its default."""
    diffs = []
    saved_unet, unet = saved.get("unet", {}), current["unet"]
    defaults = current.get("defaults", {})
    for key in sorted(set(saved_unet) | set(unet)):
        if key not in saved_unet and key in defaults and unet.get(key) == defaults[key]:
            continue
        if saved_unet.get(key) != unet.get(key):
            diffs.append(f"{key}: checkpoint {saved_unet.get(key)!r}, config {unet.get(key)!r}")
    saved_shapes, shapes = saved.get("param_shapes", {}), current["param_shapes"]
    for path in sorted(set(saved_shapes) | set(shapes)):
        if saved_shapes.get(path) != shapes.get(path):
            diffs.append(
                f"parameter {path}: checkpoint {saved_shapes.get(path)}, config {shapes.get(path)}"
            )
    if len(diffs) > limit:
        diffs = diffs[:limit] + [f"... and {len(diffs) - limit} more"]
    return diffs


class Checkpointer:
    """Saves and restores (TrainState, data iterator) under `workdir/checkpoints`."""

    def __init__(self, workdir: str, *, keep: int, signature: dict):
        self.directory = os.path.join(os.path.abspath(workdir), "checkpoints")
        self.signature = signature
        _use_array_handler()
        self.manager = ocp.CheckpointManager(
            self.directory,
            options=ocp.CheckpointManagerOptions(max_to_keep=keep, create=True),
        )

    def latest_step(self) -> int | None:
        return self.manager.latest_step()

    def check_model(self, step: int) -> None:
        """Raises CheckpointMismatchError if checkpoint `step` holds another model."""
        saved = self.manager.restore(step, args=ocp.args.Composite(model=ocp.args.JsonRestore()))
        diffs = describe_mismatch(dict(saved["model"]), self.signature)
        if diffs:
            raise CheckpointMismatchError(
                f"{self.directory}/{step} holds a checkpoint of another model; use a new "
                "workdir or the matching config. Differences:\n  " + "\n  ".join(diffs)
            )

    def restore(self, step: int, target, data_iterator):
        """The TrainState of checkpoint `step`, placed as `target` (ShapeDtypeStructs with
        shardings) says; the data iterator is restored in place when the checkpoint has
        this process's data state (the same process count), else it restarts with a
        warning."""
        self.check_model(step)
        items = {"state": ocp.args.StandardRestore(target)}
        data_file = os.path.join(
            self.directory,
            str(step),
            "data",
            f"process_{jax.process_index()}-of-{jax.process_count()}.json",
        )
        if os.path.exists(data_file):
            items["data"] = grain.checkpoint.CheckpointRestore(data_iterator)
        else:
            logging.warning(
                "Checkpoint %d has no data state for %d processes; the input stream restarts",
                step,
                jax.process_count(),
            )
        restored = self.manager.restore(step, args=ocp.args.Composite(**items))
        return restored["state"]

    def save(self, step: int, state, data_iterator) -> None:
        self.manager.save(
            step,
            args=ocp.args.Composite(
                state=ocp.args.StandardSave(state),
                data=grain.checkpoint.CheckpointSave(data_iterator),
                model=ocp.args.JsonSave(self.signature),
            ),
            force=True,
        )

    def wait(self) -> None:
        self.manager.wait_until_finished()

    def close(self) -> None:
        self.manager.wait_until_finished()
        self.manager.close()


def restore_params(config, workdir: str, step: int | None = None, *, ema: bool = True):
    """(parameters as a nested dict of numpy arrays — the EMA weights unless `ema` is
    False —, the Network, the step) of a run's checkpoint (default: the latest), restored
    onto one device; the checkpoint must hold the config's model (else
    CheckpointMismatchError)."""
    from imagen_jax.training import state as state_lib  # lazy: state is heavier

    net = state_lib.make_network(config.model)
    tx, _ = state_lib.make_optimizer(config.optim, config.train.steps)
    checkpointer = Checkpointer(
        workdir, keep=config.train.keep_checkpoints, signature=model_signature(net)
    )
    try:
        step = checkpointer.latest_step() if step is None else step
        if step is None:
            raise FileNotFoundError(f"{workdir} holds no checkpoint")
        checkpointer.check_model(step)
        mesh = parallel.make_mesh([("data", 1)], jax.devices()[:1])
        abstract, shardings = state_lib.state_shardings(config, net, tx, mesh)
        target = state_lib.abstract_with_shardings(abstract, shardings)
        restored = checkpointer.manager.restore(
            step, args=ocp.args.Composite(state=ocp.args.StandardRestore(target))
        )["state"]
    finally:
        checkpointer.close()
    params = restored.ema_params if ema else restored.params
    return jax.tree.map(np.asarray, params), net, int(step)
