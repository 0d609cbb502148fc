"""Parity of our encoders with transformers' PyTorch models on tiny random configs.

Each reference is built from a tiny config with a fixed seed, saved with `save_pretrained`,
loaded through our loader, and run on the same ids and masks (with padding). Float32 outputs
must agree within 1e-4: the last hidden state, the penultimate hidden state, every other
hidden state, and the pooled output where the model has one.
"""

import jax.numpy as jnp
import numpy as np
import pytest
import torch
import transformers
from transformers.models.t5.modeling_t5 import T5Attention

from imagen_jax import text
from imagen_jax.text import t5

TOL = 1e-4
LENGTHS = [12, 5, 1, 9]
L = 12


def run_reference(model, ids, mask):
    kw = {} if mask is None else dict(attention_mask=torch.from_numpy(mask))
    with torch.no_grad():
        out = model(torch.from_numpy(ids), output_hidden_states=True, **kw)
    pooled = getattr(out, "text_embeds", None)
    if pooled is None:
        pooled = getattr(out, "pooler_output", None)
    return out.last_hidden_state.numpy(), [h.numpy() for h in out.hidden_states], pooled


def compare(ours, ref):
    last, hidden, pooled = ref
    errors = {"last": np.abs(np.asarray(ours.last_hidden_state) - last).max()}
    assert len(ours.hidden_states) == len(hidden)
    errors["penultimate"] = np.abs(np.asarray(ours.hidden_states[-2]) - hidden[-2]).max()
    errors["all_hidden"] = max(
        np.abs(np.asarray(a) - b).max() for a, b in zip(ours.hidden_states, hidden, strict=True)
    )
    if pooled is not None:
        assert ours.pooled is not None
        errors["pooled"] = np.abs(np.asarray(ours.pooled) - pooled.numpy()).max()
    else:
        assert ours.pooled is None
    assert max(errors.values()) < TOL, errors
    print({k: f"{v:.2e}" for k, v in errors.items()})
    return errors


CASES = {
    # name: (our kind, input kwargs, pass the mask)
    "t5": ("t5", dict(pad_id=0, eos_id=1), True),
    "t5_v1_1": ("t5", dict(pad_id=0, eos_id=1), True),
    "umt5": ("t5", dict(pad_id=0, eos_id=1), True),
    "clip": ("clip", dict(pad_id=98, eos_id=98), True),
    "clip_projection": ("clip", dict(pad_id=1, eos_id=98), True),
    "bert": ("bert", dict(pad_id=0), True),
}


@pytest.mark.parametrize("name", list(CASES))
def test_parity_float32(name, tmp_path, make_tiny, make_inputs):
    kind, input_kw, with_mask = CASES[name]
    ref_model = make_tiny(name, tmp_path)
    ours = text.load_model(tmp_path, kind)
    ids, mask = make_inputs(LENGTHS, L, **input_kw)
    out = ours(jnp.asarray(ids), jnp.asarray(mask))
    compare(out, run_reference(ref_model, ids, mask))


@pytest.mark.parametrize("eos_token_id", [2, 97])
def test_clip_without_mask_and_eos_rules(eos_token_id, tmp_path, make_tiny, make_inputs):
    """Stable Diffusion's way (no attention mask, EOS as padding) and both pooling rules:
    the legacy eos_token_id == 2 takes the largest id (the first if repeated)."""
    ref_model = make_tiny("clip_projection", tmp_path, eos_token_id=eos_token_id)
    ours = text.load_model(tmp_path, "clip")
    pad = 98 if eos_token_id == 2 else eos_token_id
    ids, _ = make_inputs(LENGTHS, L, pad_id=pad, eos_id=pad, high=90)
    compare(ours(jnp.asarray(ids)), run_reference(ref_model, ids, None))


def test_relative_position_buckets_match_transformers():
    rel = np.arange(-300, 301, dtype=np.int64)
    for buckets, max_distance in [(32, 128), (8, 12), (16, 20), (64, 256)]:
        for bidirectional in (True, False):
            ref = T5Attention._relative_position_bucket(
                torch.from_numpy(rel), bidirectional, buckets, max_distance
            ).numpy()
            ours = t5.relative_position_bucket(
                rel, bidirectional=bidirectional, num_buckets=buckets, max_distance=max_distance
            )
            np.testing.assert_array_equal(ours, ref)


def test_sharded_checkpoint_loads(tmp_path, make_tiny, make_inputs):
    ref_model = make_tiny("t5_v1_1", tmp_path, max_shard_size="20KB")
    assert (tmp_path / "model.safetensors.index.json").exists()
    assert len(list(tmp_path.glob("model-*.safetensors"))) > 1
    ids, mask = make_inputs(LENGTHS, L, pad_id=0, eos_id=1)
    out = text.load_model(tmp_path, "t5")(jnp.asarray(ids), jnp.asarray(mask))
    compare(out, run_reference(ref_model, ids, mask))


def test_encoder_from_full_t5_checkpoint(tmp_path, make_tiny, make_inputs):
    """A T5ForConditionalGeneration checkpoint: decoder and lm_head are unused by design."""
    ref_model = make_tiny("t5_full", tmp_path)
    ids, mask = make_inputs(LENGTHS, L, pad_id=0, eos_id=1)
    out = text.load_model(tmp_path, "t5")(jnp.asarray(ids), jnp.asarray(mask))
    with torch.no_grad():
        ref = ref_model.encoder(
            torch.from_numpy(ids), attention_mask=torch.from_numpy(mask), output_hidden_states=True
        )
    compare(out, (ref.last_hidden_state.numpy(), [h.numpy() for h in ref.hidden_states], None))


def test_text_tower_of_full_clip_model(tmp_path, make_tiny, make_inputs):
    """A CLIPModel checkpoint (model_type "clip"): its vision tower is unused by design."""
    text_config = make_tiny("clip", None, hidden_act="gelu").config.to_dict()
    config = transformers.CLIPConfig(
        text_config=text_config,
        vision_config=dict(
            hidden_size=16,
            intermediate_size=24,
            num_hidden_layers=1,
            num_attention_heads=2,
            image_size=8,
            patch_size=4,
        ),
        projection_dim=20,
    )
    torch.manual_seed(0)
    ref_model = transformers.CLIPModel(config).eval()
    ref_model.save_pretrained(tmp_path)
    ours = text.load_model(tmp_path, "clip")
    ids, mask = make_inputs(LENGTHS, L, pad_id=98, eos_id=98)
    out = ours(jnp.asarray(ids), jnp.asarray(mask))
    with torch.no_grad():
        t = ref_model.text_model(
            torch.from_numpy(ids), attention_mask=torch.from_numpy(mask), output_hidden_states=True
        )
        pooled = ref_model.text_projection(t.pooler_output)
    compare(out, (t.last_hidden_state.numpy(), [h.numpy() for h in t.hidden_states], pooled))
