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
"""

from configs import common, shapes_base
from imagen_jax import training
from imagen_jax.config_utils import parse_arg


def get_config(arg=None):
    arg = parse_arg(arg, runlocal=False, res=64, batch=32, steps=100_000, vae="", fsdp=1)
    config = shapes_base.shapes_config(res=arg.res, batch=arg.batch, steps=arg.steps, fsdp=arg.fsdp)
    config.model = training.model_config(
        family="sd_unet",
        variant="shapes_latent",
        resolution=arg.res,
        in_channels=4,  # the VAE's latent_channels
        out_channels=4,
        cross_attention_dim=384,
    )
    config.latent = training.latent_config(vae=arg.vae, sample_posterior=True)
    config.diffusion.schedule = "scaled_linear"  # Stable Diffusion's 1000 discrete steps
    config.diffusion.beta_start = 0.00085  # and its betas
    config.diffusion.beta_end = 0.012
    config.diffusion.prediction = "eps"
    config.diffusion.resolution = arg.res
    config.train.loss.weighting = "min_snr"
    if arg.runlocal:
        common.runlocal(config)
        config.model = training.model_config(
            family="sd_unet", variant="runlocal", resolution=16, cross_attention_dim=32
        )
        config.latent.vae = arg.vae or "random"
    return config
