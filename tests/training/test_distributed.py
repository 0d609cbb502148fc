"""Two processes joined by jax.distributed on 127.0.0.1 train one model together, evaluate it
over both hosts' devices, and stop together when one of them gets SIGTERM."""

import json
import os
import pathlib
import socket
import subprocess
import sys

import pytest

WORKER = pathlib.Path(__file__).with_name("distributed_worker.py")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _run_two_processes(workdir, *mode) -> list[dict]:
    """Both workers' RESULT lines (each process's view), after checking they exited 0."""
    port = _free_port()
    env = {k: v for k, v in os.environ.items() if k not in ("XLA_FLAGS", "JAX_PLATFORMS")}
    procs = [
        subprocess.Popen(
            [sys.executable, str(WORKER), str(port), str(i), str(workdir), *mode],
            cwd=WORKER.parent,
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        for i in range(2)
    ]
    outputs = []
    try:
        for proc in procs:
            outputs.append(proc.communicate(timeout=240)[0])
    finally:
        for proc in procs:
            proc.kill()
    for proc, out in zip(procs, outputs, strict=True):
        assert proc.returncode == 0, out[-4000:]
    results = [
        json.loads(line.removeprefix("RESULT "))
        for out in outputs
        for line in out.splitlines()
        if line.startswith("RESULT ")
    ]
    assert sorted(r["process"] for r in results) == [0, 1]
    return results


def test_two_processes_train_evaluate_and_stop_together_on_sigterm_to_one(tmp_path):
    """Process 1 is signalled before step 1 of 4; the request is shared at step 2, where
    both evaluate (over both hosts' devices), checkpoint and stop."""
    results = _run_two_processes(tmp_path, "sigterm")
    assert all(r["processes"] == 2 and r["devices"] == 8 for r in results)
    assert [r["step"] for r in results] == [2, 2]  # stopped where the request was shared
    assert all(r["preempted"] for r in results)  # both report the stop (train.py: exit 143)
    assert results[0]["loss"] == results[1]["loss"]
    assert results[0]["param_checksum"] == results[1]["param_checksum"]
    assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir() if p.name.isdigit()) == ["2"]
    data = sorted(p.name for p in (tmp_path / "checkpoints" / "2" / "data").glob("*.json"))
    assert data == ["process_0-of-2.json", "process_1-of-2.json"]
    lines = [json.loads(x) for x in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [x["step"] for x in lines if "loss" in x] == [2]  # every 2 steps, process 0 only
    # Both hosts saw every image of the evaluation and agree.
    evals = [x for x in lines if "eval/compositional/heldout/overall" in x]
    assert [x["step"] for x in evals] == [2]
    assert results[0]["evals"] == results[1]["evals"]
    assert results[0]["evals"]["eval/compositional/heldout/overall"] == pytest.approx(
        evals[0]["eval/compositional/heldout/overall"]
    )
    report = json.loads((tmp_path / "evals" / "step_00000002.json").read_text())
    assert report["num_images"] == 6


def test_two_processes_train_adapters_on_a_public_pipeline(tmp_path):
    """Rank-2 adapters on a tiny SD pipeline (configs/sd_finetune.py) over two processes of
    4 devices each: both hold the same adapters and loss, and the checkpoint holds both
    processes' data state. (A one-process run sees the same examples in another row order,
    so other timesteps and noise per example: its numbers differ.)"""
    from tiny_diffusers import sd_ddim, sd_pipeline

    sd_pipeline(tmp_path / "sd", sd_ddim())
    results = _run_two_processes(tmp_path / "run", "lora", str(tmp_path / "sd"))
    assert all(r["processes"] == 2 and r["devices"] == 8 and r["step"] == 2 for r in results)
    assert not any(r["preempted"] for r in results)  # a run that reaches its end finishes
    assert results[0]["loss"] == results[1]["loss"]
    assert results[0]["param_checksum"] == results[1]["param_checksum"]
    data = sorted(p.name for p in (tmp_path / "run" / "checkpoints" / "2" / "data").glob("*.json"))
    assert data == ["process_0-of-2.json", "process_1-of-2.json"]
