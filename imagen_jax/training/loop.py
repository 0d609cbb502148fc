"""The training loop that every stage shares: the mesh, the sharded state (fresh, from a
stage directory, or restored), the global batch, and `train_loop`.

The loop dispatches step s, then waits for step s - 1 (the device always has the next step
queued while the host reads and encodes the next batch, and the host never runs further
ahead: on CPU, a deep queue of multi-device programs can starve XLA's collectives). It
copies metrics to the host every `train.log_every` steps and before every checkpoint,
sample grid or evaluation; a non-finite loss or gradient norm among them stops the run with
`NonFiniteLossError` before anything is saved, leaving the last good checkpoint. SIGTERM (a
scheduler's preemption, `timeout`) ends the run at the next step boundary with a checkpoint
of that step (`StopSignal`), so it resumes exactly where it stopped, and raises `Preempted`:
`train.py` then exits with `PREEMPTED_EXIT_CODE`, so that a scheduler can tell a stopped run
(to requeue) from a finished one.

The diffusion trainer (`trainer.py`) and the autoencoder's (`vae_trainer.py`) each build
their step and sample grid and hand them to `train_loop`.
"""

from __future__ import annotations

import signal
import threading

import jax
import ml_collections
import numpy as np
from absl import logging
from jax.experimental import multihost_utils

from imagen_jax import logs, parallel
from imagen_jax.text.config import encode_captions
from imagen_jax.training import checkpoint as ckpt_lib
from imagen_jax.training import input as input_lib
from imagen_jax.training import metrics as metrics_lib
from imagen_jax.training import state as state_lib

# The batch entries of a record's "counterfactual" caption (a caption of what the scene is
# not; the shapes source writes them with `data.counterfactuals`), encoded by `device_batch`.
COUNTERFACTUAL_KEYS = ("counter_text", "counter_mask", "has_counterfactual")

# The batch entries of a captioner's run: its captions' token ids and mask (int32 [B, L]),
# made on the host (`caption_trainer.TokenizedCaptions`), and the shapes source's per-cell
# labels (int32 [B, n, n], `data.cell_labels`) for its tower's cell loss.
CAPTION_KEYS = ("caption_ids", "caption_mask", "cell_labels")

# train.py's exit status when a signal stopped the run before `train.steps`: 128 + SIGTERM,
# what a shell reports for a process that SIGTERM killed (a finished run exits 0).
PREEMPTED_EXIT_CODE = 143


class Preempted(Exception):
    """A signal stopped the run at a step boundary before `train.steps`, after the checkpoint
    of that step was saved: rerunning the same command resumes from it.

    `step`, `state` and `metrics` are the stopped step and what `train_loop` would have
    returned there; `signum` is the signal's number."""

    def __init__(self, *, step: int, signum: int | None, directory: str, state, metrics: dict):
        by = f"signal {signum}" if signum is not None else "a signal to another process"
        super().__init__(
            f"stopped by {by} after step {step}; its checkpoint is in {directory}: rerun the "
            "same command to resume"
        )
        self.step = step
        self.signum = signum
        self.state = state
        self.metrics = metrics


def make_mesh(config: ml_collections.ConfigDict):
    """The config's mesh. A mesh smaller than the job (all sizes given, no -1) takes the
    first devices: on one process that runs a job on a subset of the devices."""
    axes = [tuple(axis) for axis in config.mesh]
    devices = jax.devices()
    sizes = [size for _, size in axes]
    if -1 not in sizes and int(np.prod(sizes)) < len(devices):
        if jax.process_count() > 1:
            raise ValueError(f"mesh {axes} is smaller than the job's {len(devices)} devices")
        devices = devices[: int(np.prod(sizes))]
    return parallel.make_mesh(axes, devices)


class StopSignal:
    """Turns SIGTERM into a request to stop at the next step boundary.

    `train_loop` saves a checkpoint of the step it has just taken and raises `Preempted`;
    rerunning the same command resumes from exactly there. Every process must stop at the
    same step (the checkpoint is collective), so with several processes the request is
    shared by a small all-gather of the flag every `train.log_every` steps.
    `install` sets the handler (from the main thread only; elsewhere it does nothing),
    `restore` puts the previous one back.
    """

    def __init__(self, signals=(signal.SIGTERM,)):
        self.signals = tuple(signals)
        self.received: int | None = None  # the signal's number once one arrived
        self._previous: dict = {}

    def install(self) -> StopSignal:
        if threading.current_thread() is threading.main_thread():
            for sig in self.signals:
                self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def restore(self) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._previous.clear()

    def _handle(self, signum, frame) -> None:
        self.received = signum

    def should_stop(self, step: int, sync_every: int) -> bool:
        if jax.process_count() == 1:
            return self.received is not None
        if step % sync_every:
            return False
        flags = multihost_utils.process_allgather(np.asarray(self.received is not None))
        return bool(np.any(flags))


