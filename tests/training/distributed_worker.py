"""One process of the two-process test (test_distributed.py); not a test itself.

    python distributed_worker.py PORT PROCESS_ID WORKDIR (sigterm | lora PIPELINE_DIR)

Joins a 2-process job on 127.0.0.1:PORT with 4 simulated CPU devices of its own, trains in
WORKDIR and prints one JSON line with its view of the result. With `sigterm`, the runlocal
base stage for 4 steps (stop requests shared every 2, a periodic evaluation every 2), and
process 1 sends itself SIGTERM while preparing step 1: both processes evaluate and
checkpoint step 2 and raise `Preempted` there, and the result is its state. With
`lora PIPELINE_DIR`, two steps of rank-2 adapters on a tiny SD pipeline
(configs/sd_finetune.py:runlocal).
"""

import json
import os
import signal
import sys

os.environ["XLA_FLAGS"] = "--xla_force_host_platform_device_count=4"
os.environ["JAX_PLATFORMS"] = "cpu"

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
from conftest import stage_config, tiny  # noqa: E402  (sets the shared compilation cache)

from imagen_jax import parallel  # noqa: E402
from imagen_jax.training import Preempted, loop, train_and_evaluate  # noqa: E402


def sigterm_on_first_batch():
    original = loop.device_batch

    def device_batch(*args):
        if not getattr(device_batch, "sent", False):
            device_batch.sent = True
            os.kill(os.getpid(), signal.SIGTERM)
        return original(*args)

    loop.device_batch = device_batch


def lora_config(pipeline: str):
    """Two steps of rank-2 adapters on the tiny SD pipeline at `pipeline`."""
    arg = f"runlocal,pipeline={pipeline},lora=2,lr=0.01"
    return stage_config("sd_finetune", arg, steps=2, checkpoint_every=2, sample_every=0)


def main(port: str, process_id: str, workdir: str, mode: str, pipeline: str = ""):
    parallel.initialize_distributed(
        coordinator_address=f"127.0.0.1:{port}", num_processes=2, process_id=int(process_id)
    )
    if mode == "lora":
        config = lora_config(pipeline)
    elif mode == "sigterm":
        config = tiny(steps=4, log_every=2)
        config.evals.every = 2  # periodic evaluation: over both hosts' devices, gathered
        config.evals.prompts_per_task = 1
        config.evals.batch_size = 8
        config.sample.steps = 2
        if jax.process_index() == 1:
            sigterm_on_first_batch()
    else:
        raise SystemExit(f"unknown mode {mode!r}: sigterm | lora PIPELINE_DIR")
    try:
        state, metrics = train_and_evaluate(config, workdir)
        preempted = False
    except Preempted as stopped:
        state, metrics, preempted = stopped.state, stopped.metrics, True
    checksum = jax.jit(lambda p: sum(jnp.sum(jnp.abs(x)) for x in jax.tree.leaves(p)))
    result = dict(
        process=jax.process_index(),
        processes=jax.process_count(),
        devices=jax.device_count(),
        step=int(jax.device_get(state.step)),
        preempted=preempted,
        loss=metrics["loss"],
        param_checksum=float(checksum(state.params)),
        evals={k: v for k, v in metrics.items() if k.startswith("eval/")},
    )
    print("RESULT " + json.dumps(result), flush=True)
    jax.distributed.shutdown()


if __name__ == "__main__":
    main(*sys.argv[1:])
