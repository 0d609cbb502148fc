"""The web demo's latency on the shipped model: start-up (loading, compiling the default
setting), then for 1 and for N concurrent users the time from submitting a request to its
first preview (the predicted image after the base stage's first step) and to its final
images. Prints JSON lines.

    .venv/bin/python bench/demo_latency.py --users 1 4 --repeats 2

Each user is its own gradio_client on 127.0.0.1, every request the shipped defaults at a
different seed (one image). The demo runs one request at a time, so with N users the
last waits for the N - 1 before it: the spread is the queue, the minimum the service time.
There is no peer to run beside it.
"""

from __future__ import annotations

import argparse
import concurrent.futures
import json
import os
import platform
import socket
import statistics
import tempfile
import time

from gradio_client import Client

from imagen_jax.demo import app as demo_app
from imagen_jax.demo import loading as demo_loading

NAME = "shipped (shapes cascade)"


def _port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _args(model, seed: int) -> list:
    d = model.defaults()
    sr = []
    for k in (1, 2):
        dk = d[k] if k < len(d) else d[0]
        sr += [dk["steps"], dk["guidance_scale"], dk.get("aug_level", 0.0)]
    r = model.resolution
    head = [NAME, "a red circle above a blue square", "", seed, False, 1]
    return [
        *head,
        f"{r}x{r} (trained)",
        d[0]["sampler"],
        d[0]["steps"],
        d[0]["guidance_scale"],
        *sr,
    ]


def one_request(url: str, args: list) -> dict:
    client = Client(url, verbose=False)
    start = time.perf_counter()
    job = client.submit(*args, api_name="/generate")
    first = None
    for _ in job:
        first = first or time.perf_counter() - start
    return dict(first_preview_s=first, final_s=time.perf_counter() - start)


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--users", type=int, nargs="+", default=[1, 4])
    parser.add_argument("--repeats", type=int, default=2)
    args = parser.parse_args()
    t0 = time.perf_counter()
    models = demo_loading.load_models([])
    loaded = time.perf_counter() - t0
    workdir = tempfile.mkdtemp(prefix="demo_latency_")
    compiled = demo_app.warm_up(models, workdir)
    port = _port()
    server = demo_app.launch(
        models, port=port, warm=False, block=False, workdir=workdir, max_queue=64
    )
    url = f"http://127.0.0.1:{port}/"
    base = dict(
        bench="demo_latency",
        machine=platform.machine(),
        cpus=os.cpu_count(),
        model=NAME,
    )
    print(json.dumps(dict(base, startup_load_s=loaded, startup_compile_s=compiled)))
    model = models[NAME]
    seed = 0
    try:
        for users in args.users:
            rows = []
            for _ in range(args.repeats):
                with concurrent.futures.ThreadPoolExecutor(users) as pool:
                    futures = [
                        pool.submit(one_request, url, _args(model, seed + k)) for k in range(users)
                    ]
                    rows += [f.result() for f in futures]
                seed += users
            firsts = [r["first_preview_s"] for r in rows]
            finals = [r["final_s"] for r in rows]
            print(
                json.dumps(
                    dict(
                        base,
                        users=users,
                        requests=len(rows),
                        first_preview_median_s=statistics.median(firsts),
                        first_preview_max_s=max(firsts),
                        final_median_s=statistics.median(finals),
                        final_min_s=min(finals),
                        final_max_s=max(finals),
                    )
                )
            )
    finally:
        server.close()


if __name__ == "__main__":
    main()
