"""Where metrics go: `workdir/metrics.jsonl`, TensorBoard event files in
`workdir/tensorboard/` (`tensorboard --logdir=WORKDIR`), the absl log and a tqdm progress
bar. Only process 0 writes.

A run resumed from the checkpoint of step s repeats the steps after s that it had logged
before it was killed: `MetricWriter` first drops the lines of metrics.jsonl after s (and a
line cut short by the kill), and tells TensorBoard to drop its events after s (`purge_step`).
"""

from __future__ import annotations

import json
import math
import os
import time

import jax
from absl import logging
from tqdm import tqdm


class NonFiniteLossError(FloatingPointError):
    """The loss (or gradient norm) became NaN or infinite; the run stops before saving."""


def check_finite(step: int, metrics: dict, last_checkpoint: int | None, directory: str) -> None:
    bad = {k: metrics[k] for k in ("loss", "grad_norm") if not math.isfinite(metrics[k])}
    if bad:
        where = (
            f"the last good checkpoint is step {last_checkpoint} in {directory}"
            if last_checkpoint is not None
            else "no checkpoint was written"
        )
        raise NonFiniteLossError(
            f"Non-finite training metrics at step {step}: "
            + ", ".join(f"{k}={v}" for k, v in bad.items())
            + f". Stopping without saving; {where}. Lower optim.lr, check the data, or "
            "resume from that checkpoint."
        )


def truncate_metrics(path: str, last_step: int) -> int:
    """Rewrites the JSON lines file `path` without its records of steps after `last_step`
    and without lines that do not parse (one cut short by a kill); returns how many lines
    it dropped. A missing file is left missing."""
    if not os.path.exists(path):
        return 0
    with open(path) as f:
        text = f.read()
    lines = text.splitlines()
    keep = []
    for line in lines:
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            continue
        if isinstance(record, dict) and record.get("step", 0) <= last_step:
            keep.append(line)
    if not text or (len(keep) == len(lines) and text.endswith("\n")):
        return 0
    with open(path + ".tmp", "w") as f:
        f.writelines(line + "\n" for line in keep)
    os.replace(path + ".tmp", path)  # a kill now leaves the old file or the new, whole
    return len(lines) - len(keep)


class HostTimes:
    """Where the training loop's host thread spends a step, summed between two metric
    writes: `data` (the next batch from the input pipeline), `prepare` (tokenizing and
    encoding the captions, sharding the batch, latents), `dispatch` (handing the step to
    the device) and `wait` (waiting for the previous step: the device's share). `averages`
    gives milliseconds per step, as `host_<phase>_ms` metrics, and starts the next
    interval. A loop bound by its host side shows small `wait` and large `data` or
    `prepare`; one bound by the device, the other way round."""

    PHASES = ("data", "prepare", "dispatch", "wait")

    def __init__(self):
        self._sums = dict.fromkeys(self.PHASES, 0.0)
        self._steps = 0
        self._mark = time.perf_counter()

    def start(self) -> None:
        """Starts timing a step's first phase."""
        self._mark = time.perf_counter()

    def lap(self, phase: str) -> None:
        """Adds the time since the last mark to `phase`."""
        now = time.perf_counter()
        self._sums[phase] += now - self._mark
        self._mark = now

    def step_done(self) -> None:
        self._steps += 1

    def averages(self) -> dict:
        if not self._steps:
            return {}
        out = {f"host_{k}_ms": 1e3 * v / self._steps for k, v in self._sums.items()}
        self._sums = dict.fromkeys(self.PHASES, 0.0)
        self._steps = 0
        return out


class MetricWriter:
    """Writes scalar metrics per step; counts images/s between writes. Records of steps
    after `start_step` already in the workdir (a run killed after its last checkpoint) are
    dropped first."""

    def __init__(
        self, workdir: str, *, total_steps: int, start_step: int, batch_size: int, progress: bool
    ):
        self.enabled = jax.process_index() == 0
        self.batch_size = batch_size
        self._last = (start_step, time.perf_counter())
        self._jsonl = None
        self._tb = None
        self._bar = None
        if not self.enabled:
            return
        os.makedirs(workdir, exist_ok=True)
        path = os.path.join(workdir, "metrics.jsonl")
        dropped = truncate_metrics(path, start_step)
        if dropped:
            logging.info("Dropped %d lines after step %d from %s", dropped, start_step, path)
        self._jsonl = open(path, "a")  # noqa: SIM115
        try:
            import tensorboardX
        except ImportError:
            logging.info("tensorboardX is not installed: no TensorBoard events are written")
        else:
            self._tb = tensorboardX.SummaryWriter(
                os.path.join(workdir, "tensorboard"), purge_step=start_step + 1
            )
        if progress:
            self._bar = tqdm(
                total=total_steps, initial=start_step, desc="train", unit="step", dynamic_ncols=True
            )

    def step_done(self) -> None:
        """One more step dispatched (moves the bar; no device sync)."""
        if self._bar is not None:
            self._bar.update(1)

    def write(self, step: int, metrics: dict) -> dict:
        """Adds images_per_s (since the last write) and writes `metrics` of `step`."""
        last_step, last_time = self._last
        now = time.perf_counter()
        metrics = dict(metrics)
        if step > last_step:
            metrics["images_per_s"] = (step - last_step) * self.batch_size / (now - last_time)
        self._last = (step, now)
        if not self.enabled:
            return metrics
        self._emit(step, metrics)
        if self._bar is not None:
            self._bar.set_postfix(
                loss=f"{metrics['loss']:.4f}", img_s=f"{metrics.get('images_per_s', 0):.1f}"
            )
        return metrics

    def write_eval(self, step: int, metrics: dict) -> None:
        """Writes an evaluation's metrics of `step`; the time it took does not count
        against images/s."""
        self._last = (self._last[0], time.perf_counter())
        if self.enabled:
            self._emit(step, metrics)

    def _emit(self, step: int, metrics: dict) -> None:
        self._jsonl.write(json.dumps({"step": step, **metrics}) + "\n")
        self._jsonl.flush()
        if self._tb is not None:
            for name, value in metrics.items():
                self._tb.add_scalar(name, value, step)
            self._tb.flush()
        logging.info(
            "step %d: %s", step, ", ".join(f"{k}={v:.5g}" for k, v in sorted(metrics.items()))
        )

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()
        if self._jsonl is not None:
            self._jsonl.close()
        if self._tb is not None:
            self._tb.close()
