"""DeepFloyd IF stage I -> stage II through our cascade, against diffusers' IFPipeline and
IFSuperResolutionPipeline on tiny random components of the real classes.

The pipelines (a tiny T5EncoderModel and T5 tokenizer, tiny IF-like UNets, IF's DDPM
scheduler settings) are saved with `save_pretrained` and loaded by `load_if_cascade`. DDPM
draws noise at every step: diffusers' `randn_tensor` is patched to hand out the noise that
our cascade draws from each row's key (the initial noise, stage II's augmentation noise, the
step noise), so both sides sample from the same randomness. Stage I's and stage II's images
must agree within 1e-3 (float32, values in [0, 1]), and are checked to vary.
"""

import json
import shutil

import jax
import numpy as np
import pytest
import torch
from tiny_diffusers import (
    stage_1_pipeline,
    stage_2_pipeline,
    tiny_t5,
)

from imagen_jax.diffusion import samplers
from imagen_jax.diffusion.adapter import resize_bilinear_aligned
from imagen_jax.pipelines import cascade as cascade_lib
from imagen_jax.pipelines import jobs, sampling
from imagen_jax.pipelines.deepfloyd import load_if_cascade
from imagen_jax.weights import CheckpointError

TOL = 1e-3
STEPS = 3
SEED = 7
# Upper case and padding spaces: diffusers lower-cases and strips them (clean_caption=False).
ITEMS = [
    jobs.WorkItem(0, 0, jobs.PromptEntry("A red circle above a blue square ", "blurry")),
    jobs.WorkItem(1, 0, jobs.PromptEntry("two green stars")),
    jobs.WorkItem(1, 1, jobs.PromptEntry("two green stars")),
]


@pytest.fixture(scope="module")
def pipelines(tmp_path_factory):
    """(stage I pipeline, its dir, stage II pipeline without a text encoder, its dir)."""
    dir_1, dir_2 = tmp_path_factory.mktemp("if_1"), tmp_path_factory.mktemp("if_2")
    return stage_1_pipeline(dir_1), dir_1, stage_2_pipeline(dir_2), dir_2


@pytest.fixture(scope="module")
def ours(pipelines):
    _, dir_1, _, dir_2 = pipelines
    return load_if_cascade(dir_1, dir_2, overrides=[dict(steps=STEPS), dict(steps=STEPS)])


def to_torch(x):
    return torch.from_numpy(np.ascontiguousarray(np.transpose(np.asarray(x), (0, 3, 1, 2))))


def row_normal(keys, tag, shape):
    keys = cascade_lib.row_noise_keys(keys, tag)
    return jax.vmap(lambda k: jax.random.normal(k, shape))(keys)


class StepNoise:
    """diffusers' DDPM step noise: call i (a step with t > 0) gets our step i's noise."""

    def __init__(self, keys, shape):
        self.keys, self.shape, self.calls = keys, shape, 0

    def __call__(self, shape, **kwargs):
        assert tuple(shape) == (self.shape[0], self.shape[3], *self.shape[1:3]), shape
        noise = samplers.step_noise(self.keys, self.calls, self.shape)
        self.calls += 1
        return to_torch(noise)


def feed_noise(monkeypatch, items, stage, size, *, augmentation=False, module=None):
    """Patches diffusers to draw stage `stage`'s noise of our cascade (in the pipeline
    `module`, default IFPipeline's or IFSuperResolutionPipeline's); returns the step feed."""
    keys = jax.numpy.stack([jobs.image_key(SEED, it, stage) for it in items])
    shape = (len(items), *size, 3)
    queue = [to_torch(row_normal(keys, "initial", shape[1:]))]
    if augmentation:  # drawn after the initial noise, of the upscaled image's shape
        queue.append(to_torch(row_normal(keys, "augmentation", shape[1:])))
    module = module or ("pipeline_if_superresolution" if augmentation else "pipeline_if")
    monkeypatch.setattr(
        f"diffusers.pipelines.deepfloyd_if.{module}.randn_tensor",
        lambda shape, **kwargs: queue.pop(0),
    )
    steps = StepNoise(cascade_lib.row_noise_keys(keys, "steps"), shape)
    monkeypatch.setattr("diffusers.schedulers.scheduling_ddpm.randn_tensor", steps)
    return steps


