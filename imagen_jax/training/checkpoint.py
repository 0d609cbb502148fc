"""Checkpoints: an Orbax CheckpointManager in `workdir/checkpoints`, resumed automatically.

Layout of one checkpoint, `workdir/checkpoints/<step>/`:
  state/   the TrainState (params, EMA params, optax state, step, base RNG key) as an Orbax
           PyTree (StandardSave): restored into the current mesh's shardings, so a
           checkpoint written on 8 devices restores onto 1, or onto another FSDP layout.
  data/    the input iterator's state, one JSON file per process (grain's CheckpointSave).
  model/   JSON: the UNet config, every parameter's shape and the run's recipe (every
           config value but those of RESUMABLE_KEYS, which may change on resume). A
           workdir holding another model's checkpoint, or one trained with other settings,
           stops the run with the differences named, before anything is restored; the
           keys of `train.allow_changes` (comma-separated, a group name allows the group)
           may differ, to resume on purpose with, say, a moved dataset or a new loss
           weight.
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
from imagen_jax.pipelines import jobs

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
    """The workdir holds a checkpoint of a different model, or of other training settings."""


# Config keys (a group name stands for the group) that a resumed run may change: the run's
# length and its cool-down (a constant-rate run extended by resuming sets it on its last
# resume), bookkeeping, sampling and evaluation, the device layout, where inputs are read
# from in ways that do not change them, and the model (its signature is checked apart).
RESUMABLE_KEYS = (
    "train.steps",
    "optim.cooldown_steps",
    "train.log_every",
    "train.checkpoint_every",
    "train.keep_checkpoints",
    "train.init_from",
    "train.sample_every",
    "train.num_samples",
    "train.sample_prompts",
    "train.progress",
    "train.sharding_rules",
    "train.fsdp_min_size",
    "train.allow_changes",
    "data.worker_count",
    "text.cache",
    "text.batch_bucket",
    "evals",
    "sample",
    "mesh",
    "model",
)


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
    signature = {"unet": unet, "param_shapes": shapes, "defaults": json.loads(json.dumps(defaults))}
    spec = getattr(net, "lora", None)
    if spec is not None:  # the adapters' scale: their shapes are in param_shapes, it is not
        signature["lora"] = {"rank": spec.rank, "alpha": spec.alpha}
    return signature


def _under(key: str, names) -> bool:
    return any(key == name or key.startswith(name + ".") for name in names)


def recipe(config) -> dict:
    """The config's values that decide what a training step computes, flat by dotted key
    (JSON-able): every key but those under RESUMABLE_KEYS."""
    flat = {}

    def walk(prefix: str, value) -> None:
        if isinstance(value, dict):
            for key, item in value.items():
                walk(f"{prefix}.{key}" if prefix else str(key), item)
        else:
            flat[prefix] = value

    walk("", json.loads(json.dumps(config.to_dict(), default=repr)))
    return {key: value for key, value in flat.items() if not _under(key, RESUMABLE_KEYS)}


def run_signature(net, config) -> dict:
    """model_signature(net) with the run's recipe(config)."""
    return {**model_signature(net), "recipe": recipe(config)}


def describe_recipe_changes(saved: dict, current: dict, allowed=(), limit: int = 8) -> list[str]:
    """The keys whose values differ between a checkpoint's recipe and the config's (a key
    only one side has included), as "key: checkpoint -> config" lines, but for those under
    `allowed`."""

    def kept(values: dict) -> dict:
        return {key: value for key, value in values.items() if not _under(key, allowed)}

    return jobs.differences(kept(saved), kept(current), limit=limit)


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
    # The adapters' scale, where the checkpoint records it (those written before do not).
    saved_lora, lora = saved.get("lora"), current.get("lora") or {}
    if saved_lora is not None:
        diffs += [
            f"lora.{key}: checkpoint {saved_lora.get(key)!r}, config {lora.get(key)!r}"
            for key in sorted(set(saved_lora) | set(lora))
            if saved_lora.get(key) != lora.get(key)
        ]
    if len(diffs) > limit:
        diffs = diffs[:limit] + [f"... and {len(diffs) - limit} more"]
    return diffs


class Checkpointer:
    """Saves and restores (TrainState, data iterator) under `workdir/checkpoints`."""

    def __init__(self, workdir: str, *, keep: int, signature: dict, allow_changes: str = ""):
        self.directory = os.path.join(os.path.abspath(workdir), "checkpoints")
        self.signature = signature
        self.allow_changes = tuple(k.strip() for k in allow_changes.split(",") if k.strip())
        _use_array_handler()
        self.manager = ocp.CheckpointManager(
            self.directory,
            options=ocp.CheckpointManagerOptions(max_to_keep=keep, create=True),
        )

    def latest_step(self) -> int | None:
        return self.manager.latest_step()

    def check_model(self, step: int) -> None:
        """Raises CheckpointMismatchError if checkpoint `step` holds another model, or was
        trained with another recipe (where both it and this signature record one)."""
        saved = self.manager.restore(step, args=ocp.args.Composite(model=ocp.args.JsonRestore()))
        saved = dict(saved["model"])
        diffs = describe_mismatch(saved, self.signature)
        if diffs:
            raise CheckpointMismatchError(
                f"{self.directory}/{step} holds a checkpoint of another model; use a new "
                "workdir or the matching config. Differences:\n  " + "\n  ".join(diffs)
            )
        if "recipe" not in saved or "recipe" not in self.signature:
            return
        diffs = describe_recipe_changes(
            dict(saved["recipe"]), self.signature["recipe"], self.allow_changes
        )
        if diffs:
            raise CheckpointMismatchError(
                f"{self.directory}/{step} was trained with other settings; resume with the "
                "same ones, start a new workdir (train.init_from takes an exported stage), "
                "or name the keys that may change in train.allow_changes (comma-separated; "
                "a group name allows the group). Differences, checkpoint -> config:\n  "
                + "\n  ".join(diffs)
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


def run_checkpointer(config, workdir: str, net) -> Checkpointer:
    """The Checkpointer of a training run of `config` on `net`: its checkpoints record the
    model and the recipe, and resuming checks both (train.allow_changes excepted)."""
    return Checkpointer(
        workdir,
        keep=config.train.keep_checkpoints,
        signature=run_signature(net, config),
        allow_changes=config.train.get("allow_changes", ""),
    )


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
