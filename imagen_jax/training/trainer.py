"""`train_and_evaluate(config, workdir)`: the training loop of one cascade stage.

    state, metrics = train_and_evaluate(config, workdir)

reads as: make mesh, make network, make text encoder (and open its cache of the data's
captions when `text.cache` is set), make data, make state (restored from
`workdir/checkpoints` when it holds one), loop. The loop dispatches step s, then
waits for step s - 1 (the device always has the next step queued while the host reads
and encodes the next batch, and the host never runs further ahead: on CPU, a deep queue
of multi-device programs can starve XLA's collectives). It copies metrics to the host
every `train.log_every` steps and before every checkpoint, sample grid or evaluation
(`evals.every`: sample the evaluation prompts and score them, `training/evaluation.py`);
a non-finite loss or gradient norm among them stops the run with `NonFiniteLossError`
before anything is saved, leaving the last good checkpoint. SIGTERM (a scheduler's
preemption, `timeout`) ends the run at the next step boundary with a checkpoint of that
step (`StopSignal`), so it resumes exactly where it stopped.

`model.family` picks the stage: "imagen" (pixel stages), "sd_unet" or "mmdit" (a latent
stage, UNet or SD3 MMDiT: the batches' images become latents of the frozen VAE of
`latent.vae` before the step, `training/latent.py`, and the sample grid decodes its
latents with it) or "vae" (the
autoencoder itself: `training/vae_trainer.py:train_vae`, the same loop with its own step).
"""

from __future__ import annotations

import signal
import threading

import jax
import ml_collections
import numpy as np
from absl import logging

from imagen_jax import parallel
from imagen_jax.training import checkpoint as ckpt_lib
from imagen_jax.training import evaluation as eval_lib
from imagen_jax.training import input as input_lib
from imagen_jax.training import latent as latent_lib
from imagen_jax.training import metrics as metrics_lib
from imagen_jax.training import sampling as sampling_lib
from imagen_jax.training import state as state_lib
from imagen_jax.training import step as step_lib
from imagen_jax.training import text as text_lib
from imagen_jax.training.config import LATENT_FAMILIES


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

    `train_loop` saves a checkpoint of the step it has just taken and returns; rerunning
    the same command resumes from exactly there. Every process must stop at the same step
    (the checkpoint is collective), so with several processes the request is shared by a
    small all-gather of the flag every `train.log_every` steps.
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
        from jax.experimental import multihost_utils

        flags = multihost_utils.process_allgather(np.asarray(self.received is not None))
        return bool(np.any(flags))


def make_state(config, net, tx, mesh, checkpointer, data_iterator):
    """A fresh sharded TrainState (its weights from the stage `train.init_from` if set), or
    the latest checkpoint's restored into this mesh.
    Returns (state, shardings, rest) as `state.create_train_state`."""
    latest = checkpointer.latest_step()
    if latest is None:
        state, shardings, rest = state_lib.create_train_state(config, net, tx, mesh)
        if config.train.init_from:
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
        rest = state_lib.init_rest(net, mesh, config.train.seed)
        logging.info("Resumed from %s/%d", checkpointer.directory, latest)
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
        text = text_lib.encode_captions(encoder, batch["caption"], to_host=not on_device)
        if "counterfactual" in batch:  # "" where a scene has none: the has_counterfactual mask
            other = text_lib.encode_captions(
                encoder, batch["counterfactual"], to_host=not on_device
            )
            text["counter_text"], text["counter_mask"] = other["text"], other["text_mask"]
            text["has_counterfactual"] = np.asarray([bool(c) for c in batch["counterfactual"]])
        if on_device:
            text = jax.device_put(text, parallel.batch_sharding(mesh))
        else:
            batch, text = dict(batch, **text), {}
    keys = ("image", "low_res", "text", "text_mask", *step_lib.COUNTERFACTUAL_KEYS)
    return {**parallel.global_batch({k: batch[k] for k in keys if k in batch}, mesh), **text}


def make_stage_network(config, mesh) -> state_lib.Network:
    """The stage's network (shapes only), once the stage and its data are checked."""
    net = state_lib.make_network(config.model)
    input_lib.check_stage(config, net.num_levels, parallel.data_parallel_size(mesh))
    return net


def make_text_encoder(config, net) -> text_lib.TextEncoder:
    encoder = text_lib.make_text_encoder(
        config.text, batch_size=config.data.batch_size // jax.process_count()
    )
    width = text_lib.text_width(encoder)
    if width != net.text_dim:
        raise ValueError(
            f"the text encoder gives {width}-dim embeddings but the model expects "
            f"{net.text_dim_key}={net.text_dim}"
        )
    return encoder