def reference(pipelines, items, monkeypatch, stage_2=None):
    """diffusers' stage I images (NCHW torch, unclamped) and stage II images ([0, 1] NHWC)."""
    stage_1, _, default_2, _ = pipelines
    stage_2 = stage_2 or default_2
    prompts = [it.entry.prompt for it in items]
    negatives = [it.entry.negative_prompt for it in items]
    common = dict(num_inference_steps=STEPS, clean_caption=False, output_type="pt")
    steps = feed_noise(monkeypatch, items, 0, (8, 8))
    low = stage_1(prompt=prompts, negative_prompt=negatives, guidance_scale=7.0, **common).images
    assert steps.calls == STEPS - 1  # no noise on the last step (t = 0)
    steps = feed_noise(monkeypatch, items, 1, (16, 16), augmentation=True)
    if stage_2.text_encoder is None:  # IF-II as published: stage I's embeddings
        embeds, negative_embeds = stage_1.encode_prompt(
            prompts, negative_prompt=negatives, clean_caption=False
        )
        text = dict(prompt_embeds=embeds, negative_prompt_embeds=negative_embeds)
    else:
        text = dict(prompt=prompts, negative_prompt=negatives)
    common["output_type"] = "np"
    high = stage_2(image=low, guidance_scale=4.0, noise_level=250, **text, **common).images
    return low, high


def assert_images_close(ours, ref):
    assert ours.shape == ref.shape, (ours.shape, ref.shape)
    assert ref.std() > 0.05  # not blank
    err = np.abs(ours - ref).max()
    assert err < TOL, f"max |ours - diffusers| = {err:.2e}"
    return err


def test_if_cascade_matches_diffusers(pipelines, ours, monkeypatch):
    cascade, stages = ours
    assert [s.stage for s in stages] == ["I", "II"] and stages[1].encoder is None
    assert stages[0].sample.sampler == "ddpm" and stages[0].diffusion.variance == "learned_range"
    assert stages[0].sample.dynamic_threshold == 0.95 and stages[1].sample.threshold_max == 1.0
    assert cascade.sizes == [(8, 8), (16, 16)]
    items = ITEMS[:2]
    low, high = cascade.sample(items, SEED)
    ref_low, ref_high = reference(pipelines, items, monkeypatch)
    assert float(ref_low.abs().max()) <= 1.0  # so our clipping between stages changes nothing
    ref_low = (ref_low.permute(0, 2, 3, 1).numpy() / 2 + 0.5).clip(0, 1)
    assert_images_close(low / 2 + 0.5, ref_low)
    assert_images_close(high / 2 + 0.5, ref_high)
    # An image does not depend on its batch: item 0 beside another partner.
    _, high_again = cascade.sample([ITEMS[0], ITEMS[2]], SEED)
    np.testing.assert_array_equal(high_again[0], high[0])
    assert np.abs(high_again[1] - high[1]).max() > 0.05  # another image of the prompt


@pytest.fixture(scope="module")
def stage_1_in_five_steps(pipelines):
    return load_if_cascade(pipelines[1], overrides=[dict(steps=5)])[0]


@pytest.mark.parametrize("masked", [True, False])
def test_if_stage_1_editing_matches_diffusers(
    pipelines, stage_1_in_five_steps, monkeypatch, masked
):
    """Stage I inpainting (image-to-image without a mask) at strength 0.6 against
    IFInpaintingPipeline (IFImg2ImgPipeline) on the same weights: the start from the image
    noised to the first kept step with our initial noise, then the last three of five steps;
    with a mask, our masked sampling keeping the known region clean, as diffusers keeps it
    (the image itself there from the start and after every step)."""
    import diffusers

    stage_1 = pipelines[0]
    kind = "Inpainting" if masked else "Img2Img"
    reference_pipe = getattr(diffusers, f"IF{kind}Pipeline")(**stage_1.components)
    items = ITEMS[:2]
    rng = np.random.default_rng(0)
    image = rng.uniform(-1, 1, (2, 8, 8, 3)).astype(np.float32)
    mask = np.zeros((2, 8, 8), np.float32)
    mask[0, 2:6, 1:5], mask[1, 4:8, 3:8] = 1.0, 1.0
    edit = cascade_lib.Edit(image, mask if masked else None, strength=0.6, known_region="clean")
    (low,) = stage_1_in_five_steps.sample(items, SEED, edit=edit)
    if masked:
        np.testing.assert_array_equal(low[mask == 0], image[mask == 0])
    module = f"pipeline_if_{kind.lower()}"
    steps = feed_noise(monkeypatch, items, 0, (8, 8), module=module)
    extra = dict(mask_image=torch.from_numpy(mask[:, None])) if masked else {}
    ref = reference_pipe(
        prompt=[it.entry.prompt for it in items],
        negative_prompt=[it.entry.negative_prompt for it in items],
        image=to_torch(image),
        strength=0.6,
        num_inference_steps=5,
        guidance_scale=7.0,
        clean_caption=False,
        output_type="pt",
        **extra,
    ).images
    assert steps.calls == 2  # three steps kept of five, none drawn at t = 0
    ref = (ref.permute(0, 2, 3, 1).numpy() / 2 + 0.5).clip(0, 1)
    assert_images_close(low / 2 + 0.5, ref)


