"""The web demo, served on 127.0.0.1 inside the test and driven with gradio_client: a
generation whose PNGs are byte for byte sample.py's, progress, cancel, bad input answered
on the page, and a crowd of clients against a short queue."""

import concurrent.futures
import threading
import time

import pytest
from gradio_client import Client
from PIL import Image

from imagen_jax.demo import models as demo_models
from imagen_jax.pipelines import jobs, sampling

NAME = "base+sr"  # the model the server fixture (conftest.py) serves
# model, prompt, negative, seed, random seed, images, size, sampler, steps, guidance, then
# (steps, guidance, augmentation) of two super-resolution stages.
DEFAULT = dict(
    model=NAME,
    prompt="a red circle",
    negative="",
    seed=5,
    random_seed=False,
    images=2,
    size="16x16 (trained)",
    sampler="ddim",
    steps=3,
    guidance=2.0,
    sr=(2, 1.5, 0.2, 4, 3.0, 0.1),
)
SET = ["0.sampler=ddim", "0.steps=3", "0.guidance_scale=2.0", "1.steps=2"]
SET += ["1.guidance_scale=1.5", "1.aug_level=0.2"]


def _args(**over):
    a = {**DEFAULT, **over}
    head = [a[k] for k in ("model", "prompt", "negative", "seed", "random_seed", "images")]
    return [*head, a["size"], a["sampler"], a["steps"], a["guidance"], *a["sr"]]


def _generate(client, **over):
    job = client.submit(*_args(**over), api_name="/generate")
    updates = list(job)
    return job, updates


def test_generation_is_byte_for_byte_sample_py(server, stage_dirs, tmp_path):
    model, client, _ = server
    job, updates = _generate(client)
    # The predicted image at each of the base's 3 steps (a preview every step below 4
    # steps), its output, the same for the SR stage's 2 steps, then the final update.
    sizes = [Image.open(u[0] if isinstance(u[0], str) else u[0]["value"]).size for u in updates]
    assert sizes == [(8, 8)] * (3 + 1) + [(16, 16)] * (2 + 1) + [(16, 16)]
    preview, gallery, files, info, seed, history = updates[-1]  # (the State is not sent)
    assert seed == 5 and len(files) == 2 and len(history) == 1
    assert "python sample.py" in info and "--seed=5" in info
    summary = sampling.run_sampling_job(
        stages=stage_dirs,
        prompts=["a red circle"],
        prompts_file=None,
        negative_prompt="",
        images_per_prompt=2,
        seed=5,
        batch_size=2,
        outdir=str(tmp_path),
        overrides=SET,
        grid=False,
        height=16,
        width=16,
    )
    assert summary["made"] == 2
    for k, path in enumerate(files):
        with open(path, "rb") as f, open(tmp_path / f"images/000000_00{k}.png", "rb") as g:
            assert f.read() == g.read(), f"image {k} differs from sample.py's"
    meta = jobs.read_metadata(files[0])
    assert meta["stages"][1]["aug_level"] == 0.2 and meta["job"] == summary["job"]
    # Progress by step reached the client while the job ran.
    assert job.status().code.name == "FINISHED"


def test_a_random_seed_is_shown_and_reproduces(server):
    _, client, _ = server
    _, updates = _generate(client, random_seed=True, images=1)
    _, _, files, info, seed, _ = updates[-1]
    assert f"**Seed** {seed}" in info
    _, again = _generate(client, seed=seed, images=1)
    with open(files[0], "rb") as f, open(again[-1][2][0], "rb") as g:
        assert f.read() == g.read()


BAD = [
    (dict(prompt="   "), "enter a prompt"),
    (dict(prompt="x" * 1001), "at most 1000"),
    (dict(size="16x14"), "not a multiple"),
    (dict(size="banana"), "expected HEIGHTxWIDTH"),
    (dict(steps=0), "less than minimum value 1"),  # the sliders' own bounds
    (dict(guidance=-1.0), "less than minimum value 0"),
    (dict(steps=251), "greater than maximum value 250"),
    (dict(sampler="flow_euler"), "flow_euler"),
    (dict(model="nope"), "nope"),
]


