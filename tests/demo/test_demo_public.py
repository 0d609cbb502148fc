"""Public pipelines in the web demo: tiny random SD, SDXL (+ refiner) and DeepFloyd IF (I +
II) directories saved by diffusers, served on 127.0.0.1 beside each other and driven with
gradio_client.
Their PNGs are byte for byte those of `sample.py --pipeline` for the same settings, their
progress arrives by step, and what they cannot do is answered on the page."""

import logging
import re
import socket

import numpy as np
import pytest
from gradio_client import Client
from tiny_diffusers import (
    euler,
    refiner_pipeline,
    sd_pipeline,
    sdxl_pipeline,
    stage_1_pipeline,
    stage_2_pipeline,
)

from imagen_jax.demo import app as demo_app
from imagen_jax.demo import loading as demo_loading
from imagen_jax.demo import models as demo_models
from imagen_jax.pipelines import sampling


@pytest.fixture(scope="module")
def dirs(tmp_path_factory):
    root = tmp_path_factory.mktemp("public")
    sd_pipeline(root / "sd", euler())
    base = sdxl_pipeline(root / "xl")
    refiner_pipeline(root / "xl-refiner", base)
    stage_1_pipeline(root / "I")
    stage_2_pipeline(root / "II")
    return {k: str(root / k) for k in ("sd", "xl", "xl-refiner", "I", "II")}


@pytest.fixture(scope="module")
def served(dirs, tmp_path_factory):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    paths = [dirs["sd"], f"{dirs['xl']},{dirs['xl-refiner']}", f"{dirs['I']},{dirs['II']}"]
    models = demo_loading.load_models(paths, batch_size=2, shipped=False)
    assert list(models) == ["sd", "xl+xl-refiner", "I+II"]
    workdir = str(tmp_path_factory.mktemp("demo"))
    app = demo_app.launch(models, port=port, max_queue=4, workdir=workdir, warm=False, block=False)
    yield models, Client(f"http://127.0.0.1:{port}/", verbose=False)
    app.close()


def _args(model, *, size="16x16 (trained)", steps=3, guidance=4.0, sr=(2, 5.0, 0.0), **kw):
    """The page's inputs: model, prompt, negative, seed, random seed, images, size, sampler,
    steps, guidance, then (steps, guidance, augmentation) of two later stages."""
    a = {**dict(prompt="a red circle", negative="", seed=3, images=2, sampler="euler"), **kw}
    head = [model, a["prompt"], a["negative"], a["seed"], False, a["images"], size]
    return [*head, a["sampler"], steps, guidance, *sr, *sr]


def _sample_py(outdir, dirs, overrides, **kw):
    return sampling.run_sampling_job(
        stages=[],
        prompts=["a red circle"],
        prompts_file=None,
        negative_prompt="",
        images_per_prompt=2,
        seed=3,
        batch_size=2,
        outdir=str(outdir),
        overrides=overrides,
        grid=False,
        height=16,
        width=16,
        **kw,
    )


@pytest.mark.parametrize(
    "name,sampler,flags",
    [
        ("sd", "euler", lambda d: dict(pipeline=d["sd"])),
        ("xl+xl-refiner", "euler", lambda d: dict(pipeline=d["xl"], refiner=d["xl-refiner"])),
        ("I+II", "ddpm", lambda d: dict(pipeline=d["I"], pipeline_sr=d["II"])),
    ],
)
def test_public_pipeline_is_byte_for_byte_sample_py(served, dirs, tmp_path, name, sampler, flags):
    """The page's images equal those of the sample.py command it shows."""
    models, client = served
    job = client.submit(*_args(name, sampler=sampler), api_name="/generate")
    updates = list(job)
    _, _, files, info, seed, _ = updates[-1]
    assert seed == 3 and len(files) == 2
    command = info.split("`")[3]
    assert all(f"--{k}={v}" in command for k, v in flags(dirs).items())
    overrides = re.findall(r"--set=(\S+)", command)
    assert "0.steps=3" in overrides and "0.guidance_scale=4.0" in overrides
    summary = _sample_py(tmp_path, dirs, overrides, **flags(dirs))
    assert summary["made"] == 2
    for k, path in enumerate(files):
        with open(path, "rb") as f, open(tmp_path / f"images/000000_00{k}.png", "rb") as g:
            assert f.read() == g.read(), f"{name}: image {k} differs from sample.py's"
    assert len(models[name].defaults()) == (1 if name == "sd" else 2)