def open_text_cache(config, encoder, net):
    """The text cache of `text.cache` (None if unset), checked to be the encoder's and to fit
    the model."""
    if not config.text.cache:
        return None
    from imagen_jax.text.cache import EmbeddingCache  # lazy: only cached runs need it

    cache = EmbeddingCache.open(config.text.cache, expect_fingerprint=encoder.fingerprint())
    if (cache.max_length, cache.dim) != (encoder.max_length, net.text_dim):
        raise ValueError(
            f"the text cache {cache.directory} holds [L={cache.max_length}, D={cache.dim}] "
            f"embeddings; the stage needs L={encoder.max_length} (text.max_length) and "
            f"D={net.text_dim} ({net.text_dim_key})"
        )
    logging.info("Text from the cache %s (%d captions)", cache.directory, len(cache))
    return cache


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str):
    """Trains the stage of `config` in `workdir` (resuming from its checkpoints).

    Returns (final TrainState, metrics of the last logged step, as floats; the same on
    every process).
    """
    if config.model.get("family", "imagen") == "vae":
        from imagen_jax.training import vae_trainer  # lazy: it imports this module

        return vae_trainer.train_vae(config, workdir)
    mesh = make_mesh(config)
    with jax.set_mesh(mesh):
        net = make_stage_network(config, mesh)
        latent = None
        if net.family in LATENT_FAMILIES:
            latent = latent_lib.LatentSpace.from_config(config, net, mesh)
        tx, lr_schedule = state_lib.make_optimizer(config.optim, config.train.steps)
        checkpointer = ckpt_lib.Checkpointer(
            workdir, keep=config.train.keep_checkpoints, signature=ckpt_lib.model_signature(net)
        )
        data = None
        try:
            encoder = make_text_encoder(config, net)  # also for the sample grid's prompts
            data = input_lib.make_input(config, open_text_cache(config, encoder, net))
            state, shardings, rest = make_state(config, net, tx, mesh, checkpointer, data)
            train_step = step_lib.make_train_step(
                config, net, tx, lr_schedule, mesh, shardings, rest
            )
            evaluation = None
            if config.evals.every:
                evaluation = eval_lib.PeriodicEvaluation(config, net, mesh, encoder, workdir)
            prepare = make_grid = None
            if latent is not None:
                prepare = latent.encode_batch
                make_grid = lambda batch: sampling_lib.SampleGrid(
                    config, net, mesh, encoder, workdir, batch, latent=latent
                )
            return train_loop(
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
                evaluation=evaluation,
                prepare=prepare,
                make_grid=make_grid,
            )
        finally:
            checkpointer.close()
            if data is not None:
                data.close()


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
      sample grid (default `sampling.SampleGrid`), called as `grid(step, ema_params, rest)`.
    SIGTERM (`StopSignal`) makes the loop checkpoint the step it has just taken and return.
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

    def flush():
        nonlocal last
        for step, metrics in jax.device_get(pending):
            metrics = {k: float(v) for k, v in metrics.items()}
            metrics_lib.check_finite(step, metrics, last_saved, checkpointer.directory)
            last = metrics
        if pending:
            last = writer.write(pending[-1][0], last)
        pending.clear()

    stop = StopSignal().install()
    try:
        for step in range(start + 1, tcfg.steps + 1):
            local = next(data)
            if step == start + 1:
                input_lib.check_batch(local, config)
            batch = device_batch(local, encoder, mesh)
            if prepare is not None:
                batch = prepare(batch, step)
            if step == start + 1:
                # Compile ahead, then wait for every process: the step's first collective
                # (gloo on CPU) gives up when processes reach it more than 30 s apart, as a
                # slower compile on a loaded host would make them.
                train_step = train_step.lower(state, rest, batch).compile()
                parallel.barrier("imagen_jax train step compiled")
            if grid is None and tcfg.sample_every:
                if make_grid is None:
                    grid = sampling_lib.SampleGrid(config, net, mesh, encoder, workdir, batch)
                else:
                    grid = make_grid(batch)
            state, metrics = train_step(state, rest, batch)
            if pending:  # at most two steps in flight: the host never runs far ahead
                jax.block_until_ready(pending[-1][1])
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
            if stopping:
                logging.warning(
                    "Stopped by signal %s after step %d; its checkpoint is in %s: rerun the "
                    "same command to resume",
                    stop.received,
                    step,
                    checkpointer.directory,
                )
                break
        flush()
    finally:
        stop.restore()
        writer.close()
    return state, last
