"""End-to-end parity of the latent pipelines with diffusers on tiny random components.

Each case builds a diffusers pipeline of tiny random models of the real classes (UNet,
VAE, CLIP text encoders and tokenizers, the scheduler the public checkpoint ships), saves it
with `save_pretrained`, loads the directory through `load_latent_pipeline`, and samples the
same prompts from the same initial noise on both sides (classifier-free guidance on). The
final images must agree within 1e-3 (float32, values in [0, 1]); the images are checked to
vary, so that an agreement is not one of two blank outputs.
"""

import json

import diffusers
import numpy as np
import pytest
import torch
from tiny_diffusers import (
    refiner_pipeline,
    sd2_pipeline,
    sd_ddim,
    sd_pipeline,
    sdxl_pipeline,
)

from imagen_jax.pipelines import diffusers_format
from imagen_jax.pipelines.public import load_latent_pipeline, public_job
from imagen_jax.weights import CheckpointError

TOL = 1e-3
PROMPTS = ["a red circle above a blue square", "two green stars"]
NEGATIVE = ["blurry", ""]


def noise_for(pipe, batch=2, seed=0):
    rng = np.random.default_rng(seed)
    c = pipe.unet.config.in_channels
    s = pipe.unet.config.sample_size
    return rng.standard_normal((batch, s, s, c)).astype(np.float32)  # NHWC


def to_nchw(x):
    return torch.from_numpy(np.ascontiguousarray(np.transpose(x, (0, 3, 1, 2))))


def assert_images_close(ours, ref):
    assert ours.shape == ref.shape, (ours.shape, ref.shape)
    assert ref.std() > 0.01  # not blank
    err = np.abs(ours - ref).max()
    assert err < TOL, f"max |ours - diffusers| = {err:.2e}"


SCHEDULERS = {
    # SD 2.1's DDIM settings with epsilon prediction, and SD 1.5's PNDM replaced by DPM++ 2M.
    "ddim": sd_ddim,
    "dpmpp_2m": lambda: diffusers.DPMSolverMultistepScheduler(
        beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012, steps_offset=1
    ),
}


@pytest.mark.parametrize("scheduler", list(SCHEDULERS))
def test_stable_diffusion_matches_diffusers(scheduler, tmp_path):
    ref = sd_pipeline(tmp_path, SCHEDULERS[scheduler]())
    noise = noise_for(ref)
    want = ref(
        PROMPTS,
        negative_prompt=NEGATIVE,
        num_inference_steps=4,
        guidance_scale=7.5,
        latents=to_nchw(noise),
        output_type="np",
    ).images
    pipe = load_latent_pipeline(tmp_path)
    assert pipe.sample.sampler == scheduler
    got = pipe(PROMPTS, negative_prompts=NEGATIVE, noise=noise, steps=4, guidance_scale=7.5)
    assert_images_close(got.images, want)


def test_stable_diffusion_2_matches_diffusers(tmp_path):
    ref = sd2_pipeline(tmp_path)
    noise = noise_for(ref, seed=1)
    want = ref(
        PROMPTS, num_inference_steps=3, guidance_scale=5.0, latents=to_nchw(noise), output_type="np"
    ).images
    pipe = load_latent_pipeline(tmp_path)
    assert pipe.diffusion.prediction == "v"
    got = pipe(PROMPTS, noise=noise, steps=3, guidance_scale=5.0)
    assert_images_close(got.images, want)


@pytest.fixture(scope="module")
def xl(tmp_path_factory):
    base_dir = tmp_path_factory.mktemp("sdxl")
    base = sdxl_pipeline(base_dir)
    refiner_dir = tmp_path_factory.mktemp("refiner")
    refiner = refiner_pipeline(refiner_dir, base)
    return base, base_dir, refiner, refiner_dir


def test_sdxl_matches_diffusers(xl):
    base, base_dir, _, _ = xl
    noise = noise_for(base, seed=2)
    want = base(
        PROMPTS, num_inference_steps=4, guidance_scale=5.0, latents=to_nchw(noise), output_type="np"
    ).images
    got = load_latent_pipeline(base_dir)(PROMPTS, noise=noise, steps=4, guidance_scale=5.0)
    assert_images_close(got.images, want)


def test_sdxl_base_to_refiner_handoff_matches_diffusers(xl):
    base, base_dir, refiner, refiner_dir = xl
    noise = noise_for(base, seed=3)
    latents = base(
        PROMPTS,
        num_inference_steps=6,
        denoising_end=0.5,
        guidance_scale=5.0,
        latents=to_nchw(noise),
        output_type="latent",
    ).images
    want = refiner(
        PROMPTS,
        image=latents,
        num_inference_steps=6,
        denoising_start=0.5,
        guidance_scale=5.0,
        output_type="np",
    ).images
    ours_base, ours_refiner = load_latent_pipeline(base_dir), load_latent_pipeline(refiner_dir)
    assert ours_refiner.requires_aesthetics_score and len(ours_refiner.encoders) == 1
    handoff = ours_base(
        PROMPTS, noise=noise, steps=6, denoising_end=0.5, guidance_scale=5.0, output="latent"
    )
    np.testing.assert_allclose(
        np.asarray(handoff.latents), latents.permute(0, 2, 3, 1).numpy(), atol=1e-3
    )
    got = ours_refiner(
        PROMPTS,
        image_latents=handoff.latents,
        steps=6,
        denoising_start=0.5,
        guidance_scale=5.0,
    )
    assert_images_close(got.images, want)


