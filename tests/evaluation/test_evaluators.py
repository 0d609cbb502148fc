"""The evaluator protocol: the compositional evaluator reads the renderer's own scenes as
correct and blank images as wrong; the FID evaluator gives the folder evaluator's numbers
(which tests/evaluation/test_fid.py checks against pytorch-fid); a folder with its
manifest reads back as the samples it holds, and a folder that disagrees with its
manifest is refused."""

import json
import os
import pathlib
import subprocess
import sys

import ml_collections
import numpy as np
import pytest
from PIL import Image

from imagen_jax.evaluation import evaluators, fid, folder, inception
from imagen_jax.shapes import prompt_sets, render, tasks
from imagen_jax.shapes.spec import TASKS
from imagen_jax.training import config as config_lib


def shapes_samples(split="heldout", per_task=3, resolution=64, seed=0):
    """Renders of scenes that satisfy the split's first prompts, with their records."""
    rng = np.random.default_rng(seed)
    images, records = [], []
    for task in TASKS:
        for record in prompt_sets.load_prompts(split, task)[:per_task]:
            scene = tasks.scene_for(rng, record.spec, split)
            images.append(render.render(scene, resolution))
            records.append(json.loads(record.to_json()))
    return evaluators.Samples(images, records)


def test_compositional_reads_renders_as_correct_and_blanks_as_wrong():
    samples = shapes_samples()
    metrics = evaluators.Compositional()(samples)
    assert set(metrics) == {f"compositional/heldout/{t}" for t in (*TASKS, "overall")}
    assert metrics["compositional/heldout/overall"] >= 0.9
    blank = evaluators.Samples([np.full_like(im, 128) for im in samples.images], samples.records)
    assert evaluators.Compositional()(blank)["compositional/heldout/overall"] == 0.0


def test_compositional_parses_plain_prompts():
    samples = shapes_samples(per_task=1)
    plain = evaluators.Samples(samples.images, [{"prompt": r["prompt"]} for r in samples.records])
    metrics = evaluators.Compositional()(plain)
    assert "compositional/all/overall" in metrics  # no split given: one block, "all"


def test_fid_evaluator_equals_the_folder_evaluator(fid_reference, tmp_path):
    _, weights = fid_reference
    rng = np.random.default_rng(0)
    images = [rng.integers(0, 256, (32, 32, 3), dtype=np.uint8) for _ in range(6)]
    ref_images = [rng.integers(0, 256, (32, 32, 3), dtype=np.uint8) for _ in range(5)]
    for name, ims in (("samples", images), ("ref", ref_images)):
        (tmp_path / name).mkdir()
        for i, im in enumerate(ims):
            Image.fromarray(im).save(tmp_path / name / f"{i}.png")
    folder.evaluate_folder(
        tmp_path / "ref",
        inception_path=weights,
        save_stats=tmp_path / "ref.npz",
        save_features=tmp_path / "ref_features.npz",
        batch_size=8,  # each batch is padded to this size: keep it small on the CPU
    )
    expected = folder.evaluate_folder(
        tmp_path / "samples",
        inception_path=weights,
        ref_stats=tmp_path / "ref.npz",
        kid_ref_features=tmp_path / "ref_features.npz",
        batch_size=8,
    )
    evals = config_lib.evals_config(metrics=("fid",))
    evals.fid.inception = str(weights)
    evals.fid.reference = str(tmp_path / "ref.npz")
    evals.fid.kid_reference = str(tmp_path / "ref_features.npz")
    evals.fid.batch_size = 8
    (evaluator,) = evaluators.make_evaluators(evals)
    records = [{"prompt": "x"}] * len(images)
    metrics = evaluator(evaluators.Samples(images, records))
    assert metrics["fid"] == pytest.approx(expected["fid"], rel=1e-6)
    assert metrics["kid/mean"] == pytest.approx(expected["kid"]["mean"], rel=1e-6, abs=1e-12)
    assert evaluator.describe()["resize"] == "pytorch_fid"
    with pytest.raises(ValueError, match="at least 2 images"):
        evaluator(evaluators.Samples(images[:1], records[:1]))


def test_make_evaluators_names_what_is_missing():
    with pytest.raises(ValueError, match=r"unknown evals.metrics \['fidd'\]"):
        evaluators.make_evaluators(config_lib.evals_config(metrics=("fidd",)))
    with pytest.raises(ValueError, match="evals.fid.inception"):
        evaluators.make_evaluators(config_lib.evals_config(metrics=("fid",)))
    with pytest.raises(ValueError, match="evals.clip.path"):
        evaluators.make_evaluators(config_lib.evals_config(metrics=("clip_score",)))
    with pytest.raises(KeyError, match="unknown evals config keys"):
        config_lib.evals_config(metric=("fid",))
    with pytest.raises(FileNotFoundError):
        evals = config_lib.evals_config(metrics=("fid",))
        evals.fid = ml_collections.ConfigDict(
            dict(evals.fid, inception="/nonexistent/pt_inception.pth", reference="/nope.npz")
        )
        evaluators.make_evaluators(evals)


