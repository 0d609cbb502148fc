"""Stable Diffusion 1.x / 2.x trained further from a public pipeline directory (diffusers
layout): its UNet fully, or low-rank adapters on it (`lora=RANK`), with its own VAE and CLIP
text encoder frozen, its scheduler's noise schedule and prediction (eps or v).

    python train.py --config=configs/sd_finetune.py:pipeline=models/sd-1.5,data=photos \
        --workdir=runs/sd_photos
    python train.py --config=configs/sd_finetune.py:pipeline=models/sd-2.1,data=photos,lora=8 \
        --workdir=runs/sd_photos_lora
    python -m imagen_jax.training.export_pipeline --config=configs/sd_finetune.py:... \
        --workdir=runs/sd_photos --outdir=runs/sd-photos        # sample.py --pipeline reads it

`data` is a folder of images with captions (`data.source = "folder"`), or "shapes" (the
shapes domain). The objective is diffusers' train_text_to_image's: t ~ U{0..T-1}, the MSE of
the UNet's eps (or v) against its target, Min-SNR-gamma weighted when `snr_gamma` > 0;
`empty_prob` of the captions are dropped to "" (its `--proportion_empty_prompts`; 0.1 keeps
classifier-free guidance working); AdamW with weight decay 1e-2 and gradient clipping at 1.0
as its defaults. Learning rate: 1e-5 full, 1e-4 with adapters (`lr` overrides). Adapters are
trained on the attention projections (`model.lora.targets`, diffusers'
train_text_to_image_lora's layers) at scale alpha / rank (`alpha`, default rank).

`runlocal` shrinks the run for a tiny pipeline (tests): 32 px synthetic images, 4 steps.
`finetune_config` is shared with configs/if_finetune.py (DeepFloyd IF stage I).
"""

import os

from configs import common
from imagen_jax import training
from imagen_jax.config_utils import parse_arg
from imagen_jax.pipelines import diffusers_format
from imagen_jax.text.config import text_config
from imagen_jax.training import config as training_config

ARGS = dict(
    pipeline="",
    data="",
    res=0,  # the images' side; 0 = the family's (SD 512, IF 64; runlocal: 32 | 8)
    batch=8,
    steps=2000,
    lr=0.0,
    lora=0,
    alpha=0.0,
    empty_prob=0.1,
    snr_gamma=0.0,
    fsdp=1,
    t5_len=77,  # SD 3: the T5's tokens (train_dreambooth_sd3.py's --max_sequence_length)
    # SD 3: train_dreambooth_sd3.py's --weighting_scheme (logit_normal | mode | cosmap |
    # sigma_sqrt | none; "" = logit_normal) and --precondition_outputs (-1 = its default, 1)
    scheme="",
    precondition=-1,
    runlocal=False,
)
RESOLUTION = {  # (full, runlocal)
    "stable_diffusion": (512, 32),
    "stable_diffusion_xl": (1024, 32),
    "stable_diffusion_3": (1024, 32),
    "deepfloyd_if": (64, 8),
}


def get_config(arg=None):
    return finetune_config(parse_arg(arg, **ARGS), "stable_diffusion")


