"""Inpainting with the latent pipelines, against diffusers on tiny random components.

`StableDiffusionInpaintPipeline` and `StableDiffusionXLInpaintPipeline` with 9-channel UNets
(latents, mask, masked-image latents), saved with `save_pretrained` and loaded through
`load_latent_pipeline`; both sides sample the same prompts from the same noise with
classifier-free guidance, and the final images must agree within 1e-3 (float32 in [0, 1]),
as the text-to-image parity tests. The VAEs' posteriors have a standard deviation of
exp(-15) (`tiny_diffusers.deterministic_vae`), so the image encodings agree whatever noise
each side draws for them. A text-to-image UNet given a mask keeps the unmasked latents.
"""

import json

import diffusers
import numpy as np
import pytest
import torch
from test_latent_pipelines import NEGATIVE, PROMPTS, SCHEDULERS, assert_images_close, to_nchw
from tiny_diffusers import sd_pipeline, sdxl_pipeline

from imagen_jax.pipelines.public import load_latent_pipeline


def inputs(size=16, batch=2, seed=0):
    """Images [B, H, W, 3] in [0, 1] with structure, and masks [B, H, W, 1] of a box each
    (values off 0.5 on both sides, so that the binarization is exercised)."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:size, 0:size] / size
    images = np.stack(
        [np.stack([xx, yy, 0.5 + 0.4 * np.sin(6 * (xx + b) * yy)], -1) for b in range(batch)]
    )
    images = np.clip(images + 0.05 * rng.standard_normal(images.shape), 0, 1).astype(np.float32)
    masks = np.full((batch, size, size, 1), 0.2, np.float32)
    masks[0, 4:12, 2:10] = 0.9
    masks[1:, 6:14, 5:15] = 0.6
    return images, masks


def latent_noise(pipe, batch=2, seed=0):
    rng = np.random.default_rng(seed)
    c = pipe.vae.config.latent_channels
    s = pipe.unet.config.sample_size
    return rng.standard_normal((batch, s, s, c)).astype(np.float32)


@pytest.mark.parametrize("scheduler", list(SCHEDULERS))
def test_sd_inpainting_matches_diffusers(scheduler, tmp_path):
    ref = sd_pipeline(tmp_path, SCHEDULERS[scheduler](), kind="Inpaint")
    images, masks = inputs()
    noise = latent_noise(ref)
    want = ref(
        PROMPTS,
        image=images,
        mask_image=masks,
        negative_prompt=NEGATIVE,
        num_inference_steps=4,
        guidance_scale=7.5,
        latents=to_nchw(noise),
        output_type="np",
    ).images
    pipe = load_latent_pipeline(tmp_path)
    assert pipe.inpainting
    got = pipe(
        PROMPTS, negative_prompts=NEGATIVE, image=images, mask=masks, noise=noise, steps=4,
        guidance_scale=7.5,
    )  # fmt: skip
    assert_images_close(got.images, want)
    other = pipe(PROMPTS, negative_prompts=NEGATIVE, image=images, mask=1 - masks, noise=noise,
                 steps=4, guidance_scale=7.5)  # fmt: skip
    assert np.abs(other.images - got.images).max() > 0.05  # the mask reaches the network


def test_sd_inpainting_with_strength_matches_diffusers(tmp_path):
    """Strength 0.75: the image's latents noised to the first kept step, diffusers drawing
    the posterior sample first, then the noise, from one generator (replayed here)."""
    ref = sd_pipeline(tmp_path, SCHEDULERS["ddim"](), kind="Inpaint")
    images, masks = inputs(seed=1)
    shape = (2, 4, 8, 8)
    generator = torch.Generator().manual_seed(5)
    torch.randn(shape, generator=generator)  # the image's posterior sample (std ~3e-7)
    noise = torch.randn(shape, generator=generator).permute(0, 2, 3, 1).numpy()
    want = ref(
        PROMPTS, image=images, mask_image=masks, num_inference_steps=8, strength=0.75,
        guidance_scale=5.0, generator=torch.Generator().manual_seed(5), output_type="np",
    ).images  # fmt: skip
    got = load_latent_pipeline(tmp_path)(
        PROMPTS, image=images, mask=masks, noise=noise, steps=8, strength=0.75, guidance_scale=5.0
    )
    assert_images_close(got.images, want)


def test_sd_img2img_matches_diffusers(tmp_path):
    """StableDiffusionImg2ImgPipeline at strength 0.75 (the inpainting test's components
    but a 4-channel UNet): the image's latents noised to the first kept step, diffusers
    drawing the posterior sample first, then the noise, from one generator (replayed)."""
    ref = sd_pipeline(tmp_path, SCHEDULERS["ddim"](), kind="Img2Img")
    images, _ = inputs(seed=4)
    generator = torch.Generator().manual_seed(9)
    torch.randn((2, 4, 8, 8), generator=generator)  # the posterior sample (std ~3e-7)
    noise = torch.randn((2, 4, 8, 8), generator=generator).permute(0, 2, 3, 1).numpy()
    want = ref(
        PROMPTS, image=images, num_inference_steps=8, strength=0.75, guidance_scale=5.0,
        generator=torch.Generator().manual_seed(9), output_type="np",
    ).images  # fmt: skip
    got = load_latent_pipeline(tmp_path)(
        PROMPTS, image=images, noise=noise, steps=8, strength=0.75, guidance_scale=5.0
    )
    assert_images_close(got.images, want)


def test_sdxl_inpainting_matches_diffusers(tmp_path):
    ref = sdxl_pipeline(tmp_path, inpaint=True)
    assert isinstance(ref, diffusers.StableDiffusionXLInpaintPipeline)
    images, masks = inputs(seed=2)
    noise = latent_noise(ref, seed=2)
    want = ref(
        PROMPTS, image=images, mask_image=masks, num_inference_steps=4, strength=1.0,
        guidance_scale=5.0, latents=to_nchw(noise), output_type="np",
    ).images  # fmt: skip
    pipe = load_latent_pipeline(tmp_path)
    assert pipe.xl and pipe.inpainting
    got = pipe(PROMPTS, image=images, mask=masks, noise=noise, steps=4, guidance_scale=5.0)
    assert_images_close(got.images, want)


def test_inpainting_inputs_are_checked(tmp_path):
    inpaint_dir, plain_dir = tmp_path / "inpaint", tmp_path / "plain"
    sd_pipeline(inpaint_dir, SCHEDULERS["ddim"](), kind="Inpaint")
    sd_pipeline(plain_dir, SCHEDULERS["ddim"]())
    pipe = load_latent_pipeline(inpaint_dir)
    images, masks = inputs(batch=1)
    with pytest.raises(ValueError, match="inpainting UNet .*needs `image` and `mask`"):
        pipe(["a red circle"], steps=2)  # text-to-image with an inpainting UNet
    with pytest.raises(ValueError, match="mask has shape"):
        pipe(["a red circle"], image=images, mask=masks[:, :8, :8], steps=2)
    with pytest.raises(ValueError, match="needs `image`"):
        pipe(["a red circle"], mask=masks, steps=2)
    with pytest.raises(ValueError, match="multiples of 2"):  # the tiny VAE's factor
        pipe(["a red circle"], image=images[:, :15, :15], mask=masks[:, :15, :15], steps=2)

    plain = load_latent_pipeline(plain_dir)
    assert not plain.inpainting
    out = plain(["a red circle"], image=images, mask=masks, steps=3, strength=1.0, output="latent")
    kept = plain._init_latents(images, None, 0)  # the image's latents (the same key)
    keep = (masks[:, ::2, ::2] < 0.5)[..., 0]
    np.testing.assert_array_equal(np.asarray(out.latents)[keep], np.asarray(kept)[keep])
    assert np.abs(np.asarray(out.latents) - np.asarray(kept))[~keep].max() > 0.1


def test_sampling_job_inpaints_with_a_public_pipeline(tmp_path, capsys):
    """sample.py --pipeline=DIR --init_image --mask: each image is the pipeline's own call
    with the job's keys; the files' SHA-256 are part of the job and its PNGs' metadata; an
    inpainting UNet without a mask and a refiner with an edit stop in one line."""
    from PIL import Image

    from imagen_jax.files import file_sha256
    from imagen_jax.pipelines import jobs, sampling

    sd_pipeline(tmp_path / "sd", SCHEDULERS["ddim"](), kind="Inpaint")
    images, masks = inputs(batch=1)
    Image.fromarray((images[0] * 255).round().astype(np.uint8)).save(tmp_path / "image.png")
    Image.fromarray((masks[0, ..., 0] > 0.5).astype(np.uint8) * 255).save(tmp_path / "mask.png")
    args = dict(
        pipeline=str(tmp_path / "sd"), stages=[], prompts=["a red circle", "a blue star"],
        prompts_file=None, negative_prompt="", images_per_prompt=1, seed=3, batch_size=2,
        outdir=str(tmp_path / "out"), overrides=["0.steps=3"], grid=False,
        init_image=str(tmp_path / "image.png"), mask=str(tmp_path / "mask.png"),
    )  # fmt: skip
    assert sampling.run_sampling_job(**args)["made"] == 2
    manifest = [
        json.loads(x) for x in (tmp_path / "out" / "manifest.jsonl").read_text().splitlines()
    ]
    pipe = load_latent_pipeline(tmp_path / "sd")
    image = np.asarray(Image.open(tmp_path / "image.png"), np.float32) / 255
    mask = np.asarray(Image.open(tmp_path / "mask.png"), np.float32) / 255
    for record in manifest:
        assert record["edit"]["mask"]["sha256"] == file_sha256(str(tmp_path / "mask.png"))
        entry = jobs.PromptEntry(record["prompt"], "")
        item = jobs.WorkItem(record["prompt_index"], record["image_index"], entry)
        want = pipe(
            [record["prompt"]], image=image[None], mask=mask[None], steps=3,
            keys=jobs.image_key(3, item, 0)[None],
        ).images  # fmt: skip
        png = np.asarray(Image.open(tmp_path / "out" / record["file"]))
        assert np.abs(png.astype(int) - (want[0] * 255).round()).max() <= 1
    with pytest.raises(jobs.JobMismatchError):  # another mask is another job
        Image.fromarray(np.zeros((16, 16), np.uint8) + 255).save(tmp_path / "mask2.png")
        sampling.run_sampling_job(**dict(args, mask=str(tmp_path / "mask2.png")))
    with pytest.raises(ValueError, match="inpainting UNet: give --init_image and --mask"):
        sampling.run_sampling_job(**dict(args, outdir=str(tmp_path / "o2"), mask=None))