def test_progress_arrives_by_step(served, tmp_path):
    models, _ = served
    seen = []
    progress = demo_models.Progress(on_step=lambda k, i, n: seen.append((k, i, n)))
    request = demo_models.Request(
        prompt="a star", num_images=1, height=16, width=16, overrides=("0.steps=3", "1.steps=4")
    )
    models["xl+xl-refiner"].generate(request, str(tmp_path), progress)
    # The base runs the steps before the refiner's handoff at 0.8, the refiner the rest.
    base = [(i, n) for k, i, n in seen if k == 0]
    refiner = [(i, n) for k, i, n in seen if k == 1]
    assert base and refiner
    assert [i for i, _ in base] == list(range(1, len(base) + 1)) and {n for _, n in base} == {
        len(base)
    }
    assert [i for i, _ in refiner] == list(range(1, len(refiner) + 1))


BAD = [
    (dict(size="16x14"), "multiples of 4"),
    (dict(size="64x64"), "from 8 to 32"),
    (dict(sampler="flow_euler"), "flow_euler"),
    (dict(steps=300), "greater than maximum value 250"),
]


def test_bad_input_is_answered_and_the_server_goes_on(served):
    _, client = served
    for over, message in BAD:
        with pytest.raises(Exception, match=message):
            client.predict(*_args("sd", **over), api_name="/generate")
    out = client.predict(*_args("sd", images=1), api_name="/generate")
    assert len(out[2]) == 1


def test_a_refiner_without_an_sdxl_base_is_left_out(dirs, caplog):
    with caplog.at_level(logging.ERROR):
        models = demo_loading.load_models([f"{dirs['sd']},{dirs['xl-refiner']}"], shipped=False)
    assert models == {}
    assert "a refiner follows an SDXL base" in caplog.text


@pytest.mark.parametrize(
    "name,flags",
    [
        ("sd", lambda d: dict(pipeline=d["sd"])),
        ("I+II", lambda d: dict(pipeline=d["I"], pipeline_sr=d["II"])),
    ],
)
def test_the_editing_tab_is_sample_py_for_public_pipelines(served, dirs, tmp_path, name, flags):
    """An inpainting request on the editing tab equals `sample.py --pipeline ... --init_image
    --mask` on the files the page wrote; an SDXL base with its refiner refuses an edit."""
    from gradio_client import handle_file
    from PIL import Image

    from imagen_jax.pipelines import jobs

    _, client = served
    rng = np.random.default_rng(0)
    Image.fromarray(rng.integers(0, 256, (16, 16, 3), np.uint8)).save(tmp_path / "image.png")
    layer = np.zeros((16, 16, 4), np.uint8)
    layer[4:12, 6:14] = 255
    Image.fromarray(layer).save(tmp_path / "layer.png")
    value = {
        "background": handle_file(str(tmp_path / "image.png")),
        "layers": [handle_file(str(tmp_path / "layer.png"))],
        "composite": None,
    }
    args = [value, "a red circle", "", 3, False, 2, 1.0, 0, 1]
    _, files, _, _ = client.predict(name, *args, api_name="/edit")
    edit = jobs.read_metadata(files[0])["edit"]
    paths = dict(init_image=edit["init_image"]["path"], mask=edit["mask"]["path"])
    sampling.run_sampling_job(
        stages=[], prompts=["a red circle"], prompts_file=None, negative_prompt="",
        images_per_prompt=2, seed=3, batch_size=2, outdir=str(tmp_path / "cli"), overrides=[],
        grid=False, **flags(dirs), **paths,
    )  # fmt: skip
    for k, path in enumerate(files):
        with open(path, "rb") as f, open(tmp_path / f"cli/images/000000_00{k}.png", "rb") as g:
            assert f.read() == g.read(), f"{name}: image {k} differs from sample.py's"
    with pytest.raises(Exception, match="edit with the SDXL base alone"):
        client.predict("xl+xl-refiner", *args, api_name="/edit")
