"""The SDXL base trained further from a public pipeline directory (diffusers layout, a
StableDiffusionXLPipeline): its UNet fully, or low-rank adapters on it (`lora=RANK`), with
its VAE and both CLIP text encoders frozen.

    python train.py --config=configs/sdxl_finetune.py:pipeline=models/sdxl,data=photos,fsdp=8 \
        --workdir=runs/sdxl_photos
    python -m imagen_jax.training.export \
        --config=configs/sdxl_finetune.py:pipeline=models/sdxl,data=photos,fsdp=8 \
        --workdir=runs/sdxl_photos --outdir=runs/sdxl-photos  # sample.py --pipeline reads it

The same arguments, objective and optimizer as configs/sd_finetune.py (`finetune_config`),
at SDXL's 1024 px, with SDXL's conditioning as diffusers' train_text_to_image_sdxl.py
builds it: the text is both encoders' penultimate hidden states concatenated
(`text.kind = "sdxl"`), the pooled text is text_encoder_2's projection, and every image's
original size, crop corner (in the resized image) and target size are recorded by the
data pipeline (`data.size_crop`) and given to the UNet as its time ids. A dropped caption
gets the encoding of "" (tokens and pooled text). The 2.6 B parameter UNet with AdamW does
not fit one 80 GB device in float32: `fsdp=N` shards weights and optimizer state over N.
"""

from configs import sd_finetune
from imagen_jax.config_utils import parse_arg


def get_config(arg=None):
    return sd_finetune.finetune_config(parse_arg(arg, **sd_finetune.ARGS), "stable_diffusion_xl")
