"""Stable Diffusion 3 / 3.5 trained further from a public pipeline directory (diffusers
layout, a StableDiffusion3Pipeline): its MMDiT transformer fully, or low-rank adapters on it
(`lora=RANK`), with its VAE and three text encoders frozen.

    python -m imagen_jax.training.text_cache \
        --config=configs/sd3_finetune.py:pipeline=models/sd3,data=photos \
        --out=runs/sd3_text                                # T5-XXL once, not every step
    python train.py --config=configs/sd3_finetune.py:pipeline=models/sd3,data=photos,fsdp=8 \
        --config.text.cache=runs/sd3_text --workdir=runs/sd3_photos
    python -m imagen_jax.training.export \
        --config=configs/sd3_finetune.py:pipeline=models/sd3,data=photos,fsdp=8 \
        --workdir=runs/sd3_photos --outdir=runs/sd3-photos   # sample.py --pipeline reads it

The same arguments and optimizer as configs/sd_finetune.py (`finetune_config`), at 1024 px,
with SD 3's objective as diffusers' train_dreambooth_sd3.py computes it: rectified flow
(x_t = (1 - sigma) x0 + sigma eps, the transformer predicts eps - x0, told sigma * 1000),
sigma the scheduler's shift applied to the time of `scheme` (the script's
--weighting_scheme: logit_normal, the default, | mode | cosmap | sigma_sqrt | none), and
with `precondition` (its --precondition_outputs, default 1) the implied x0 regressed onto
x0 (`train.loss.x0_loss`). The text is SD 3's joint
sequence (`text.kind = "sd3"`: both CLIPs' penultimate states padded to the T5's width,
then `t5_len` T5 tokens, default 77 as the script's --max_sequence_length) and the pooled
text both CLIPs' projections; a dropped caption gets the encodings of "". Adapters go on
the joint attention's projections (`SD3_LORA_TARGETS`, the script's LoRA layers).
"""

from configs import sd_finetune
from imagen_jax.config_utils import parse_arg


def get_config(arg=None):
    return sd_finetune.finetune_config(parse_arg(arg, **sd_finetune.ARGS), "stable_diffusion_3")
