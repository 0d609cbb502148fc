"""The embedding index and retrieve.py, on a tiny random frozen-text model: build and query
(text, image), a killed build resumes to the uninterrupted index, another model or folder is
refused by name, mixed sizes are resized and counted, unreadable files skipped, and bad input
(an empty query, a directory that is no embedding model, no index) stops in one line."""

import json
import pathlib
import subprocess
import sys

import numpy as np
import pytest
from flax import nnx
from PIL import Image

from imagen_jax.images import clip_preprocessor_config
from imagen_jax.models import frozen_text_towers as ftt
from imagen_jax.pipelines import embedding, embedding_index
from imagen_jax.shapes import render, tasks

ROOT = pathlib.Path(__file__).resolve().parents[2]
TEXT = {"kind": "hash", "dim": 32, "max_length": 16}


def save_model(path, seed=0):
    config = ftt.make_config("runlocal", text_dim=32)
    model = ftt.FrozenTextTowers(config, rngs=nnx.Rngs(seed))
    params = nnx.to_pure_dict(nnx.state(model, nnx.Param))
    processor = clip_preprocessor_config(16, (0.5,) * 3, (0.5,) * 3)
    return ftt.save_frozen_text_towers(path, config, params, text=TEXT, processor=processor)


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("index")
    model = save_model(root / "model")
    images = root / "images"
    images.mkdir()
    rng = np.random.default_rng(0)
    for i in range(9):
        scene, _ = tasks.sample_scene(rng)
        Image.fromarray(render.render(scene, 16)).save(images / f"{i:02d}.png")
    Image.fromarray(np.full((24, 40, 3), 200, np.uint8)).save(images / "wide.png")
    (images / "notes.txt").write_text("not an image")
    return root, str(model), str(images)


def test_build_and_query(setup, tmp_path):
    _, model, images = setup
    summary = embedding_index.build_index(model=model, images=images, index=str(tmp_path))
    assert summary == dict(embedded=10, already=0, unreadable=1, resized=1, total=10, dim=32)
    hits = embedding_index.query_index(str(tmp_path), image=f"{images}/03.png", k=3)
    assert hits[0][0] == "03.png" and hits[0][1] == pytest.approx(1.0, abs=1e-5)
    hits = embedding_index.query_index(str(tmp_path), text="a red circle", k=4)
    scores = [s for _, s in hits]
    assert len(hits) == 4 and scores == sorted(scores, reverse=True)
    want = embedding.load_embedder(model).embed_texts(["a red circle"])[0]
    rows, embeds = embedding_index.read_rows(str(tmp_path))
    best = int(np.argmax(embeds @ want))
    assert hits[0][0] == rows[best]["file"]
    again = embedding_index.build_index(model=model, images=images, index=str(tmp_path))
    assert again["embedded"] == 0 and again["already"] == 10  # a rerun embeds nothing


def test_killed_build_resumes_to_the_same_index(setup, tmp_path, monkeypatch):
    _, model, images = setup
    whole, part = tmp_path / "whole", tmp_path / "part"
    embedding_index.build_index(model=model, images=images, index=str(whole), chunk=4)
    original = embedding_index._embed_part
    calls = []

    def dies_second(*args):
        calls.append(1)
        if len(calls) == 2:
            raise KeyboardInterrupt
        return original(*args)

    with monkeypatch.context() as m:
        m.setattr(embedding_index, "_embed_part", dies_second)
        with pytest.raises(KeyboardInterrupt):
            embedding_index.build_index(model=model, images=images, index=str(part), chunk=4)
    rows, _ = embedding_index.read_rows(str(part))
    assert len(rows) == 4  # the first part survived
    summary = embedding_index.build_index(model=model, images=images, index=str(part), chunk=4)
    assert summary["already"] == 4 and summary["embedded"] == 6
    for a, b in zip(
        embedding_index.read_rows(str(whole)), embedding_index.read_rows(str(part)), strict=True
    ):
        assert a == b if isinstance(a, list) else np.array_equal(a, b)


