"""Samples images from a cascade of stages: one PNG per image with its metadata, a manifest.

    python sample.py --stage=STAGE_DIR [--stage=SR_STAGE_DIR ...] \
        --prompt="a red circle above a blue square" --images_per_prompt=4 --outdir=out/
    python sample.py --model=cascade --prompt="a red star"   # a shipped model, by name

With neither --stage nor --model it samples the shipped default model (--model=cascade:
checkpoints/shapes/base and sr); --model=NAME picks a shipped model by name
(`imagen_jax/pipelines/shipped.py`; "latent", a VAE + MMDiT latent stage in
checkpoints/shapes/latent, is registered but not shipped yet). --model and --stage exclude
each other.

Prompts come from --prompt (repeatable) or --prompts=FILE (.txt, one per line; or .jsonl
with per-prompt "seed", "negative_prompt", "guidance_scale"). A stage is a directory written
by `imagen_jax.stages` (exported from a training workdir): a pixel stage, or a latent
stage (a denoiser of VAE latents with its VAE, sampled in latent space and decoded). A
restarted job makes only the images that are missing; a rerun into a folder that holds
another job's images (other prompts, seed, settings or weights) stops and says what
differs, unless --overwrite. --set=STAGE.KEY=VALUE (repeatable)
overrides a stage's sample settings, e.g. --set=0.steps=25 --set=1.sampler=ddim, and a
super-resolution stage's augmentation level of its low-res input (--set=1.aug_level=0.2).

--height/--width set the final images' size (default: the last stage's trained square
resolution); the networks are fully convolutional, so any size works whose every stage size
(the final size divided by the super-resolution factors after that stage) is a multiple of
that stage's UNet downsampling factor (2 ** (levels - 1)), e.g. 32x64 with the shapes
cascade; a latent stage's sides must be multiples of its VAE's factor times its MMDiT's
patch size (or its latent UNet's downsampling factor). Non-square sizes were never seen in
training: expect the quality to vary.

Editing: --init_image=FILE starts every image from that image at --strength (1: from
noise, as without it; 0: the image itself), at the base stage; --mask=FILE (the image's
size, white where it is regenerated, black where it is kept) inpaints: every stage keeps the
black region, with RePaint's resampling when --repaint_jump > 0 (jumps of that many steps,
each redone --repaint_resample times). Stage sets and DeepFloyd IF take all of these; SD /
SDXL --pipeline directories take --init_image, --mask and --strength (an inpainting
checkpoint, whose UNet has 9 input channels, needs --mask; a text-to-image one keeps the
black region by the samplers' masked sampling), not RePaint or --refiner; SD 3 none. The
files' SHA-256 and the settings are part of the job and of every image's metadata
(`imagen_jax/pipelines/editing.py`). A JSONL prompt file's entries may carry their own
"init_image", "mask" (relative to the file) and "strength" (stage sets and IF).

Public models: --pipeline=DIR samples a Stable Diffusion 1.x / 2.x, SDXL or SD 3 / 3.5
directory in diffusers layout (model_index.json, unet/ or transformer/, vae/, text_encoder*/,
tokenizer*/, scheduler/),
with its scheduler's settings (override with --set=0.steps=30 --set=0.sampler=dpmpp_2m);
--refiner=DIR adds the SDXL refiner for the steps after --refiner_start (default 0.8);
--lora=FILE merges a diffusers LoRA file's adapters into an SD / SDXL / SD 3 pipeline or IF
stage I, --lora_sr into IF stage II (a LoRA export directory also works on its own as
--pipeline or --pipeline_sr).
DeepFloyd IF: --pipeline=IF_I_DIR samples stage I (IFPipeline), --pipeline_sr=IF_II_DIR adds
stage II (IFSuperResolutionPipeline) on its output, with the input noised at --noise_level
(default 250); the two run as one cascade (--set=0.steps=50 --set=1.guidance_scale=4 ...).
Prompts are lower-cased and stripped, not cleaned (diffusers' clean_caption=False).

Multi-host: every process runs the same command with --coordinator_address=host:port,
--num_processes and --process_id (or JAX_COORDINATOR_ADDRESS, JAX_NUM_PROCESSES,
JAX_PROCESS_ID; --jax_distributed lets jax find them on Slurm and TPU pods). Each process
samples a contiguous range of the prompts; --outdir must be one shared file system, where
process 0 writes the manifest once every process is done.
"""

import sys

from absl import app, flags

from imagen_jax import logs, parallel
from imagen_jax.diffusion.config import sample_config
from imagen_jax.pipelines import sampling, shipped