def make_state(config, net, tx, mesh, checkpointer, data_iterator):
    """A fresh sharded TrainState (its weights from the stage `train.init_from` if set), or
    the latest checkpoint's restored into this mesh.
    Returns (state, shardings, rest) as `state.create_train_state`."""
    latest = checkpointer.latest_step()
    if latest is None:
        state, shardings, rest = state_lib.create_train_state(config, net, tx, mesh)
        if config.train.init_from and net.lora is None:
            params = state_lib.params_from_stage(
                config.train.init_from, net, shardings.params, fresh=state.params
            )
            state = state._replace(params=params, ema_params=state_lib.copy_tree(params))
            logging.info("New train state with the weights of %s", config.train.init_from)
        else:
            logging.info("Initialised a new train state")
    else:
        abstract, shardings = state_lib.state_shardings(config, net, tx, mesh)
        target = state_lib.abstract_with_shardings(abstract, shardings)
        state = checkpointer.restore(latest, target, data_iterator)
        rest = state_lib.init_rest(config, net, mesh)
        logging.info("Resumed from %s/%d", checkpointer.directory, latest)
    rest = state_lib.with_frozen_base(config, net, rest)
    note = logs.cpu_allocator_note(jax.default_backend())
    if note:
        logging.info(note)
    logging.info(
        "Mesh %s; sharded parameters:\n%s",
        dict(mesh.shape),
        parallel.describe_shardings(net.abstract_params, shardings.params),
    )
    return state, shardings, rest


def device_batch(batch, encoder, mesh):
    """This process's numpy batch -> the step's global arrays (the text encoded here, unless
    the batch carries it from a text cache or there is no `encoder`: the VAE's stage).

    On one process the embeddings stay on the devices: copying them to the host would wait
    for the train step queued before the encoder, and the host could not prepare the next
    batch meanwhile. Several processes build the global batch from host arrays.
    """
    text = {}
    if encoder is not None and "text" not in batch:
        on_device = jax.process_count() == 1
        text = encode_captions(encoder, batch["caption"], to_host=not on_device)
        if "counterfactual" in batch:  # "" where a scene has none: the has_counterfactual mask
            other = encode_captions(encoder, batch["counterfactual"], to_host=not on_device)
            text["counter_text"], text["counter_mask"] = other["text"], other["text_mask"]
            text["has_counterfactual"] = np.asarray([bool(c) for c in batch["counterfactual"]])
        if on_device:
            text = jax.device_put(text, parallel.batch_sharding(mesh))
        else:
            batch, text = dict(batch, **text), {}
    keys = (
        "image",
        "low_res",
        "text",
        "text_mask",
        "text_pooled",
        "size_crop",
        "example_weight",
        *COUNTERFACTUAL_KEYS,
        *CAPTION_KEYS,
    )
    return {**parallel.global_batch({k: batch[k] for k in keys if k in batch}, mesh), **text}


def make_stage_network(config, mesh) -> state_lib.Network:
    """The stage's network (shapes only), once the stage and its data are checked."""
    net = state_lib.make_network(config.model)
    input_lib.check_stage(config, net.num_levels, parallel.data_parallel_size(mesh))
    return net