@pytest.mark.parametrize("masked", [True, False])
def test_if_stage_2_editing_matches_diffusers(pipelines, ours, monkeypatch, masked):
    """Stage II inpainting (image-to-image without a mask) against
    IFInpaintingSuperResolutionPipeline (IFImg2ImgSuperResolutionPipeline) on our stage I's
    images: the stage starts from the 16 px image at strength 0.8 with the known region kept
    clean, as `sample.py --pipeline` edits IF (`deepfloyd.SR_EDIT_STRENGTH`)."""
    import diffusers

    stage_1, _, stage_2, _ = pipelines
    cascade, _ = ours
    items = ITEMS[:2]
    rng = np.random.default_rng(2)
    image = rng.uniform(-1, 1, (2, 16, 16, 3)).astype(np.float32)
    mask = np.zeros((2, 16, 16), np.float32)
    mask[0, 4:12, 2:10], mask[1, 8:16, 6:16] = 1.0, 1.0
    edit = cascade_lib.Edit(image, mask if masked else None, known_region="clean", sr_strength=0.8)
    low, high = cascade.sample(items, SEED, edit=edit)
    kind = "Inpainting" if masked else "Img2Img"
    reference_pipe = getattr(diffusers, f"IF{kind}SuperResolutionPipeline")(**stage_2.components)
    embeds, negative_embeds = stage_1.encode_prompt(
        [it.entry.prompt for it in items],
        negative_prompt=[it.entry.negative_prompt for it in items],
        clean_caption=False,
    )
    module = f"pipeline_if_{kind.lower()}_superresolution"
    feed_noise(monkeypatch, items, 1, (16, 16), augmentation=True, module=module)
    extra = dict(mask_image=torch.from_numpy(mask[:, None])) if masked else {}
    ref = reference_pipe(
        image=to_torch(low),
        original_image=to_torch(image),
        prompt_embeds=embeds,
        negative_prompt_embeds=negative_embeds,
        strength=0.8,
        noise_level=250,
        num_inference_steps=STEPS,
        guidance_scale=4.0,
        output_type="np",
        **extra,
    ).images
    assert_images_close(high / 2 + 0.5, ref)


def test_stage_2_with_its_own_text_encoder(pipelines, ours, tmp_path, monkeypatch):
    stage_1, dir_1, _, _ = pipelines
    tokenizer = stage_1.tokenizer
    own = stage_2_pipeline(
        tmp_path, text_encoder=tiny_t5(5, len(tokenizer)), tokenizer=tokenizer, seed=3
    )
    cascade, stages = load_if_cascade(
        dir_1, tmp_path, overrides=[dict(steps=STEPS), dict(steps=STEPS)]
    )
    assert stages[1].encoder is not None
    # Stage I is the same as in `ours`: reuse its compiled program (a compile takes seconds).
    cascade.stages[0] = ours[0].stages[0]
    _, high = cascade.sample(ITEMS[:2], SEED)
    _, ref_high = reference(pipelines, ITEMS[:2], monkeypatch, stage_2=own)
    assert_images_close(high / 2 + 0.5, ref_high)


def test_upscaling_matches_torch_align_corners():
    x = np.random.default_rng(0).normal(size=(2, 5, 7, 3)).astype(np.float32)
    for size in [(16, 16), (9, 20), (5, 7), (1, 3)]:
        want = torch.nn.functional.interpolate(
            to_torch(x), size, mode="bilinear", align_corners=True
        )
        got = resize_bilinear_aligned(jax.numpy.asarray(x), size)
        np.testing.assert_allclose(np.asarray(got), want.permute(0, 2, 3, 1).numpy(), atol=1e-5)


def _copy(src, dst):
    """A copy of a pipeline directory without its weight files, so that a check that fires
    proves it did so before reading any weights."""
    shutil.copytree(src, dst)
    for file in dst.rglob("*.safetensors"):
        file.unlink()
    return dst


def _edit(file, **changes):
    file.write_text(json.dumps({**json.loads(file.read_text()), **changes}))


