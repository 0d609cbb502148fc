"""The loop's host time by phase (`metrics.HostTimes`, logged as host_<phase>_ms): laps add
to their phase, averages are per step in milliseconds and start a new interval, and a
run's metrics lines carry them."""

import json

from conftest import tiny

from imagen_jax import training
from imagen_jax.training import metrics as metrics_lib


def test_laps_add_up_per_phase_and_average_per_step(monkeypatch):
    clock = iter([0.0, 0.0, 0.010, 0.013, 0.014, 0.050, 1.0, 1.004, 1.010, 1.011, 1.031])
    monkeypatch.setattr(metrics_lib.time, "perf_counter", lambda: next(clock))
    host = metrics_lib.HostTimes()
    for _ in range(2):
        host.start()
        for phase in metrics_lib.HostTimes.PHASES:
            host.lap(phase)
        host.step_done()
    got = {k: round(v, 6) for k, v in host.averages().items()}
    # step 1: data 10, prepare 3, dispatch 1, wait 36 ms; step 2: 4, 6, 1, 20 ms
    assert got == {
        "host_data_ms": 7.0,
        "host_prepare_ms": 4.5,
        "host_dispatch_ms": 1.0,
        "host_wait_ms": 28.0,
    }
    assert host.averages() == {}  # a new interval, no steps yet


def test_a_run_logs_its_host_phases(tmp_path):
    training.train_and_evaluate(tiny(steps=2), str(tmp_path))
    lines = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [line["step"] for line in lines] == [1, 2]
    for line in lines:
        assert all(line[f"host_{p}_ms"] >= 0 for p in metrics_lib.HostTimes.PHASES)