def test_bad_pipeline_directories(tmp_path):
    sd_pipeline(tmp_path / "sd", SCHEDULERS["ddim"]())
    with pytest.raises(CheckpointError, match="is not a diffusers pipeline"):
        load_latent_pipeline(tmp_path / "sd" / "unet")
    # a missing component
    import shutil

    shutil.copytree(tmp_path / "sd", tmp_path / "no_vae")
    shutil.rmtree(tmp_path / "no_vae" / "vae")
    with pytest.raises(CheckpointError, match="component 'vae' is missing"):
        load_latent_pipeline(tmp_path / "no_vae")
    # a component of another class where the VAE belongs
    shutil.copytree(tmp_path / "sd", tmp_path / "swapped")
    shutil.rmtree(tmp_path / "swapped" / "vae")
    shutil.copytree(tmp_path / "sd" / "unet", tmp_path / "swapped" / "vae")
    with pytest.raises(CheckpointError, match="holds a UNet2DConditionModel model"):
        load_latent_pipeline(tmp_path / "swapped")
    # a UNet of another family: its cross-attention does not fit the text encoder
    shutil.copytree(tmp_path / "sd", tmp_path / "wide")
    config_file = tmp_path / "wide" / "unet" / "config.json"
    config = json.loads(config_file.read_text())
    config_file.write_text(json.dumps({**config, "cross_attention_dim": 2048}))
    with pytest.raises(CheckpointError, match="cross_attention_dim=2048 does not fit"):
        load_latent_pipeline(tmp_path / "wide")
    # a truncated weights file
    shutil.copytree(tmp_path / "sd", tmp_path / "cut")
    weights = tmp_path / "cut" / "unet" / "diffusion_pytorch_model.safetensors"
    weights.write_bytes(weights.read_bytes()[:-100])
    with pytest.raises(CheckpointError, match="truncated"):
        load_latent_pipeline(tmp_path / "cut")
    # an unsupported scheduler setting
    scheduler_file = tmp_path / "sd" / "scheduler" / "scheduler_config.json"
    config = json.loads(scheduler_file.read_text())
    scheduler_file.write_text(json.dumps({**config, "beta_schedule": "sigmoid"}))
    with pytest.raises(CheckpointError, match="beta_schedule='sigmoid' is not supported"):
        diffusers_format.scheduler_settings(tmp_path / "sd" / "scheduler")


def test_dpm_solver_order_of_a_scheduler_config(tmp_path):
    """solver_order=3 maps to DPM-Solver++(3M) (its numerics: tests/diffusion's parity);
    the SDE variant has no third order here, and says so."""
    kw = dict(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012)
    diffusers.DPMSolverMultistepScheduler(**kw, solver_order=3).save_config(tmp_path / "a")
    _, sample = diffusers_format.scheduler_settings(tmp_path / "a")
    assert sample.sampler == "dpmpp_3m"
    sde = dict(kw, solver_order=3, algorithm_type="sde-dpmsolver++")
    diffusers.DPMSolverMultistepScheduler(**sde).save_config(tmp_path / "b")
    with pytest.raises(CheckpointError, match="solver_order=3 is not supported"):
        diffusers_format.scheduler_settings(tmp_path / "b")


def test_unipc_scheduler_config(tmp_path):
    """diffusers' default UniPC maps to unipc; settings it does not implement are named."""
    kw = dict(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012)
    diffusers.UniPCMultistepScheduler(**kw).save_config(tmp_path / "a")
    _, sample = diffusers_format.scheduler_settings(tmp_path / "a")
    assert sample.sampler == "unipc"
    diffusers.UniPCMultistepScheduler(**kw, solver_type="bh1").save_config(tmp_path / "b")
    with pytest.raises(CheckpointError, match="solver_type='bh1' is not supported"):
        diffusers_format.scheduler_settings(tmp_path / "b")


def _split_over_eight_devices(path, pipe, **kwargs):
    """Images of 8 prompts on one device, then split over 8 (`sample.py --pipeline` splits
    a batch the host's devices divide, `public.public_job`), and 3 prompts on the 8-device
    mesh (a batch it does not divide runs whole on each device)."""
    prompts = [f"{p} {i}" for i in range(4) for p in PROMPTS]
    one = pipe(prompts, seed=3, steps=2, **kwargs).images
    job, _ = public_job(str(path), [], batch_size=8)
    assert job.base.mesh is not None and job.base.mesh.devices.size == 8
    out = job.base(prompts, seed=3, steps=2, **kwargs)
    assert len(out.latents.sharding.device_set) == 8
    eight = out.images
    assert one.std() > 0.01
    np.testing.assert_allclose(eight, one, atol=1e-5)
    three = job.base(prompts[:3], seed=3, steps=2, **kwargs).images
    np.testing.assert_allclose(three, one[:3], atol=1e-5)


def test_stable_diffusion_splits_a_batch_over_eight_devices(tmp_path):
    sd_pipeline(tmp_path, SCHEDULERS["dpmpp_2m"]())
    _split_over_eight_devices(tmp_path, load_latent_pipeline(tmp_path))


def test_sdxl_splits_a_batch_over_eight_devices(xl):
    _, base_dir, _, _ = xl
    _split_over_eight_devices(base_dir, load_latent_pipeline(base_dir))
