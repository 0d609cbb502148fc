"""The loader's strictness: every bad directory fails with a message naming the problem."""

import json
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import safetensors.numpy
import safetensors.torch
import torch
from flax import nnx

from imagen_jax import text
from imagen_jax.weights import Checkpoint, CheckpointError, read_safetensors_header

WEIGHTS = "model.safetensors"


def rewrite(path, edit):
    """Applies edit(tensors: dict[str, np.ndarray]) to the checkpoint's single file."""
    tensors = safetensors.numpy.load_file(path / WEIGHTS)
    edit(tensors)
    safetensors.numpy.save_file(tensors, path / WEIGHTS, metadata={"format": "pt"})


def test_directory_without_weights(tmp_path, make_tiny):
    make_tiny("bert", tmp_path)
    (tmp_path / WEIGHTS).unlink()
    with pytest.raises(CheckpointError, match=f"no weights in {re.escape(str(tmp_path))}"):
        text.load_model(tmp_path, "bert")


def test_directory_without_config_or_missing(tmp_path):
    with pytest.raises(CheckpointError, match="has no config.json"):
        text.load_model(tmp_path, "bert")
    with pytest.raises(CheckpointError, match="is not a directory"):
        text.load_model(tmp_path / "nowhere", "bert")


def test_pytorch_bin_only_is_named(tmp_path, make_tiny):
    make_tiny("bert", tmp_path)
    (tmp_path / WEIGHTS).rename(tmp_path / "pytorch_model.bin")
    with pytest.raises(CheckpointError, match="found pytorch_model.bin"):
        text.load_model(tmp_path, "bert")


def test_config_of_another_architecture(tmp_path, make_tiny):
    make_tiny("bert", tmp_path)
    with pytest.raises(CheckpointError) as e:
        text.load_model(tmp_path, "t5")
    msg = str(e.value)
    assert "model_type 'bert'" in msg and "BertModel" in msg and "not a 't5' encoder" in msg
    with pytest.raises(ValueError, match="unknown text encoder kind 'gpt'"):
        text.load_model(tmp_path, "gpt")


def test_kind_is_inferred_from_model_type(tmp_path, make_tiny):
    make_tiny("umt5", tmp_path)
    model = text.load_model(tmp_path)
    assert isinstance(model, text.T5Encoder) and model.config.per_layer_position_bias


def test_missing_shard_is_named(tmp_path, make_tiny):
    make_tiny("t5_v1_1", tmp_path, max_shard_size="20KB")
    shards = sorted(tmp_path.glob("model-*.safetensors"))
    shards[1].unlink()
    with pytest.raises(CheckpointError, match=f"missing from .*{shards[1].name}"):
        text.load_model(tmp_path, "t5")


def test_missing_unexpected_and_misshaped_are_all_named(tmp_path, make_tiny):
    make_tiny("t5_v1_1", tmp_path)

    def edit(t):
        del t["encoder.block.1.layer.1.DenseReluDense.wi_0.weight"]
        t["encoder.block.0.layer.0.SelfAttention.extra.weight"] = np.zeros((2, 2), np.float32)
        t["encoder.block.2.layer.0.SelfAttention.q.weight"] = np.zeros((32, 31), np.float32)

    rewrite(tmp_path, edit)
    with pytest.raises(CheckpointError) as e:
        text.load_model(tmp_path, "t5")
    msg = str(e.value)
    assert "1 missing: encoder.block.1.layer.1.DenseReluDense.wi_0.weight" in msg
    assert "1 unexpected: encoder.block.0.layer.0.SelfAttention.extra.weight" in msg
    assert (
        "encoder.block.2.layer.0.SelfAttention.q.weight: checkpoint (32, 31), expected (32, 32)"
        in msg
    )