def _write_job(path, samples):
    (path / "images").mkdir(parents=True)
    lines = []
    for i, (image, record) in enumerate(zip(samples.images, samples.records, strict=True)):
        name = f"images/{i:06d}_000.png"
        Image.fromarray(image).save(path / name)
        lines.append(json.dumps({"file": name, **record}))
    (path / "manifest.jsonl").write_text("\n".join(lines) + "\n")
    Image.fromarray(samples.images[0]).save(path / "grid.png")  # a job's grid: not a sample


def test_samples_from_folder_round_trip_and_mismatches(tmp_path):
    samples = shapes_samples(per_task=1)
    _write_job(tmp_path / "job", samples)
    read = evaluators.samples_from_folder(tmp_path / "job")
    assert [r["prompt"] for r in read.records] == samples.prompts
    for a, b in zip(read.images, samples.images, strict=True):
        np.testing.assert_array_equal(a, b)
    assert evaluators.Compositional()(read) == evaluators.Compositional()(samples)

    Image.fromarray(samples.images[0]).save(tmp_path / "job" / "images" / "stray.png")
    with pytest.raises(ValueError, match=r"does not match the folder: 1 image.*stray.png"):
        evaluators.samples_from_folder(tmp_path / "job")
    (tmp_path / "job" / "images" / "stray.png").unlink()
    (tmp_path / "job" / "images" / "000002_000.png").unlink()
    with pytest.raises(FileNotFoundError, match=r"manifest.jsonl:3: image .*000002_000.png"):
        evaluators.samples_from_folder(tmp_path / "job")
    with pytest.raises(FileNotFoundError, match="no manifest.jsonl"):
        evaluators.samples_from_folder(tmp_path)
    with pytest.raises(ValueError, match="2 images but 1 prompt records"):
        evaluators.Samples(samples.images[:2], samples.records[:1])


def test_eval_main_over_a_folder(tmp_path):
    """eval/evaluate.py (a subprocess) reports the evaluators' metrics of a job's folder."""
    samples = shapes_samples(per_task=1)
    _write_job(tmp_path / "job", samples)
    root = pathlib.Path(__file__).resolve().parents[2]
    env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join([str(root), os.environ.get("PYTHONPATH", "")]),
    }
    out = subprocess.run(
        [
            sys.executable,
            str(root / "eval" / "evaluate.py"),
            f"--samples={tmp_path / 'job'}",
            "--metrics=compositional",
            f"--json={tmp_path / 'report.json'}",
        ],
        env=env,
        capture_output=True,
        text=True,
    )
    assert out.returncode == 0, out.stderr[-3000:]
    report = json.loads((tmp_path / "report.json").read_text())
    assert report["num_images"] == len(samples)
    assert report["metrics"] == evaluators.Compositional()(samples)
    bad = subprocess.run(
        [sys.executable, str(root / "eval" / "evaluate.py"), f"--samples={tmp_path}"],
        env=env,
        capture_output=True,
        text=True,
    )
    assert bad.returncode != 0 and "no manifest.jsonl" in bad.stderr


def test_mixed_sizes_are_resized_and_recorded(fid_reference, tmp_path):
    """Images of two sizes: each is resized by the convention (its features equal those of
    the image alone) and the report counts the sizes."""
    _, weights = fid_reference
    rng = np.random.default_rng(5)
    images = [rng.integers(0, 256, s, dtype=np.uint8) for s in ((40, 48, 3), (32, 32, 3)) * 2]
    (tmp_path / "mixed").mkdir()
    for i, im in enumerate(images):
        Image.fromarray(im).save(tmp_path / "mixed" / f"{i}.png")
    result = folder.evaluate_folder(
        tmp_path / "mixed", inception_path=weights, save_features=tmp_path / "f.npz", batch_size=8
    )
    assert result["image_sizes"] == {"32x32": 2, "40x48": 2}
    extractor = inception.FeatureExtractor(inception.load_inception(weights), batch_size=8)
    alone = np.concatenate([extractor([im]) for im in images])
    np.testing.assert_allclose(fid.load_features(tmp_path / "f.npz"), alone, rtol=1e-4, atol=1e-5)