flags.DEFINE_multi_string(
    "stage",
    [],
    "Stage directories (pixel or latent), base first (repeatable); none: a shipped model "
    "(--model).",
)
flags.DEFINE_string(
    "model",
    None,
    f"A shipped model by name, instead of --stage (default {shipped.DEFAULT}): "
    f"{shipped.describe()}.",
)
flags.DEFINE_multi_string(
    "prompt",
    [],
    "A prompt (repeatable). With neither --prompt nor --prompts, and no --stage: the shipped "
    "model's default prompts (checkpoints/shapes/prompts.txt).",
)
flags.DEFINE_string(
    "prompts",
    None,
    'A prompt file: .txt, one per line; .jsonl, objects with "prompt" and optional "seed", '
    '"negative_prompt", "guidance_scale".',
)
flags.DEFINE_string(
    "negative_prompt",
    "",
    "Negative prompt of every prompt (of a prompt file: of each entry without its own).",
)
flags.DEFINE_integer("images_per_prompt", 1, "Images per prompt.")
flags.DEFINE_integer("seed", 0, "Job seed.")
flags.DEFINE_integer("batch_size", 4, "Images per compiled call (per process).")
flags.DEFINE_string(
    "outdir",
    "samples",
    "Output directory (images/, job.json, manifest.jsonl, grid.png), relative to the current "
    "folder.",
)
flags.DEFINE_bool(
    "overwrite",
    False,
    "Replace the images of another job in --outdir (a rerun of the same job resumes; "
    "one of another job, without this flag, stops and says what differs).",
)
flags.DEFINE_multi_string(
    "set",
    [],
    "STAGE.KEY=VALUE (repeatable): a stage's sample setting, STAGE 0 the base; KEY one of "
    f"{', '.join([*sample_config().keys(), *sampling.STAGE_KEYS])}.",
)
flags.DEFINE_bool("grid", True, "Also write grid.png of the final images (process 0's).")
flags.DEFINE_integer(
    "height",
    None,
    "Final image height in pixels (default: the last stage's resolution); each stage's "
    "share of it must be a multiple of its UNet's downsampling factor (a latent stage's: of "
    "its VAE's factor times its MMDiT's patch size).",
)
flags.DEFINE_integer("width", None, "Final image width in pixels (as --height).")
flags.DEFINE_string(
    "pipeline",
    None,
    "A diffusers-format SD 1.x / 2.x / SDXL or DeepFloyd IF stage I directory (instead of "
    "--stage).",
)
flags.DEFINE_string("refiner", None, "An SDXL refiner directory (with an SDXL --pipeline).")
flags.DEFINE_float("refiner_start", 0.8, "Fraction of the steps after which the refiner runs.")
flags.DEFINE_string(
    "lora",
    None,
    "A diffusers LoRA file (or a directory holding pytorch_lora_weights.safetensors) merged "
    "into the SD / SDXL --pipeline's UNet (SD 3: its transformer; IF: stage I's).",
)
flags.DEFINE_string(
    "lora_sr", None, "A diffusers LoRA file merged into the IF stage II --pipeline_sr's UNet."
)
flags.DEFINE_string(
    "pipeline_sr", None, "A DeepFloyd IF stage II directory (after an IF stage I --pipeline)."
)
flags.DEFINE_string("init_image", None, "Image-to-image / inpainting: the image to start from.")
flags.DEFINE_string("mask", None, "Inpainting: white where --init_image is regenerated.")
flags.DEFINE_float("strength", 1.0, "With --init_image: the share of the base's steps run.")
flags.DEFINE_integer("repaint_jump", 0, "RePaint: steps per jump back (0: no resampling).")
flags.DEFINE_integer("repaint_resample", 1, "RePaint: how often each jump is redone.")
flags.DEFINE_integer(
    "noise_level", None, "DeepFloyd IF stage II: the noise level of its input (default 250)."
)
parallel.define_distributed_flags()


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
    logs.quiet_logs()
    f = flags.FLAGS
    parallel.initialize_from_flags()
    try:
        _run(f)
    except (ValueError, OSError) as e:  # bad input: named in one line, no traceback
        sys.exit(f"sample.py: {type(e).__name__}: {e}")


def _run(f):
    sampling.run_sampling_job(
        stages=f.stage,
        prompts=f.prompt,
        prompts_file=f.prompts,
        negative_prompt=f.negative_prompt,
        images_per_prompt=f.images_per_prompt,
        seed=f.seed,
        batch_size=f.batch_size,
        outdir=f.outdir,
        overrides=f.set,
        grid=f.grid,
        height=f.height,
        width=f.width,
        pipeline=f.pipeline,
        refiner=f.refiner,
        refiner_start=f.refiner_start,
        lora=f.lora,
        pipeline_sr=f.pipeline_sr,
        lora_sr=f.lora_sr,
        noise_level=f.noise_level,
        overwrite=f.overwrite,
        model=f.model,
        init_image=f.init_image,
        mask=f.mask,
        strength=f.strength,
        repaint_jump=f.repaint_jump,
        repaint_resample=f.repaint_resample,
    )


if __name__ == "__main__":
    app.run(main)
