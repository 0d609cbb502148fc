"""DeepFloyd IF stage I trained further from a public pipeline directory (diffusers layout,
an IFPipeline): its pixel-space UNet fully, or low-rank adapters on it (`lora=RANK`), with
its T5 encoder frozen and its scheduler's schedule (squaredcos_cap_v2), eps prediction and
learned variance.

    python train.py --config=configs/if_finetune.py:pipeline=models/IF-I-M,data=photos \
        --workdir=runs/if_photos
    python -m imagen_jax.training.export \
        --config=configs/if_finetune.py:pipeline=models/IF-I-M,data=photos \
        --workdir=runs/if_photos --outdir=runs/if-photos     # sample.py --pipeline reads it

The same arguments and optimizer as configs/sd_finetune.py (`finetune_config`), at IF stage
I's 64 px. The loss is the MSE of the eps channels (diffusers' train_dreambooth.py for IF
keeps only those) plus the variational-bound term that trains the variance channels
(`train.loss.vlb_weight = 1`: Nichol & Dhariwal's L_hybrid, as IF was trained; 0 gives
diffusers' script's loss). Captions are encoded as written (IFPipeline lower-cases prompts:
lower-case the data's captions to match).
"""

from configs import sd_finetune
from imagen_jax.config_utils import parse_arg


def get_config(arg=None):
    return sd_finetune.finetune_config(parse_arg(arg, **sd_finetune.ARGS), "deepfloyd_if")
