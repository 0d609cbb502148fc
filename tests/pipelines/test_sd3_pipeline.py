"""End-to-end parity of the SD 3 pipeline with diffusers' StableDiffusion3Pipeline on tiny
random components (MMDiT, VAE with scaling and shift factors, two CLIPs with projections, a
T5 v1.1), saved with `save_pretrained` and loaded through `load_latent_pipeline`, which hands
the directory to `sd3.load_sd3_pipeline`. Same prompts and negative prompts, same initial
noise, flow-matching Euler with shift 3, guidance on: the final images must agree within
1e-3 (float32, values in [0, 1]). Also without the T5 (zeros in its place), and the
directory checks."""

import json

import numpy as np
import pytest
import torch
from test_latent_pipelines import assert_images_close, to_nchw
from tiny_diffusers import sd3_pipeline

from imagen_jax.pipelines import public, sd3
from imagen_jax.pipelines.public import load_latent_pipeline
from imagen_jax.weights import CheckpointError

PROMPTS = ["a red circle above a blue square", "two green stars"]
NEGATIVE = ["blurry", ""]
STEPS, GUIDANCE, MAX_SEQ = 4, 5.0, 16


def reference(pipe, noise):
    with torch.no_grad():
        return pipe(
            PROMPTS,
            negative_prompt=NEGATIVE,
            latents=to_nchw(noise),
            num_inference_steps=STEPS,
            guidance_scale=GUIDANCE,
            max_sequence_length=MAX_SEQ,
            output_type="np",
        ).images


@pytest.mark.parametrize("with_t5", [True, False], ids=["t5", "no_t5"])
def test_sd3_matches_diffusers(with_t5, tmp_path):
    pipe = sd3_pipeline(tmp_path, with_t5=with_t5)
    noise = np.random.default_rng(0).standard_normal((2, 8, 8, 4)).astype(np.float32)
    ours = sd3.load_sd3_pipeline(tmp_path, max_sequence_length=MAX_SEQ)
    out = ours(
        PROMPTS, negative_prompts=NEGATIVE, noise=noise, steps=STEPS, guidance_scale=GUIDANCE
    )
    assert_images_close(out.images, reference(pipe, noise))


def test_sd3_directory_checks(tmp_path):
    sd3_pipeline(tmp_path, with_t5=False)
    assert isinstance(load_latent_pipeline(tmp_path), sd3.SD3Pipeline)  # sample.py's way in
    config_file = tmp_path / "transformer" / "config.json"
    config = json.loads(config_file.read_text())
    config_file.write_text(json.dumps(dict(config, pooled_projection_dim=48)))
    with pytest.raises(CheckpointError, match="pooled_projection_dim=48"):
        sd3.load_sd3_pipeline(tmp_path)
    config_file.write_text(json.dumps(config))
    index_file = tmp_path / "model_index.json"
    index = json.loads(index_file.read_text())
    index_file.write_text(json.dumps(dict(index, scheduler=["diffusers", "DDIMScheduler"])))
    scheduler_file = tmp_path / "scheduler" / "scheduler_config.json"
    scheduler_file.write_text(json.dumps({"_class_name": "DDIMScheduler"}))
    with pytest.raises(CheckpointError, match="FlowMatchEulerDiscreteScheduler"):
        sd3.load_sd3_pipeline(tmp_path)


def test_sd3_splits_a_batch_over_eight_devices(tmp_path):
    sd3_pipeline(tmp_path, with_t5=False)
    prompts = [f"{p} {i}" for i in range(4) for p in PROMPTS]
    one = sd3.load_sd3_pipeline(tmp_path)(prompts, seed=3, steps=2).images
    job, _ = public.public_job(str(tmp_path), [], batch_size=8)
    assert job.base.mesh is not None and job.base.mesh.devices.size == 8
    out = job.base(prompts, seed=3, steps=2)
    assert len(out.latents.sharding.device_set) == 8
    eight = out.images
    assert one.std() > 0.01
    np.testing.assert_allclose(eight, one, atol=1e-5)