def test_bad_directories(pipelines, tmp_path):
    _, dir_1, _, dir_2 = pipelines
    with pytest.raises(CheckpointError, match=r"is DeepFloyd IF stage II .* given as stage I"):
        load_if_cascade(_copy(dir_2, tmp_path / "ii"))
    with pytest.raises(CheckpointError, match=r"is DeepFloyd IF stage I .* given as stage II"):
        load_if_cascade(_copy(dir_1, tmp_path / "i"), tmp_path / "i")
    no_tokenizer = _copy(dir_1, tmp_path / "no_tokenizer")
    shutil.rmtree(no_tokenizer / "tokenizer")
    with pytest.raises(CheckpointError, match="component 'tokenizer' is missing"):
        load_if_cascade(no_tokenizer)
    (no_tokenizer / "tokenizer").mkdir()
    (no_tokenizer / "tokenizer" / "tokenizer_config.json").write_text(
        '{"tokenizer_class": "T5Tokenizer"}'
    )
    with pytest.raises(CheckpointError, match="has no tokenizer.json"):
        load_if_cascade(no_tokenizer)
    no_noising = _copy(dir_2, tmp_path / "no_noising")
    _edit(no_noising / "model_index.json", image_noising_scheduler=[None, None])
    with pytest.raises(CheckpointError, match="lists no 'image_noising_scheduler'"):
        load_if_cascade(tmp_path / "i", no_noising)
    # A UNet whose text projection does not take the T5's width: its own, or stage I's.
    wide = _copy(dir_1, tmp_path / "wide")
    _edit(wide / "unet" / "config.json", encoder_hid_dim=48)
    with pytest.raises(CheckpointError, match=r"encoder_hid_dim=48 does not fit .*d_model=32"):
        load_if_cascade(wide)
    wide_2 = _copy(dir_2, tmp_path / "wide_2")
    _edit(wide_2 / "unet" / "config.json", encoder_hid_dim=48)
    with pytest.raises(CheckpointError, match=r"encoder_hid_dim=48 does not fit .*stage I's"):
        load_if_cascade(tmp_path / "i", wide_2)
    # The UNets swapped between the stages.
    swapped_1 = _copy(dir_1, tmp_path / "swapped_1")
    shutil.rmtree(swapped_1 / "unet")
    shutil.copytree(tmp_path / "ii" / "unet", swapped_1 / "unet")
    with pytest.raises(CheckpointError, match="an IF stage II UNet in a stage I pipeline"):
        load_if_cascade(swapped_1)
    swapped_2 = _copy(dir_2, tmp_path / "swapped_2")
    shutil.rmtree(swapped_2 / "unet")
    shutil.copytree(tmp_path / "i" / "unet", swapped_2 / "unet")
    with pytest.raises(CheckpointError, match="an IF stage I UNet in a super-resolution"):
        load_if_cascade(tmp_path / "i", swapped_2)
    # Checked, then loaded: missing weights are the loader's error.
    with pytest.raises(CheckpointError, match="safetensors"):
        load_if_cascade(tmp_path / "i")


def test_sample_py_runs_the_if_cascade(pipelines, ours, tmp_path, monkeypatch):
    """sample.py's IF branch: the flags reach `load_if_cascade`, and the job writes each
    image with its stages' settings (the cascade of `ours` stands in, already compiled)."""
    _, dir_1, _, dir_2 = pipelines
    calls = []

    def load(*args, **kwargs):
        calls.append((args, kwargs))
        return ours

    monkeypatch.setattr("imagen_jax.pipelines.deepfloyd.load_if_cascade", load)
    flags = dict(
        stages=[],
        prompts=["two green stars", "a red circle"],
        prompts_file=None,
        negative_prompt="",
        images_per_prompt=1,
        seed=SEED,
        batch_size=2,
        outdir=str(tmp_path / "out"),
        overrides=["0.steps=3", "1.guidance_scale=5"],
        grid=False,
        pipeline=str(dir_1),
        pipeline_sr=str(dir_2),
        noise_level=100,
    )
    assert sampling.run_sampling_job(**flags)["made"] == 2
    ((args, kwargs),) = calls
    assert args == (str(dir_1), str(dir_2)) and kwargs["noise_level"] == 100
    assert kwargs["overrides"] == [{"steps": 3}, {"guidance_scale": 5.0}]
    meta = jobs.read_metadata(str(tmp_path / "out" / "images" / "000000_000.png"))
    assert [s["stage"] for s in meta["stages"]] == ["I", "II"]
    assert meta["stages"][1]["noise_level"] == 250 and meta["stages"][1]["height"] == 16
    with pytest.raises(ValueError, match="--pipeline_sr needs --pipeline"):
        sampling.run_sampling_job(**dict(flags, pipeline=None))
    with pytest.raises(ValueError, match="--noise_level needs --pipeline_sr"):
        sampling.run_sampling_job(**dict(flags, pipeline_sr=None))
