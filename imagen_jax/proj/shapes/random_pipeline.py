"""Writes a randomly initialised DeepFloyd IF stage I pipeline (diffusers layout, an
IFPipeline) sized for the 32 px shapes domain: the "public checkpoint" that a fine-tune
from chance starts from (docs/finetuning.md, "Measured: from chance").

    .venv/bin/python -m imagen_jax.proj.shapes.random_pipeline --out=runs/if_shapes_random

The pipeline has IF stage I's layout (a pixel-space UNet with text-conditioned
cross-attention and learned variance, squaredcos_cap_v2 DDPM) at a small width, and a
random 2-layer T5 whose tokenizer knows the shapes captions' words (a word piece each; any
other word falls back to characters). The text encoder stays frozen and random when the
UNet is trained: its tokens still tell words and their order apart.

It is written with diffusers' and transformers' own classes (`save_pretrained`), so it
needs the test dependencies (torch, diffusers, transformers); training, sampling and
scoring it do not.
"""

from __future__ import annotations

import json
import os
import string

from absl import app, flags

from imagen_jax.shapes import prompt_sets
from imagen_jax.weights.reference_libs import import_torchvision

_OUT = flags.DEFINE_string("out", None, "The pipeline directory to write (must not exist).")
_SEED = flags.DEFINE_integer("seed", 0, "Seed of the random weights.")
_WIDTH = flags.DEFINE_integer("width", 64, "The UNet's first level's channels.")
flags.mark_flag_as_required("out")

T5_WIDTH = 64


def caption_words() -> list[str]:
    """Every word of the packaged shapes prompt sets, sorted."""
    words = set()
    for name in prompt_sets.PROMPT_SETS:
        for record in prompt_sets.read(prompt_sets.packaged_path(name)):
            words.update(record.prompt.lower().split())
    return sorted(words)


def write_pipeline(out: str, *, seed: int = 0, width: int = 64) -> None:
    import_torchvision()
    import diffusers
    import torch
    import transformers

    pieces = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0), ("▁", -2.0)]
    pieces += [(c, -8.0) for c in string.ascii_letters + string.digits + string.punctuation]
    pieces += [("▁" + w, -1.0) for w in caption_words()]
    pieces += [(f"<extra_id_{i}>", 0.0) for i in range(2, -1, -1)]
    tokenizer = transformers.T5Tokenizer(vocab=pieces, extra_ids=3)
    torch.manual_seed(seed)
    text_encoder = transformers.T5EncoderModel(
        transformers.T5Config(
            vocab_size=len(tokenizer),
            d_model=T5_WIDTH,
            d_kv=16,
            d_ff=128,
            num_layers=2,
            num_heads=4,
            dropout_rate=0.0,
            feed_forward_proj="gated-gelu",
        )
    ).eval()
    unet = diffusers.UNet2DConditionModel(
        sample_size=32,
        in_channels=3,
        out_channels=6,  # eps and the learned variance's interpolation
        block_out_channels=(width, 2 * width, 2 * width),
        down_block_types=(
            "ResnetDownsampleBlock2D",
            "SimpleCrossAttnDownBlock2D",
            "SimpleCrossAttnDownBlock2D",
        ),
        up_block_types=(
            "SimpleCrossAttnUpBlock2D",
            "SimpleCrossAttnUpBlock2D",
            "ResnetUpsampleBlock2D",
        ),
        mid_block_type="UNetMidBlock2DSimpleCrossAttn",
        layers_per_block=2,
        norm_num_groups=32,
        act_fn="gelu",
        attention_head_dim=32,
        cross_attention_dim=2 * width,
        cross_attention_norm="group_norm",
        addition_embed_type="text",
        addition_embed_type_num_heads=4,
        encoder_hid_dim=T5_WIDTH,
        encoder_hid_dim_type="text_proj",
        resnet_time_scale_shift="scale_shift",
    ).eval()
    pipe = diffusers.IFPipeline(
        tokenizer=tokenizer,
        text_encoder=text_encoder,
        unet=unet,
        scheduler=diffusers.DDPMScheduler(
            beta_schedule="squaredcos_cap_v2",
            variance_type="learned_range",
            thresholding=True,
            dynamic_thresholding_ratio=0.95,
            sample_max_value=1.5,
        ),
        safety_checker=None,
        feature_extractor=None,
        watermarker=None,
        requires_safety_checker=False,
    )
    pipe.save_pretrained(out)
    params = sum(p.numel() for p in unet.parameters())
    with open(os.path.join(out, "random_pipeline.json"), "w") as f:
        json.dump(dict(seed=seed, width=width, unet_parameters=params), f, indent=2)
    print(f"{out}: IF stage I layout, UNet {params / 1e6:.2f} M parameters, T5 {T5_WIDTH} wide")


def main(argv):
    del argv
    if os.path.exists(_OUT.value):
        raise FileExistsError(f"--out={_OUT.value} exists; give a new directory")
    write_pipeline(_OUT.value, seed=_SEED.value, width=_WIDTH.value)


if __name__ == "__main__":
    app.run(main)
