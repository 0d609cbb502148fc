"""DeepFloyd IF stage II (super-resolution, an IFSuperResolutionPipeline) trained further
from a public pipeline directory: its UNet fully, or low-rank adapters on it (`lora=RANK`),
with its T5 frozen (IF-II's directories have none: `text_encoder=` stage I's).

    python train.py --config=configs/if_sr_finetune.py:pipeline=models/IF-II-L,data=photos,\
text_encoder=models/IF-I-XL/text_encoder --workdir=runs/if_sr_photos
    python -m imagen_jax.training.export --config=configs/if_sr_finetune.py:pipeline=... \
        --workdir=runs/if_sr_photos --outdir=runs/if-sr-photos

The same arguments, loss and optimizer as configs/if_finetune.py (`finetune_config`: eps
MSE plus the variational-bound term of the learned variance), at stage II's 256 px from
`low`-px inputs (default a quarter: 64). The input is made as IFSuperResolutionPipeline
makes it: the data's low-resolution image upscaled to 256 px bilinearly with the corners
aligned, then noised with the stage's schedule (its image_noising_scheduler must equal it)
at a random level aug_t ~ U(0, `max_aug`) of the 1000 steps, concatenated to the noised
image's channels; the UNet is told the level's timestep as its class label. The sample
grid uses `noise_level` (diffusers' default 250).
"""

from configs import sd_finetune
from imagen_jax.config_utils import parse_arg

ARGS = dict(sd_finetune.ARGS, low=0, text_encoder="", max_aug=0.5, noise_level=250)


def get_config(arg=None):
    arg = parse_arg(arg, **ARGS)
    arg.res = arg.res or (16 if arg.runlocal else 256)
    low = arg.low or arg.res // (2 if arg.runlocal else 4)
    config = sd_finetune.finetune_config(arg, "deepfloyd_if")
    config.model.low_resolution = low
    config.data.low_resolution = low
    if arg.text_encoder:
        config.text.path = arg.text_encoder
    config.train.noise_aug.max_level = arg.max_aug
    config.train.noise_aug.sample_level = arg.noise_level / 1000
    return config