def finetune_config(arg, expect: str):
    """The config of a public pipeline of family `expect` trained further (`ARGS`)."""
    res = arg.res or RESOLUTION[expect][1 if arg.runlocal else 0]
    config = common.base_config()
    config.model = training.model_config(
        family="pipeline",
        pipeline=arg.pipeline,
        expect=expect,
        resolution=res,
        lora=dict(rank=arg.lora, alpha=arg.alpha),
    )
    text_encoder = os.path.join(arg.pipeline, "text_encoder") if arg.pipeline else ""
    if expect == "deepfloyd_if":  # T5, its mask seen, as IFPipeline encodes
        config.text = text_config(kind="t5", path=text_encoder, max_length=77, empty="encode")
    elif expect == "stable_diffusion_xl":  # both CLIPs' penultimate layers, the pooled text
        config.text = text_config(kind="sdxl", path=arg.pipeline, max_length=77, empty="encode")
    elif expect == "stable_diffusion_3":  # both CLIPs, then the T5's tokens
        config.text = text_config(
            kind="sd3", path=arg.pipeline, max_length=arg.t5_len, empty="encode"
        )
        config.model.text_len = 77 + arg.t5_len
    else:
        config.text = text_config(
            kind="clip", path=text_encoder, max_length=77, model_mask=False, empty="encode"
        )
    if expect != "deepfloyd_if":
        config.latent = training.latent_config(
            vae=os.path.join(arg.pipeline, "vae") if arg.pipeline else "", sample_posterior=True
        )
    scheduler = os.path.join(arg.pipeline, "scheduler")
    if arg.pipeline and os.path.isdir(scheduler):  # its schedule, prediction and sampler
        # (a config built before the directory exists keeps the defaults; a run checks the
        # whole directory when it builds the network, and stops there without it)
        config.diffusion, config.sample = diffusers_format.scheduler_settings(scheduler)
    config.diffusion.resolution = res
    config.sample.steps = 25
    config.sample.guidance_scale = 7.5
    if arg.data == "shapes":
        config.data = training.data_config(source="shapes", size=1_000_000)
    else:
        config.data = training.data_config(source="folder", path=arg.data)
    config.data.resolution = res
    config.data.batch_size = arg.batch
    config.data.size_crop = expect == "stable_diffusion_xl"  # its size / crop ids
    config.optim = training.optim_config(
        lr=arg.lr or (1e-4 if arg.lora else 1e-5),
        warmup_steps=0,
        decay="constant",
        weight_decay=1e-2,
        grad_clip_norm=1.0,
    )
    config.train.steps = arg.steps
    config.train.cond_drop_prob = arg.empty_prob
    config.train.ema_decay = 0.9999
    config.train.checkpoint_every = 500
    config.train.sample_every = 500
    config.train.sample_prompts = ("a photo of a cat", "")
    if expect == "deepfloyd_if":  # its learned variance: the variational-bound term too
        config.train.loss.vlb_weight = 1.0
        config.model.lora.targets = training_config.IF_LORA_TARGETS
    if expect == "stable_diffusion_3":  # rectified flow, SD 3's times and weights, LoRA layers
        sd3_objective(config.train.loss, arg.scheme or "logit_normal", arg.precondition)
        config.sample.guidance_scale = 7.0
        config.model.lora.targets = training_config.SD3_LORA_TARGETS
    elif arg.scheme or arg.precondition != -1:
        raise ValueError(
            f"scheme={arg.scheme!r} / precondition={arg.precondition} are SD 3's "
            f"(train_dreambooth_sd3.py); this config is for {expect}"
        )
    if arg.snr_gamma > 0:
        config.train.loss.weighting = "min_snr"
        config.train.loss.min_snr_gamma = arg.snr_gamma
    if arg.fsdp > 1:
        config.mesh = [("data", -1), ("fsdp", arg.fsdp)]
    if arg.runlocal:
        config.data = training.data_config(
            source="synthetic", size=32, resolution=res, size_crop=config.data.size_crop
        )
        config.data.batch_size = arg.batch
        config.train.steps = 4
        config.train.log_every = 1
        config.train.checkpoint_every = 2
        config.train.sample_every = 4
        config.train.num_samples = 2
        config.train.progress = False
        config.sample.steps = 2
    return config


# train_dreambooth_sd3.py's --weighting_scheme: (time sampling, loss weighting).
SD3_SCHEMES = {
    "logit_normal": ("logit_normal", "uniform"),
    "mode": ("mode", "uniform"),
    "cosmap": ("uniform", "cosmap"),
    "sigma_sqrt": ("uniform", "sigma_sqrt"),
    "none": ("uniform", "uniform"),
}


def sd3_objective(loss, scheme: str, precondition: int) -> None:
    """Sets `train.loss` to train_dreambooth_sd3.py's objective of --weighting_scheme
    `scheme` and --precondition_outputs `precondition` (-1: the script's default, 1)."""
    if scheme not in SD3_SCHEMES:
        raise ValueError(f"scheme={scheme!r}; one of {sorted(SD3_SCHEMES)}")
    if precondition not in (-1, 0, 1):
        raise ValueError(f"precondition={precondition}; 0, 1 or -1 (the script's default, 1)")
    loss.time_sampling, loss.weighting = SD3_SCHEMES[scheme]
    loss.x0_loss = precondition != 0