def test_another_model_or_folder_is_refused_by_name(setup, tmp_path):
    root, model, images = setup
    embedding_index.build_index(model=model, images=images, index=str(tmp_path))
    other = save_model(root / "other_model", seed=1)
    with pytest.raises(
        ValueError, match="built with the model .*model'; .*other_model' is another"
    ):
        embedding_index.build_index(model=other, images=images, index=str(tmp_path))
    with pytest.raises(ValueError, match="is another model"):
        embedding_index.query_index(str(tmp_path), text="a star", model=other)
    with pytest.raises(ValueError, match="holds the images of"):
        embedding_index.build_index(model=model, images=str(root / "model"), index=str(tmp_path))


def test_bad_input_is_named(setup, tmp_path):
    root, model, images = setup
    embedding_index.build_index(model=model, images=images, index=str(tmp_path))
    with pytest.raises(ValueError, match="the query text is empty"):
        embedding_index.query_index(str(tmp_path), text="  ")
    with pytest.raises(ValueError, match="give a query"):
        embedding_index.query_index(str(tmp_path))
    git = root / "git"
    git.mkdir()
    (git / "config.json").write_text(json.dumps({"model_type": "git"}))
    with pytest.raises(ValueError, match="holds a 'git' model, not an image-text embedding"):
        embedding_index.build_index(model=str(git), images=images, index=str(tmp_path / "x"))
    with pytest.raises(FileNotFoundError, match="holds no index"):
        embedding_index.query_index(str(tmp_path / "none"), text="a star")


def test_retrieve_py(setup, tmp_path):
    _, model, images = setup

    def run(*args):
        cmd = [sys.executable, "retrieve.py", f"--index={tmp_path}", *args]
        return subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=300)

    out = run(f"--model={model}", f"--images={images}", "--text=a blue star", "--k=2")
    assert out.returncode == 0, out.stderr
    lines = out.stdout.strip().splitlines()
    assert lines[0].startswith(f"index {tmp_path}: embedded 10") and len(lines) == 3
    score, path = lines[1].split("\t")
    assert float(score) <= 1.0 and path.startswith(images)
    out = run("--text=")
    assert out.returncode != 0
    assert out.stderr.strip().splitlines()[-1] == "retrieve.py: ValueError: the query text is empty"


def test_in_domain_clip_score_of_a_samples_folder(setup, tmp_path):
    """eval/clip_score.py's folder evaluation and the clip_score evaluator take an
    embedding model directory: 100 * the mean cosine of each image with its own prompt."""
    from imagen_jax.evaluation import clip_score, evaluators

    _, model, images = setup
    names = ["00.png", "01.png", "wide.png"]
    prompts = ["a red circle", "two blue stars", "a green square"]
    folder = tmp_path / "samples"
    (folder / "images").mkdir(parents=True)
    for name in names:
        (folder / "images" / name).write_bytes((pathlib.Path(images) / name).read_bytes())
    rows = [{"file": f"images/{n}", "prompt": p} for n, p in zip(names, prompts, strict=True)]
    (folder / "manifest.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))

    embedder = embedding.load_embedder(model)
    pixels = [np.asarray(Image.open(pathlib.Path(images) / n).convert("RGB")) for n in names]
    cos = (embedder.embed_images(pixels) * embedder.embed_texts(prompts)).sum(-1)
    want = max(100.0 * float(np.mean(cos.astype(np.float64))), 0.0)
    result = clip_score.evaluate_folder(folder, clip_path=model)
    assert result["n"] == 3 and result["backbone"] == "model"
    assert result["score"] == pytest.approx(want, abs=1e-3)
    pair = clip_score.evaluate_folder(folder, clip_path=model, clamp="pair")
    assert pair["score"] == pytest.approx(float(np.mean(np.maximum(100 * cos, 0))), abs=1e-3)
    scorer = evaluators.CLIPScore(model)
    got = scorer(evaluators.Samples(pixels, [{"prompt": p} for p in prompts]))
    assert got["clip_score"] == pytest.approx(want, abs=1e-3)
