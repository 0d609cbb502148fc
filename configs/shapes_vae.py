"""An AutoencoderKL for the shapes domain: the first stage of latent diffusion (Rombach et
al. 2022), 64 px images -> 16x16x4 latents (factor 4; `factor=8` gives 8x8x4, `factor=2`
32x32x4, or 16x16x4 of 32 px scenes with `res=32`).

    python train.py --config=configs/shapes_vae.py --workdir=/tmp/shapes_vae
    python train.py --config=configs/shapes_vae.py:runlocal --workdir=/tmp/shapes_vae_local
    python train.py --config=configs/shapes_vae.py:res=32,factor=4,steps=20000 --workdir=...

The run ends by writing WORKDIR/vae/, a diffusers AutoencoderKL directory (config.json +
diffusion_pytorch_model.safetensors, EMA weights, measured scaling_factor) that
`configs/shapes_latent.py:vae=WORKDIR/vae` and diffusers' `AutoencoderKL.from_pretrained`
read; `python -m imagen_jax.training.export` exports any checkpoint the same way.

Limits: the loss is an L1 (or L2) reconstruction plus a small KL term only
(`training/vae_step.py`). Stable Diffusion's VAE also trained with a perceptual (LPIPS) loss
and a patch-based adversarial loss, neither of which is implemented here, so reconstructions
of fine detail are blurrier than such a VAE's would be; on the flat-coloured shapes domain
this matters little.
"""

import ml_collections

from imagen_jax import training
from imagen_jax.config_utils import parse_arg

# block_out_channels per down-sampling factor (one level per halving, plus the first), and
# the layers per block and GroupNorm groups, per width: "small" is a quarter of the compute of
# "base" per image (the shipped latent model's VAE: flat-coloured shapes compress easily).
_CHANNELS = {
    "base": {2: (32, 64), 4: (32, 64, 128), 8: (32, 64, 128, 128)},
    "small": {2: (16, 32), 4: (16, 32, 64), 8: (16, 32, 64, 64)},
}
_LAYERS = {
    "base": dict(layers_per_block=2, norm_num_groups=32),
    "small": dict(layers_per_block=1, norm_num_groups=8),
}


def get_config(arg=None):
    arg = parse_arg(arg, runlocal=False, res=64, factor=4, width="base", batch=32, steps=50_000)
    if arg.width not in _CHANNELS:
        raise ValueError(f"width={arg.width!r}; expected one of {tuple(_CHANNELS)}")
    if arg.factor not in _CHANNELS[arg.width]:
        raise ValueError(f"factor={arg.factor}; expected one of {tuple(_CHANNELS[arg.width])}")
    config = ml_collections.ConfigDict()
    config.model = training.model_config(
        family="vae",
        variant="shapes",
        resolution=arg.res,
        block_out_channels=_CHANNELS[arg.width][arg.factor],
        latent_channels=4,
        **_LAYERS[arg.width],
    )
    config.vae_loss = training.vae_loss_config(
        reconstruction="l1",  # l1 | l2
        kl_weight=1e-6,
        sample_posterior=True,
    )
    config.data = training.data_config(
        source="shapes", split="train", size=1_000_000, resolution=arg.res, batch_size=arg.batch
    )
    config.optim = training.optim_config(lr=2e-4, warmup_steps=500, decay="constant")
    config.train = training.train_config(
        steps=arg.steps,
        log_every=50,
        checkpoint_every=500,
        keep_checkpoints=2,
        sample_every=2000,  # a reconstruction grid
        num_samples=8,
        ema_decay=0.999,
    )
    config.mesh = training.default_mesh()
    if arg.runlocal:
        runlocal(config)
    return config


def runlocal(config):
    """A tiny VAE (factor 2, 16 px -> 8x8x4) on the in-memory synthetic data, 20 steps."""
    config.model = training.model_config(
        family="vae", variant="runlocal", resolution=16, latent_channels=4
    )
    config.data = training.data_config(source="synthetic", size=64, resolution=16, batch_size=8)
    config.optim = training.optim_config(lr=1e-3, warmup_steps=2, decay="constant")
    config.train.steps = 20
    config.train.log_every = 5
    config.train.checkpoint_every = 10
    config.train.sample_every = 10
    config.train.num_samples = 2
    config.train.ema_decay = 0.99
    config.train.progress = False
    return config
