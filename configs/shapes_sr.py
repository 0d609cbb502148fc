"""Super-resolution stage of the shapes cascade: 32 -> 64 px (the Efficient U-Net
"shapes_sr"), with noise-conditioning augmentation of the 32 px input.

    python train.py --config=configs/shapes_sr.py --workdir=/tmp/shapes_sr
    python train.py --config=configs/shapes_sr.py:runlocal --workdir=/tmp/shapes_sr_local
"""

from configs import common, shapes_base
from imagen_jax import training
from imagen_jax.config_utils import parse_arg


def get_config(arg=None):
    arg = parse_arg(arg, runlocal=False, res=64, low_res=32, batch=16, steps=100_000, fsdp=1)
    config = shapes_base.shapes_config(res=arg.res, batch=arg.batch, steps=arg.steps, fsdp=arg.fsdp)
    config.model = training.model_config(
        variant="shapes_sr", resolution=arg.res, low_resolution=arg.low_res, text_dim=384
    )
    config.data.low_resolution = arg.low_res
    config.diffusion.resolution = arg.res
    config.train.noise_aug.max_level = 0.5
    config.train.noise_aug.sample_level = 0.1
    config.train.num_samples = 4
    config.sample.guidance_scale = 2.0
    if arg.runlocal:
        common.runlocal(config)
    return config