def test_allow_missing_and_unexpected(tmp_path, make_tiny, caplog):
    make_tiny("clip_projection", tmp_path)

    def edit(t):
        del t["text_projection.weight"]
        t["text_model.extra"] = np.zeros((3,), np.float32)

    rewrite(tmp_path, edit)
    with pytest.raises(CheckpointError, match="missing: text_projection.weight"):
        text.load_model(tmp_path, "clip")
    model = text.load_model(
        tmp_path,
        "clip",
        allow_missing=[r"text_projection\.weight"],
        allow_unexpected=[r"text_model\.extra"],
    )
    assert model.text_projection.kernel.shape == (32, 24)
    assert "text_projection.weight is missing" in caplog.text


def test_buffers_and_tied_copies_are_accepted(tmp_path, make_tiny):
    """Older checkpoints hold position_ids buffers; T5 may hold both tied embedding names."""
    make_tiny("t5_v1_1", tmp_path)

    def edit(t):
        t["encoder.embed_tokens.weight"] = t["shared.weight"].copy()

    rewrite(tmp_path, edit)
    text.load_model(tmp_path, "t5")
    make_tiny("bert", tmp_path / "bert")
    rewrite(
        tmp_path / "bert",
        lambda t: t.update({"embeddings.position_ids": np.arange(24, dtype=np.int64)[None]}),
    )
    text.load_model(tmp_path / "bert", "bert")


@pytest.mark.parametrize("stored", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_dtypes(stored, dtype, tmp_path, make_tiny):
    """Stored float32 or bfloat16, loaded as either: every parameter has the chosen dtype."""
    model = make_tiny("bert", None)
    safetensors.torch.save_file(
        {k: v.to(stored).contiguous() for k, v in model.state_dict().items()},
        tmp_path / WEIGHTS,
        metadata={"format": "pt"},
    )
    model.config.to_json_file(tmp_path / "config.json")
    ours = text.load_model(tmp_path, "bert", dtype=dtype)
    leaves = jax.tree.leaves(nnx.state(ours, nnx.Param))
    assert {x.dtype for x in leaves} == {jnp.dtype(dtype)}
    ref = model.embeddings.word_embeddings.weight.detach().to(stored).float().numpy()
    got = np.asarray(ours.word_embeddings.embedding[...], np.float32)
    np.testing.assert_allclose(got, ref, rtol=1e-2 if dtype == jnp.bfloat16 else 0)


def test_safetensors_reader(tmp_path):
    tensors = {"a": torch.randn(3, 4).to(torch.bfloat16), "b": torch.arange(5), "c": torch.ones(0)}
    safetensors.torch.save_file(tensors, tmp_path / WEIGHTS)
    header = read_safetensors_header(str(tmp_path / WEIGHTS))
    assert header["a"].dtype == "BF16" and header["a"].shape == (3, 4)
    np.testing.assert_array_equal(header["a"].read().astype(np.float32), tensors["a"].float())
    np.testing.assert_array_equal(header["b"].read(), np.arange(5))
    assert header["c"].read().shape == (0,)
    assert set(Checkpoint(tmp_path)) == {"a", "b", "c"}
    (tmp_path / "bad").mkdir()
    (tmp_path / "bad" / WEIGHTS).write_bytes(b"\x05\x00\x00\x00\x00\x00\x00\x00{oops")
    with pytest.raises(CheckpointError, match="not a safetensors file"):
        Checkpoint(tmp_path / "bad")


def test_index_naming_absent_tensor(tmp_path, make_tiny):
    make_tiny("t5_v1_1", tmp_path, max_shard_size="20KB")
    index = tmp_path / "model.safetensors.index.json"
    data = json.loads(index.read_text())
    data["weight_map"]["encoder.ghost.weight"] = next(iter(data["weight_map"].values()))
    index.write_text(json.dumps(data))
    with pytest.raises(CheckpointError, match="shards lack: encoder.ghost.weight"):
        text.load_model(tmp_path, "t5")


def test_unsupported_model_type_is_named(tmp_path, make_tiny):
    make_tiny("bert", tmp_path)
    config = json.loads((tmp_path / "config.json").read_text())
    (tmp_path / "config.json").write_text(json.dumps({**config, "model_type": "roberta"}))
    with pytest.raises(CheckpointError, match="model_type 'roberta' is not a supported"):
        text.load_model(tmp_path)
