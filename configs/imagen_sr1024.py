"""Imagen's 256 -> 1024 px super-resolution stage (the 400M Efficient U-Net without
self-attention, Saharia et al. 2022, appendix F), trained on 256 px crops in the paper;
here on full images at 1024 px.

    python train.py --workdir=gs://bucket/imagen_sr1024 \
      --config=configs/imagen_sr1024.py:data=/data/laion/shard-*.tar,t5=/models/t5-v1_1-xxl,fsdp=8
    python train.py --config=configs/imagen_sr1024.py:runlocal --workdir=/tmp/imagen_sr1k_local
"""

from configs import imagen_sr256
from imagen_jax.config_utils import parse_arg


def get_config(arg=None):
    arg = parse_arg(arg, runlocal=False, data="", t5="", batch=256, steps=2_500_000, fsdp=1)
    config = imagen_sr256.sr_config(arg, variant="imagen_sr1024_400m", res=1024, low_res=256)
    if not arg.runlocal:
        config.sample.steps = 128
    return config
