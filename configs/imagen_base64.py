"""Imagen's 64 px base model (Saharia et al. 2022): the 2B-parameter UNet conditioned on
T5-XXL (4096-dim tokens, 128 tokens), trained on image-caption tar shards.

    python train.py --workdir=gs://bucket/imagen_base64 \
      --config=configs/imagen_base64.py:data=/data/laion/shard-*.tar,t5=/models/t5-v1_1-xxl,fsdp=8
    python train.py --config=configs/imagen_base64.py:runlocal --workdir=/tmp/imagen_local

Settings follow the paper (sec. 2 and appendix F: batch 2048, Adam at 1e-4 with 10k warm-up
steps, 2.5M steps, EMA, CFG dropout 10%, gradient clipping 1.0) and imagen-pytorch's defaults
where the paper is silent (cosine schedule for the base, eps prediction). `t5` is a local
Hugging Face-layout T5 encoder directory (e.g. google/t5-v1_1-xxl's encoder).
"""

from configs import common
from imagen_jax import training
from imagen_jax.config_utils import parse_arg
from imagen_jax.text.config import text_config


def imagen_config(*, data: str, t5: str, batch: int, steps: int, fsdp: int):
    """What the Imagen stages share: T5-XXL text, tar-shard data, optimizer, EMA, mesh."""
    config = common.base_config()
    config.text = text_config(kind="t5", path=t5, max_length=128, dtype="bfloat16")
    config.data = training.data_config(source="tar", path=data, batch_size=batch, worker_count=8)
    config.optim = training.optim_config(lr=1e-4, warmup_steps=10_000, decay="constant")
    config.train.steps = steps
    config.train.ema_decay = 0.9999
    config.train.cond_drop_prob = 0.1
    config.train.checkpoint_every = 5000
    config.train.sample_every = 20_000
    config.train.sample_prompts = (
        "a corgi wearing a red bowtie and a purple party hat",
        "a photo of a raccoon wearing an astronaut helmet, looking out of the window at night",
        "a blue jay standing on a large basket of rainbow macarons",
        "a brain riding a rocketship heading towards the moon",
    )
    config.sample.sampler = "ddpm"
    config.sample.steps = 256
    config.sample.guidance_scale = 7.0
    config.sample.dynamic_threshold = 0.995
    config.mesh = [("data", -1), ("fsdp", fsdp)] if fsdp > 1 else [("data", -1)]
    return config


def get_config(arg=None):
    arg = parse_arg(arg, runlocal=False, data="", t5="", batch=2048, steps=2_500_000, fsdp=1)
    config = imagen_config(
        data=arg.data, t5=arg.t5, batch=arg.batch, steps=arg.steps, fsdp=arg.fsdp
    )
    config.model = training.model_config(
        variant="imagen_base_2b", resolution=64, dtype="bfloat16", text_dim=4096
    )
    config.diffusion.schedule = "cosine"
    config.diffusion.prediction = "eps"
    if arg.runlocal:
        common.runlocal(config)
    return config