def train_loop(
    config,
    workdir,
    mesh,
    net,
    encoder,
    data,
    state,
    rest,
    train_step,
    checkpointer,
    *,
    evaluation=None,
    prepare=None,
    make_grid=None,
):
    """Steps from `state.step` to `train.steps`, evaluating every `evals.every` steps with
    `evaluation` (a PeriodicEvaluation); returns (state, last metrics, with the last
    evaluation's).

    prepare: `prepare(batch, step) -> batch` on each global batch before the step (latent
      stages: images -> latents). make_grid: `make_grid(first batch) -> grid` builds the
      sample grid (used when `train.sample_every` > 0), called as
      `grid(step, ema_params, rest)`.
    SIGTERM (`StopSignal`) makes the loop checkpoint the step it has just taken and raise
    `Preempted` (unless that step was the last: then the run has finished and returns).
    """
    tcfg = config.train
    start = int(jax.device_get(state.step))
    writer = metrics_lib.MetricWriter(
        workdir,
        total_steps=tcfg.steps,
        start_step=start,
        batch_size=config.data.batch_size,
        progress=tcfg.progress,
    )
    grid = None
    pending: list[tuple[int, dict]] = []
    last = {}
    last_saved = checkpointer.latest_step()
    stopped_at = None

    host = metrics_lib.HostTimes()

    def flush():
        nonlocal last
        for step, metrics in jax.device_get(pending):
            metrics = {k: float(v) for k, v in metrics.items()}
            metrics_lib.check_finite(step, metrics, last_saved, checkpointer.directory)
            last = metrics
        if pending:
            last = writer.write(pending[-1][0], {**last, **host.averages()})
        pending.clear()

    compiled = {}  # the batch's shapes -> the compiled step
    stop = StopSignal().install()
    try:
        for step in range(start + 1, tcfg.steps + 1):
            host.start()
            local = next(data)
            host.lap("data")
            if step == start + 1:
                input_lib.check_batch(local, config)
            batch = device_batch(local, encoder, mesh)
            if prepare is not None:
                batch = prepare(batch, step)
            host.lap("prepare")
            shapes = tuple((x.shape, x.dtype) for x in jax.tree.leaves(batch))
            if shapes not in compiled:  # once, and once per aspect-ratio bucket
                # Compile ahead, then wait for every process: the step's first collective
                # (gloo on CPU) gives up when processes reach it more than 30 s apart, as a
                # slower compile on a loaded host would make them.
                compiled[shapes] = train_step.lower(state, rest, batch).compile()
                parallel.barrier(f"imagen_jax train step compiled ({len(compiled)})")
            if grid is None and tcfg.sample_every:
                grid = make_grid(batch)
            host.start()  # a compile or the grid's first batch is not the step's time
            state, metrics = compiled[shapes](state, rest, batch)
            host.lap("dispatch")
            if pending:  # at most two steps in flight: the host never runs far ahead
                jax.block_until_ready(pending[-1][1])
            host.lap("wait")
            host.step_done()
            pending.append((step, metrics))
            writer.step_done()
            stopping = stop.should_stop(step, tcfg.log_every)
            save = step % tcfg.checkpoint_every == 0 or step == tcfg.steps or stopping
            sample = bool(tcfg.sample_every) and step % tcfg.sample_every == 0
            evaluate = evaluation is not None and step % config.evals.every == 0
            if save or sample or evaluate or step % tcfg.log_every == 0:
                flush()
            if save:
                checkpointer.save(step, state, data)
                last_saved = step
            if sample:
                grid(step, state.ema_params, rest)
            if evaluate:
                scores = evaluation(step, state.ema_params, rest)
                writer.write_eval(step, scores)
                last = {**last, **scores}
            if stopping and step < tcfg.steps:
                stopped_at = step
                break
        flush()
    finally:
        stop.restore()
        writer.close()
    if stopped_at is not None:
        preempted = Preempted(
            step=stopped_at,
            signum=stop.received,
            directory=checkpointer.directory,
            state=state,
            metrics=last,
        )
        logging.warning("%s", preempted)
        raise preempted
    return state, last


def train_and_export(
    config,
    workdir,
    *,
    make_data,
    make_step,
    make_grid,
    export,
    encoder=None,
    make_optimizer=None,
    make_evaluation=None,
):
    """The run of an objective other than diffusion (the VAE, the captioner, the contrastive
    embedding model): mesh, network, optimizer, checkpoints with resume, `train_loop`, then
    `export(net, params)` of the gathered EMA weights on process 0. make_data(config) -> the
    batch iterator; make_step(config, net, tx, lr_schedule, mesh, shardings, rest) -> the
    jitted step; make_grid(net, mesh, batch) -> the periodic sample writer (None: none);
    encoder: the frozen text encoder of the batches' captions (`device_batch`);
    make_optimizer(config, net) -> (tx, lr_schedule) (default: `optim`'s over every
    parameter); make_evaluation(net, mesh) -> the evaluation of every `evals.every` steps.
    Returns (state, metrics)."""
    mesh = make_mesh(config)
    with jax.set_mesh(mesh):
        net = make_stage_network(config, mesh)
        if make_optimizer is None:
            tx, lr_schedule = state_lib.make_optimizer(config.optim, config.train.steps)
        else:
            tx, lr_schedule = make_optimizer(config, net)
        checkpointer = ckpt_lib.run_checkpointer(config, workdir, net)
        data = None
        try:
            data = make_data(config)
            state, shardings, rest = make_state(config, net, tx, mesh, checkpointer, data)
            train_step = make_step(config, net, tx, lr_schedule, mesh, shardings, rest)
            state, metrics = train_loop(
                config,
                workdir,
                mesh,
                net,
                encoder,
                data,
                state,
                rest,
                train_step,
                checkpointer,
                evaluation=None if make_evaluation is None else make_evaluation(net, mesh),
                make_grid=None if make_grid is None else lambda batch: make_grid(net, mesh, batch),
            )
        finally:
            checkpointer.close()
            if data is not None:
                data.close()
        params = multihost_utils.process_allgather(state.ema_params, tiled=True)
    if jax.process_index() == 0:
        export(net, params)
    return state, metrics
