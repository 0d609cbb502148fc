"""sample.py's editing flags (`pipelines/editing.py` through `sampling.run_sampling_job`) on
the tiny stages (conftest.py: 8 px base, 8 -> 16 px super-resolution): inpainted PNGs keep
the image outside the mask exactly; the image, mask and settings are part of the job (a
rerun with another mask is another job, never the old images) and of every PNG's metadata;
bad input stops in one line naming the file or value."""

import json

import numpy as np
import pytest
from PIL import Image

from imagen_jax.files import file_sha256
from imagen_jax.pipelines import editing, jobs, sampling


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    root = tmp_path_factory.mktemp("edit")
    rng = np.random.default_rng(0)
    image = rng.integers(0, 256, (16, 16, 3), np.uint8)
    mask = np.zeros((16, 16), np.uint8)
    mask[4:12, 6:14] = 255
    Image.fromarray(image).save(root / "image.png")
    Image.fromarray(mask).save(root / "mask.png")
    Image.fromarray(np.roll(mask, 2, axis=0)).save(root / "mask2.png")
    Image.fromarray(np.zeros((16, 16), np.uint8)).save(root / "black.png")
    Image.fromarray(np.zeros((8, 16), np.uint8)).save(root / "small.png")
    Image.fromarray(np.zeros((16, 16, 4), np.uint8)).save(root / "rgba.png")
    Image.fromarray(image[..., 0]).save(root / "gray.png")
    return root, image, mask


def _job(stage_dirs, outdir, **kw):
    args = dict(
        stages=stage_dirs, prompts=["a red circle", "a blue star"], prompts_file=None,
        negative_prompt="", images_per_prompt=1, seed=1, batch_size=2, outdir=str(outdir),
        overrides=["0.steps=3", "1.steps=3"], grid=False,
    )  # fmt: skip
    return sampling.run_sampling_job(**{**args, **kw})


def test_inpainting_job_keeps_the_unmasked_region(stage_dirs, files, tmp_path, capsys):
    root, image, mask = files
    kw = dict(init_image=str(root / "image.png"), mask=str(root / "mask.png"))
    summary = _job(stage_dirs, tmp_path / "out", **kw)
    assert summary["made"] == 2
    lines = (tmp_path / "out" / "manifest.jsonl").read_text().splitlines()
    manifest = [json.loads(x) for x in lines]
    for record in manifest:
        png = np.asarray(Image.open(tmp_path / "out" / record["file"]))
        keep = mask == 0
        np.testing.assert_array_equal(png[keep], image[keep])
        assert np.abs(png.astype(int) - image)[~keep].mean() > 10
        edit = record["edit"]
        assert edit["mask"]["sha256"] == file_sha256(str(root / "mask.png"))
        assert (edit["strength"], edit["repaint_jump"]) == (1.0, 0)
    # Another mask is another job: the folder is refused, not reused.
    with pytest.raises(jobs.JobMismatchError):
        _job(stage_dirs, tmp_path / "out", **dict(kw, mask=str(root / "mask2.png")))
    # The same request resumes: nothing is made again.
    assert _job(stage_dirs, tmp_path / "out", **kw)["made"] == 0


def test_black_mask_is_noted_and_keeps_the_image(stage_dirs, files, tmp_path, capsys):
    root, image, _ = files
    _job(stage_dirs, tmp_path, init_image=str(root / "image.png"), mask=str(root / "black.png"))
    assert "every pixel is kept" in capsys.readouterr().out
    for name in sorted((tmp_path / "images").iterdir()):
        np.testing.assert_array_equal(np.asarray(Image.open(name)), image)


@pytest.mark.parametrize(
    ("kw", "message"),
    [
        (dict(mask="mask.png"), "--mask needs --init_image"),
        (dict(strength=0.5), "--strength=0.5 needs --init_image"),
        (dict(init_image="image.png", strength=1.5), r"--strength=1.5: expected a value in"),
        (dict(init_image="image.png", repaint_jump=2), "need --mask"),
        (dict(init_image="image.png", mask="small.png"), "small.png is 16x8, --init_image"),
        (dict(init_image="rgba.png"), "rgba.png has an alpha channel"),
        (dict(init_image="missing.png"), "missing.png: not a readable image"),
    ],
)  # fmt: skip
def test_bad_editing_input_is_named(files, kw, message):
    root, _, _ = files
    kw = {k: str(root / v) if k in ("init_image", "mask") else v for k, v in kw.items()}
    with pytest.raises(ValueError, match=message):
        editing.load_edit_request(**{"init_image": None, **kw})


def test_grayscale_image_is_noted(files):
    root, _, _ = files
    request = editing.load_edit_request(init_image=str(root / "gray.png"))
    assert request.image.shape == (16, 16, 3) and "grayscale" in request.notes[0]
    assert request.aspect_note((16, 32)).startswith("note: --init_image is 16x16, the output 32x16")


def test_prompt_files_carry_their_own_edits(stage_dirs, files, tmp_path):
    """A JSONL prompt's own "init_image" / "mask" (relative to the file) edit that prompt
    alone: beside a plain prompt in one batch, each image is what it is alone; the files'
    SHA-256 are in the job and the PNGs, so a changed file is another job."""
    root, image, mask = files
    lines = [
        {"prompt": "a red circle", "init_image": "image.png", "mask": "mask.png"},
        {"prompt": "a blue star"},
    ]
    prompts = root / "edits.jsonl"
    prompts.write_text("".join(json.dumps(x) + "\n" for x in lines))
    kw = dict(prompts=None, prompts_file=str(prompts))
    _job(stage_dirs, tmp_path / "both", **kw)
    edited = np.asarray(Image.open(tmp_path / "both/images/000000_000.png"))
    keep = mask == 0
    np.testing.assert_array_equal(edited[keep], image[keep])
    meta = jobs.read_metadata(str(tmp_path / "both/images/000000_000.png"))
    assert meta["init_image_sha256"] == file_sha256(str(root / "image.png"))
    # The plain prompt's image is the one a plain job makes (prompt index 1 there too).
    _job(stage_dirs, tmp_path / "plain", prompts=["a red circle", "a blue star"])
    plain = np.asarray(Image.open(tmp_path / "plain/images/000001_000.png"))
    np.testing.assert_array_equal(
        np.asarray(Image.open(tmp_path / "both/images/000001_000.png")), plain
    )
    # Another image under the same name is another job.
    Image.fromarray(255 - image).save(root / "image.png")
    try:
        with pytest.raises(jobs.JobMismatchError):
            _job(stage_dirs, tmp_path / "both", **kw)
    finally:
        Image.fromarray(image).save(root / "image.png")
    bad = root / "bad.jsonl"
    bad.write_text(json.dumps({"prompt": "a red circle", "mask": "mask.png"}) + "\n")
    with pytest.raises(ValueError, match=r"bad.jsonl: prompt 1 \('a red circle'\): --mask needs"):
        _job(stage_dirs, tmp_path / "bad", prompts=None, prompts_file=str(bad))
