"""proj/shapes/random_pipeline.py writes an IF stage I pipeline that the fine-tuning config
accepts and whose tokenizer gives every shapes word one piece."""

import importlib

from imagen_jax.pipelines import deepfloyd
from imagen_jax.proj.shapes import random_pipeline
from imagen_jax.text.config import make_text_encoder
from imagen_jax.training import state as state_lib


def test_the_random_pipeline_is_an_if_stage_1_that_the_finetune_config_takes(tmp_path):
    out = str(tmp_path / "random")
    random_pipeline.write_pipeline(out, seed=0, width=32)
    directory = deepfloyd.inspect_if_pipeline(out, "I")
    assert directory.unet.sample_size == 32 and directory.diffusion.variance == "learned_range"
    config = importlib.import_module("configs.if_finetune").get_config(
        f"pipeline={out},data=shapes,res=32"
    )
    net = state_lib.make_network(config.model)
    assert net.cfg.text_dim == random_pipeline.T5_WIDTH
    encoder = make_text_encoder(config.text)
    words = random_pipeline.caption_words()
    assert {"red", "circle", "above", "three"} <= set(words)
    ids = encoder.tokenizer(["a red circle above three blue squares"]).input_ids[0]
    assert list(ids).index(1) == 7  # seven words, seven pieces, then </s>
