"""The shipped default model: what the README's first command runs."""

import json
import os
import pathlib
import subprocess
import sys

import pytest

from imagen_jax import stages
from imagen_jax.pipelines import jobs, sampling, shipped

ROOT = pathlib.Path(__file__).resolve().parents[2]

MAX_SHIPPED_BYTES = 40 * 10**6  # every shipped checkpoint together (the budget)


def test_shipped_model_is_small_and_declares_its_domain():
    dirs = sampling.shipped_stages()
    total = sum(
        os.path.getsize(os.path.join(root, name))
        for root, _, names in os.walk(sampling.SHIPPED_MODEL)
        for name in names
    )
    assert total < MAX_SHIPPED_BYTES
    for d in dirs:
        with open(os.path.join(d, "stage.json")) as f:
            meta = json.load(f)
        assert meta["domain"] == "shapes"
        assert meta["text"]["kind"] == "minilm"
    assert [len(jobs.read_prompts(str(sampling.SHIPPED_MODEL / "prompts.txt")))] == [8]


def test_out_of_domain_prompts_are_named():
    loaded = [stages.load_stage(sampling.shipped_stages()[1])]
    note = sampling.domain_note(loaded, ["a red circle above a blue square", "a cat"])
    assert note.startswith("note: 1 of 2 prompts are outside the shapes domain (e.g. 'a cat')")
    assert sampling.domain_note(loaded, ["a red circle above a blue square"]) is None


@pytest.mark.filterwarnings("ignore::UserWarning")
def test_sample_with_no_stage_uses_the_shipped_cascade(tmp_path, capsys):
    summary = sampling.run_sampling_job(
        stages=[],
        prompts=["a photo of a cat", "a red star"],
        prompts_file=None,
        negative_prompt="",
        images_per_prompt=1,
        seed=0,
        batch_size=2,
        outdir=str(tmp_path),
        overrides=["0.steps=2", "1.steps=2"],
        grid=False,
    )
    assert summary["made"] == 2
    assert "outside the shapes domain" in capsys.readouterr().out
    manifest = [json.loads(line) for line in (tmp_path / "manifest.jsonl").read_text().splitlines()]
    assert [m["prompt"] for m in manifest] == ["a photo of a cat", "a red star"]
    assert [len(m["stages"]) for m in manifest] == [2, 2]
    assert manifest[0]["stages"][1]["resolution"] == 64
    # --model=cascade is the default job exactly: into the same folder, it resumes.
    again = sampling.run_sampling_job(
        stages=[],
        model="cascade",
        prompts=["a photo of a cat", "a red star"],
        prompts_file=None,
        negative_prompt="",
        images_per_prompt=1,
        seed=0,
        batch_size=2,
        outdir=str(tmp_path),
        overrides=["0.steps=2", "1.steps=2"],
        grid=False,
    )
    assert (again["state"], again["made"], again["job"]) == ("resume", 0, summary["job"])


def _job(**kw):
    args = dict(
        stages=[],
        prompts=["a red star"],
        prompts_file=None,
        negative_prompt="",
        images_per_prompt=1,
        seed=0,
        batch_size=1,
        outdir="unused",
        overrides=[],
        grid=False,
    )
    return sampling.run_sampling_job(**{**args, **kw})


def test_the_registry_names_its_models():
    assert shipped.stage_dirs("cascade") == sampling.shipped_stages() == shipped.stage_dirs()
    assert [os.path.basename(d) for d in shipped.stage_dirs()] == ["base", "sr"]
    with pytest.raises(ValueError, match="--model='bogus': the shipped models are cascade, latent"):
        _job(model="bogus")
    with pytest.raises(ValueError, match="--model=cascade samples a shipped model: give --model, "):
        _job(model="cascade", stages=[sampling.shipped_stages()[0]])
    with pytest.raises(ValueError, match="--model=cascade samples a shipped model"):
        _job(model="cascade", pipeline="models/sd")


def test_a_registered_model_not_shipped_yet_is_one_line(tmp_path, monkeypatch):
    monkeypatch.setitem(
        shipped.MODELS, "next", shipped.ShippedModel(("next",), "a later one", released=False)
    )
    with pytest.raises(FileNotFoundError) as error:
        _job(model="next", outdir=str(tmp_path / "out"))
    message = str(error.value)
    assert message.startswith("--model=next is not shipped yet: ")
    assert str(shipped.ROOT / "next") in message and "\n" not in message
    assert not (tmp_path / "out").exists()  # refused before anything is written
    # Weights of a run still in training there: refused all the same, pointing at --stage.
    folder = tmp_path / "models"
    (folder / "next").mkdir(parents=True)
    (folder / "next" / "stage.json").write_text("{}")
    monkeypatch.setattr(shipped, "ROOT", folder)
    with pytest.raises(FileNotFoundError, match="holds a run still in training") as error:
        _job(model="next", outdir=str(tmp_path / "out"))
    assert "--stage=DIR" in str(error.value) and "\n" not in str(error.value)
    assert not (tmp_path / "out").exists()


def test_an_unknown_model_is_one_line_from_sample_py(tmp_path):
    out = subprocess.run(
        [sys.executable, "sample.py", "--model=bogus", f"--outdir={tmp_path / 'out'}"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert out.returncode != 0
    assert "Traceback" not in out.stderr, out.stderr
    last = out.stderr.strip().splitlines()[-1]
    assert last.startswith("sample.py: ValueError: --model='bogus': the shipped models are ")
    assert not (tmp_path / "out").exists()


def test_the_latent_resume_point_loads_and_is_not_shipped(tmp_path):
    """checkpoints/shapes/latent holds the MMDiT still in training: its weights fit its
    stage.json and the VAE beside it, and --model=latent refuses it until it ships."""
    folder = shipped.ROOT / "latent"
    stage = stages.load_stage(str(folder))
    assert isinstance(stage, stages.LatentStage) and stage.family == "mmdit"
    assert stage.domain == "shapes" and stage.resolution == 64
    assert stage.network_config.in_channels == stage.vae.config.latent_channels
    assert not shipped.MODELS["latent"].released
    with pytest.raises(FileNotFoundError, match="holds a run still in training"):
        _job(model="latent", outdir=str(tmp_path / "out"))
    assert not (tmp_path / "out").exists()
