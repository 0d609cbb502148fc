"""A latent diffusion stage for the shapes domain: our SDUNet (Stable Diffusion 1.x's block
layout, scaled down) on the latents of a frozen shapes VAE, conditioned on all-MiniLM-L6-v2
(384-dim tokens, the UNet's cross_attention_dim).

    python train.py --config=configs/shapes_vae.py --workdir=/tmp/shapes_vae   # writes vae/
    python train.py --config=configs/shapes_latent.py:vae=/tmp/shapes_vae/vae \
        --workdir=/tmp/shapes_latent
    python train.py --config=configs/shapes_latent.py:runlocal --workdir=/tmp/shapes_latent_local

`vae` is a diffusers AutoencoderKL directory (`latent.vae`; runlocal: an untrained random
VAE unless `vae=` is given). Its latents (`latents_from_images`, scaled by its
scaling_factor) are computed without gradient before every step; the UNet's in_channels
must equal the VAE's latent_channels (4). The network is told diffusers' timesteps (0..999
of the scaled_linear schedule, as Stable Diffusion), and classifier-free guidance dropout
swaps the text for a learned null text (`models/latent_unet.py`), not for the encoding of
"". The sample grid decodes the sampled latents with the VAE. Periodic evaluation is
configured as configs/shapes_base.py's (the shapes judge on held-out prompts, off until
`evals.every` is set) and samples through the VAE as sample.py samples the exported stage.

The third arm of the equal-parameter comparison (docs/training.md): `width=32,layers=1`
scales the UNet to the shapes MMDiT's size (3.4 M parameters: channels width x (1, 2, 4),
width/2 GroupNorm groups and width/8 heads, so every level keeps the variant's channels a
group and head widths), and `objective=flow` trains it with the MMDiT's objective and
sampler (`rectified_flow`: rectified flow, logit-normal times, flow-matching Euler), on
the training wordings (`wordings=train`); squares only, as a UNet that halves its
latents twice cannot take the MMDiT's 14 x 18 or 12 x 22 latent canvases. `objective=v`
trains it with the pixel base's instead (v-prediction on the cosine schedule, min-SNR-5
weights, DPM-Solver++(2M) in 20 steps: `shapes_base.shapes_config`'s), which separates the
objective from the latent space. With `res=32` and a factor-2 VAE of 32 px scenes
(`configs/shapes_vae.py:width=small,res=32,factor=2`) the same UNet samples 16x16x4 latents
of the pixel base's scene size, which the shipped super-resolution stage takes to 64 px.

    python train.py --workdir=/tmp/shapes_latent_w32 --config=configs/shapes_latent.py:\
vae=checkpoints/shapes/latent/vae,width=32,layers=1,objective=flow,wordings=train
"""

from configs import common, shapes_base
from imagen_jax import training
from imagen_jax.config_utils import parse_arg


def get_config(arg=None):
    arg = parse_arg(
        arg,
        runlocal=False,
        res=64,
        batch=32,
        steps=100_000,
        vae="",
        fsdp=1,
        width=0,
        layers=0,
        objective="eps",
        wordings="grammar",
    )
    config = shapes_base.shapes_config(res=arg.res, batch=arg.batch, steps=arg.steps, fsdp=arg.fsdp)
    config.data.wordings = arg.wordings
    widths = {}
    if arg.width:  # the variant's 64 wide: 32 groups, 8 heads
        if arg.width % 8:
            raise ValueError(f"width must be a multiple of 8 (width/8 heads), got {arg.width}")
        w = arg.width
        widths = dict(
            block_out_channels=(w, 2 * w, 4 * w), norm_num_groups=w // 2, attention_head_dim=w // 8
        )
    if arg.layers:
        widths["layers_per_block"] = arg.layers
    config.model = training.model_config(
        family="sd_unet",
        variant="shapes_latent",
        resolution=arg.res,
        in_channels=4,  # the VAE's latent_channels
        out_channels=4,
        cross_attention_dim=384,
        **widths,
    )
    config.latent = training.latent_config(vae=arg.vae, sample_posterior=True)
    config.diffusion.resolution = arg.res
    if arg.objective == "flow":
        rectified_flow(config)
    elif arg.objective == "eps":
        config.diffusion.schedule = "scaled_linear"  # Stable Diffusion's 1000 discrete steps
        config.diffusion.beta_start = 0.00085  # and its betas
        config.diffusion.beta_end = 0.012
        config.diffusion.prediction = "eps"
        config.train.loss.weighting = "min_snr"
    elif arg.objective != "v":  # v: the pixel base's (shapes_config's) objective and sampler
        raise ValueError(f"objective must be 'eps', 'flow' or 'v', got {arg.objective!r}")
    if arg.runlocal:
        common.runlocal(config)
        config.model = training.model_config(
            family="sd_unet", variant="runlocal", resolution=16, cross_attention_dim=32
        )
        config.latent.vae = arg.vae or "random"
    return config


def rectified_flow(config, shift: float = 1.0):
    """SD 3's objective and sampler on `config` (Esser et al. 2024): z_t = (1 - t) x0 + t eps,
    the velocity eps - x0 predicted in the flow space with an unweighted loss, t drawn
    logit-normal with the resolution shift `shift`; sampled by flow-matching Euler, 28
    linearly spaced steps."""
    config.diffusion.schedule = "flow"
    config.diffusion.prediction = "flow"
    config.diffusion.model_space = "flow"
    config.diffusion.flow_shift = shift
    config.train.loss.weighting = "uniform"
    config.train.loss.time_sampling = "logit_normal"
    config.sample.sampler = "flow_euler"
    config.sample.steps = 28
    config.sample.spacing = "linspace"
