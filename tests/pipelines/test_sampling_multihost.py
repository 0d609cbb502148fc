"""Two processes joined by jax.distributed on 127.0.0.1 run one sampling job together
(sample.py's multi-host flags, sampling_worker.py), and match a one-process job byte for byte.
"""

import json
import os
import pathlib
import socket
import subprocess
import sys

from imagen_jax.pipelines import jobs

WORKER = pathlib.Path(__file__).with_name("sampling_worker.py")
PROMPTS = ["a red circle", "two blue squares", "a green star", "a heart", "three crosses"]
IMAGES_PER_PROMPT = 2
TIMEOUT_S = 300


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _run_workers(commands: list[list[str]]) -> list[str]:
    """Runs the workers side by side; their output (stdout and stderr), each checked for a
    zero exit status."""
    # Each worker has JAX's default single CPU device: no simulated devices from conftest.
    env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
    procs = [
        subprocess.Popen(
            [sys.executable, str(WORKER), *args],
            cwd=WORKER.parent,
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        for args in commands
    ]
    outputs = []
    try:
        for proc in procs:
            outputs.append(proc.communicate(timeout=TIMEOUT_S)[0])
    finally:
        for proc in procs:
            proc.kill()
    for args, proc, out in zip(commands, procs, outputs, strict=True):
        assert proc.returncode == 0, f"worker {args} failed:\n{out[-4000:]}"
    return outputs


def _written(output: str) -> list[str]:
    (line,) = [line for line in output.splitlines() if line.startswith("WROTE ")]
    return json.loads(line.removeprefix("WROTE "))


def test_two_processes_write_every_image_once(stage_dirs, tmp_path):
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("\n".join(PROMPTS[:2]) + "\n\n" + "\n".join(PROMPTS[2:]) + "\n")
    common = [f"--stage={d}" for d in stage_dirs] + [
        f"--prompts={prompts}",
        f"--images_per_prompt={IMAGES_PER_PROMPT}",
        "--batch_size=2",
        "--seed=3",
        "--nogrid",
    ]
    two, one = tmp_path / "two", tmp_path / "one"
    port = _free_port()
    outputs = _run_workers(
        [
            [
                *common,
                f"--outdir={two}",
                f"--coordinator_address=127.0.0.1:{port}",
                "--num_processes=2",
                f"--process_id={i}",
            ]
            for i in range(2)
        ]
        + [[*common, f"--outdir={one}"]]
    )
    entries = jobs.read_prompts(str(prompts))
    whole = [it.file for it in jobs.plan(entries, IMAGES_PER_PROMPT)]
    assert len(whole) == len(PROMPTS) * IMAGES_PER_PROMPT
    # Each process wrote exactly its share, once; the shares are disjoint and make the plan.
    shares = [_written(out) for out in outputs[:2]]
    for k, share in enumerate(shares):
        plan = jobs.plan(entries, IMAGES_PER_PROMPT, process_index=k, process_count=2)
        assert share == [it.file for it in plan], f"process {k} wrote {share}"
        assert f"{len(PROMPTS)} prompts read from {prompts}" in outputs[k]
    assert not set(shares[0]) & set(shares[1])
    assert sorted(shares[0] + shares[1]) == sorted(whole) == sorted(_written(outputs[2]))
    # The folder holds every image once, and the manifest lists each once.
    assert sorted(os.listdir(two / "images")) == sorted(os.path.basename(f) for f in whole)
    with open(two / "manifest.jsonl") as f:
        manifest = [json.loads(line) for line in f]
    assert [r["file"] for r in manifest] == sorted(whole)
    # The same bytes as a one-process job: images, their metadata, the manifest.
    for file in whole:
        assert (two / file).read_bytes() == (one / file).read_bytes(), file
    assert (two / "manifest.jsonl").read_bytes() == (one / "manifest.jsonl").read_bytes()