def test_bad_input_is_answered_and_the_server_goes_on(server):
    _, client, _ = server
    for over, message in BAD:
        with pytest.raises(Exception, match=message):
            client.predict(*_args(**over), api_name="/generate")
    out = client.predict(*_args(images=1), api_name="/generate")
    assert len(out[2]) == 1


def test_a_cut_prompt_is_shown(server):
    _, client, _ = server
    long = "a red circle and a blue square above a green star"  # 11 words, 8 tokens kept
    out = client.predict(*_args(prompt=long, images=1), api_name="/generate")
    assert "tokens lost" in out[3]


def test_cancel_frees_the_worker(server):
    model, client, _ = server
    job = client.submit(*_args(steps=200, images=2), api_name="/generate")
    deadline = time.time() + 120
    while not job.status().progress_data and time.time() < deadline:
        time.sleep(0.05)
    assert job.status().progress_data, "no progress reported while the job ran"
    job.cancel()
    out = client.predict(*_args(images=1), api_name="/generate")  # the worker is free
    assert len(out[2]) == 1
    assert not model.lock.locked()


def test_a_crowd_is_served_or_told_busy_and_never_mixed(server):
    """8 clients at once against a queue of 2: each is served its own images or told the
    queue is full; no request of a compiled setting compiles again."""
    model, client, port = server
    client.predict(*_args(images=1), api_name="/generate")  # the setting is compiled
    compiled = model.compilations

    def one(k):
        c = Client(f"http://127.0.0.1:{port}/", verbose=False)
        prompt = f"a red circle number {k}"
        try:
            out = c.predict(*_args(prompt=prompt, images=1, seed=k), api_name="/generate")
        except Exception as e:  # noqa: BLE001
            return k, None, str(e)
        return k, jobs.read_metadata(out[2][0]), None

    with concurrent.futures.ThreadPoolExecutor(8) as pool:
        results = list(pool.map(one, range(8)))
    served = [(k, meta) for k, meta, error in results if meta is not None]
    refused = [error for _, meta, error in results if meta is None]
    assert served, results
    for k, meta in served:
        assert meta["prompt"] == f"a red circle number {k}" and meta["seed"] == k
    for error in refused:
        assert "full" in error.lower() or "busy" in error.lower(), error
    assert len(served) + len(refused) == 8
    assert model.compilations == compiled


def test_the_trained_size_by_number_or_unset_is_one_setting(server, tmp_path):
    """The warm-up asks for no size, the page for the trained one by number: one cascade."""
    model, _, _ = server
    model.generate(demo_models.Request(prompt="a star", num_images=1), str(tmp_path / "a"))
    built = model.compilations
    request = demo_models.Request(prompt="a star", num_images=1, height=16, width=16)
    model.generate(request, str(tmp_path / "b"))
    assert model.compilations == built


def test_waiting_requests_of_one_setting_share_a_run(server, tmp_path):
    """Two requests that wait while the device is busy are sampled in one batch, each image
    from its own request's keys: the PNGs are those each request makes alone."""
    model, _, _ = server
    requests = [
        demo_models.Request(prompt="a red circle", seed=11, num_images=1, height=16, width=16),
        demo_models.Request(prompt="two blue stars", seed=12, num_images=1, height=16, width=16),
    ]
    model.generate(requests[0], str(tmp_path / "warm"))  # compiled before the lock is held
    shared = model.batched_requests
    out = {}
    with model.lock:  # the device is busy: both wait
        threads = [
            threading.Thread(
                target=lambda k, r: out.__setitem__(k, model.generate(r, str(tmp_path / f"w{k}"))),
                args=(k, r),
            )
            for k, r in enumerate(requests)
        ]
        for t in threads:
            t.start()
        deadline = time.time() + 30
        while sum(map(len, model._waiting.values())) < 2 and time.time() < deadline:
            time.sleep(0.01)
    for t in threads:
        t.join(120)
    assert model.batched_requests == shared + 1  # the second rode in the first's run
    for k, r in enumerate(requests):
        alone = model.generate(r, str(tmp_path / f"alone{k}"))
        with open(out[k]["files"][0], "rb") as f, open(alone["files"][0], "rb") as g:
            assert f.read() == g.read(), f"request {k}: a shared batch changed its image"
