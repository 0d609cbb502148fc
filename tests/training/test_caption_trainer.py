"""The GIT captioner's training (configs/shapes_captioner.py:runlocal,tower=vit through
train_and_evaluate): the loss falls, a killed run resumes to the uninterrupted run's state bit
for bit, the periodic captions are logged, and the exported directory loads in our
`load_captioner` and in transformers' GitForCausalLM with the same greedy captions."""

import json

import numpy as np
import pytest
import torch
import transformers
from conftest import (
    Crash,
    assert_same_tree,
    checkpoint_steps,
    crash,
    logged_steps,
    patch_batches,
    stage_config,
)
from safetensors.numpy import load_file

from imagen_jax.images import ImageProcessor
from imagen_jax.models import git
from imagen_jax.pipelines import captioning
from imagen_jax.training import caption_step, train_and_evaluate
from imagen_jax.training.caption_trainer import EXPORT_DIR, TOKENIZER_FILES
from imagen_jax.training.input import SyntheticSource

STEPS = 6
MAX_LENGTH = 12  # runlocal's caption_loss.sample_max_length


def _config():
    return stage_config(
        "shapes_captioner",
        "runlocal,tower=vit",  # the ViT tower: transformers reads the export
        steps=STEPS,
        log_every=1,
        checkpoint_every=3,
        sample_every=STEPS,
        num_samples=2,
    )


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """An uninterrupted runlocal run: checkpoints at 3 and 6, captions at 6, the export."""
    workdir = tmp_path_factory.mktemp("captioner")
    state, metrics = train_and_evaluate(_config(), str(workdir))
    return workdir, state, metrics


def test_trains_and_logs_captions(reference):
    workdir, state, metrics = reference
    assert int(state.step) == STEPS and metrics["oov_tokens"] == 0
    lines = [json.loads(line) for line in (workdir / "metrics.jsonl").read_text().splitlines()]
    assert [line["step"] for line in lines] == list(range(1, STEPS + 1))
    losses = [line["loss"] for line in lines]
    assert losses[-1] < losses[0] - 0.5, losses  # from about log(vocab) at the start
    samples = [json.loads(line) for line in (workdir / "samples" / "captions.jsonl").open()]
    assert [s["step"] for s in samples] == [STEPS] and len(samples[0]["captions"]) == 2


def test_killed_run_resumes_to_the_same_state(reference, tmp_path, monkeypatch):
    with monkeypatch.context() as m:
        patch_batches(m, 5, crash)  # dies while fetching step 5's batch
        with pytest.raises(Crash):
            train_and_evaluate(_config(), str(tmp_path))
    assert checkpoint_steps(tmp_path) == [3]
    state, _ = train_and_evaluate(_config(), str(tmp_path))
    assert_same_tree(state, reference[1])  # params, EMA, optimizer state, step, key: bitwise
    assert logged_steps(tmp_path) == list(range(1, STEPS + 1))


def test_export_loads_in_ours_and_transformers_with_the_same_captions(reference):
    workdir, state, _ = reference
    export = workdir / EXPORT_DIR
    assert {p.name for p in export.iterdir()} >= {
        "config.json", "model.safetensors", "preprocessor_config.json",
        "generation_config.json", *TOKENIZER_FILES,
    }  # fmt: skip
    tensors = load_file(export / "model.safetensors")
    assert {t.dtype for t in tensors.values()} == {np.dtype(np.float16)}
    config = _config()
    vocab = caption_step.output_vocab(config)
    outside = np.setdiff1d(np.arange(len(tensors["output.bias"])), vocab)
    assert (tensors["output.bias"][outside] == caption_step.OUTSIDE_VOCAB_BIAS).all()
    ema = np.asarray(state.ema_params["output"]["kernel"])
    np.testing.assert_array_equal(tensors["output.weight"], ema.T.astype(np.float16))

    images = [SyntheticSource(size=8, resolution=16)[i]["image"] for i in range(4)]
    ours = captioning.load_captioner(export, max_length=MAX_LENGTH, batch_size=4)
    captions = ours(images)
    hf = transformers.GitForCausalLM.from_pretrained(export, dtype=torch.float32).eval()
    tok = transformers.BertTokenizerFast.from_pretrained(export)
    processor = ImageProcessor.from_dir(export)
    pixels = torch.from_numpy(np.stack([processor(im) for im in images])).permute(0, 3, 1, 2)
    with torch.no_grad():
        want = hf.generate(pixel_values=pixels, max_length=MAX_LENGTH, do_sample=False)
    assert captions == tok.batch_decode(want, skip_special_tokens=True)
    got = ours.generate(np.stack([processor(im) for im in images]))
    np.testing.assert_array_equal(got.crop(), want.numpy())
    assert git.read_git_config(export).vision.image_size == config.model.resolution


def test_conv_tower_with_the_cell_loss_trains_and_exports(tmp_path):
    """tower=conv: the shapes source's per-cell labels reach the tower's classifier (its
    loss falls), and the export (model_type imagen_jax_git_conv, the cell head included)
    loads strictly and captions as the trained EMA weights do."""
    config = stage_config(
        "shapes_captioner", "runlocal,tower=conv", steps=STEPS, log_every=1,
        checkpoint_every=STEPS, sample_every=0,
    )  # fmt: skip
    config.optim.lr = 1e-2
    assert config.data.cell_labels == 4 and config.caption_loss.cell_weight == 1.0
    state, _ = train_and_evaluate(config, str(tmp_path))
    lines = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    cell = [line["cell_loss"] for line in lines]
    assert cell[-1] < cell[0] and all(np.isfinite(line["caption_loss"]) for line in lines)
    export = tmp_path / EXPORT_DIR
    model = git.load_git(export)
    assert model.config.image_tower == "conv" and model.config.conv_cell_classes == 7
    assert json.loads((export / "config.json").read_text())["model_type"] == git.CONV_MODEL_TYPE
    head = np.asarray(state.ema_params["image_encoder"]["cell_head"]["kernel"])
    np.testing.assert_array_equal(
        np.asarray(model.image_encoder.cell_head.kernel[...]), head.astype(np.float16)
    )


def test_cell_loss_needs_a_cell_head_and_labels(tmp_path):
    config = stage_config("shapes_captioner", "runlocal,tower=conv")
    config.data.cell_labels = 0
    with pytest.raises(ValueError, match=r"data.cell_labels > 0"):
        train_and_evaluate(config, str(tmp_path))
    config = stage_config("shapes_captioner", "runlocal,tower=conv")
    config.data.cell_labels = 2
    with pytest.raises(ValueError, match=r"data.cell_labels=2: the tower has 4 x 4 cells"):
        train_and_evaluate(config, str(tmp_path))
