"""Imagen's 64 -> 256 px super-resolution stage (the 600M Efficient U-Net, Saharia et al.
2022, appendix B and F), noise-conditioning augmentation of the 64 px input.

    python train.py --workdir=gs://bucket/imagen_sr256 \
      --config=configs/imagen_sr256.py:data=/data/laion/shard-*.tar,t5=/models/t5-v1_1-xxl,fsdp=8
    python train.py --config=configs/imagen_sr256.py:runlocal --workdir=/tmp/imagen_sr_local
"""

from configs import common, imagen_base64
from imagen_jax import training
from imagen_jax.config_utils import parse_arg


def sr_config(arg, *, variant: str, res: int, low_res: int):
    """An Imagen super-resolution stage on the shared Imagen settings."""
    config = imagen_base64.imagen_config(
        data=arg.data, t5=arg.t5, batch=arg.batch, steps=arg.steps, fsdp=arg.fsdp
    )
    config.model = training.model_config(
        variant=variant, resolution=res, low_resolution=low_res, dtype="bfloat16", text_dim=4096
    )
    config.data.resolution = res
    config.data.low_resolution = low_res
    config.data.random_crop = True
    config.diffusion.schedule = "linear_logsnr"  # imagen-pytorch's SR schedule
    config.diffusion.prediction = "eps"
    config.train.noise_aug.max_level = 0.5
    config.train.noise_aug.sample_level = 0.2
    config.sample.guidance_scale = 4.0
    if arg.runlocal:
        common.runlocal(config)
    return config


def get_config(arg=None):
    arg = parse_arg(arg, runlocal=False, data="", t5="", batch=1024, steps=2_500_000, fsdp=1)
    return sr_config(arg, variant="imagen_sr256_600m", res=256, low_res=64)
