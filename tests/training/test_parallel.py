"""Meshes, sharding rules and global batches; sharded training equals one-device training."""

import jax
import numpy as np
import pytest
from conftest import tiny
from jax.sharding import PartitionSpec as P

from imagen_jax import parallel
from imagen_jax.training import train_and_evaluate


def test_make_mesh_fills_minus_one():
    mesh = parallel.make_mesh([("data", -1), ("fsdp", 2)])
    assert dict(mesh.shape) == {"data": 4, "fsdp": 2}
    assert parallel.data_axes(mesh) == ("data", "fsdp")
    assert parallel.data_parallel_size(mesh) == 8
    one = parallel.make_mesh([("data", 1)], jax.devices()[:1])
    assert one.devices.size == 1


@pytest.mark.parametrize(
    "axes, match",
    [
        ([("data", 3)], "needs 3 devices"),
        ([("data", -1), ("fsdp", -1)], "at most one -1"),
        ([("data", -1), ("fsdp", 3)], "does not divide"),
        ([("batch", -1)], "unknown mesh axes"),
    ],
)
def test_bad_meshes_raise(axes, match):
    with pytest.raises(ValueError, match=match):
        parallel.make_mesh(axes)


def test_fsdp_rule_shards_largest_divisible_dim():
    mesh = parallel.make_mesh([("data", 2), ("fsdp", 4)])
    assert parallel.fsdp_spec((3, 3, 64, 128), mesh, min_size=0) == P(None, None, None, "fsdp")
    assert parallel.fsdp_spec((512, 6), mesh, min_size=0) == P("fsdp", None)
    assert parallel.fsdp_spec((3, 5), mesh, min_size=0) == P()  # nothing divisible
    assert parallel.fsdp_spec((256, 512), mesh) == P()  # below the default min_size
    no_fsdp = parallel.make_mesh([("data", -1)])
    assert parallel.fsdp_spec((1024, 1024), no_fsdp, min_size=0) == P()


def test_rules_first_match_wins():
    mesh = parallel.make_mesh([("data", 2), ("fsdp", 4)])
    tree = {
        "conv_in": {"kernel": jax.ShapeDtypeStruct((3, 3, 3, 64), np.float32)},
        "text_proj": {"kernel": jax.ShapeDtypeStruct((64, 64), np.float32)},
        "null_text": jax.ShapeDtypeStruct((1, 8, 64), np.float32),
    }
    rules = [("text_proj/.*", ("fsdp", None)), ("null_text", ()), (".*", "fsdp")]
    shardings = parallel.param_shardings(tree, mesh, rules, min_size=0)
    assert shardings["text_proj"]["kernel"].spec == P("fsdp", None)
    assert shardings["null_text"].spec == P()
    assert shardings["conv_in"]["kernel"].spec == P(None, None, None, "fsdp")
    assert "conv_in/kernel" in parallel.describe_shardings(tree, shardings)


def test_global_batch_shards_rows_and_drops_strings():
    mesh = parallel.make_mesh([("data", -1)])
    local = {"image": np.arange(8 * 2).reshape(8, 2), "caption": np.array(["a"] * 8, object)}
    batch = parallel.global_batch(local, mesh)
    assert set(batch) == {"image"}
    assert batch["image"].sharding.spec == P(("data",))
    np.testing.assert_array_equal(np.asarray(batch["image"]), local["image"])


def _params(state):
    return jax.tree.map(np.asarray, jax.device_get(state.params))


@pytest.fixture(scope="module")
def one_device_run(tmp_path_factory):
    config = tiny(steps=3, mesh=[("data", 1)])
    return train_and_evaluate(config, str(tmp_path_factory.mktemp("one")))


@pytest.mark.parametrize(
    "mesh, min_size", [([("data", -1)], 2**18), ([("data", 4), ("fsdp", 2)], 0)]
)
def test_eight_devices_match_one(one_device_run, mesh, min_size, tmp_path):
    config = tiny(steps=3, mesh=mesh, fsdp_min_size=min_size)
    state, metrics = train_and_evaluate(config, str(tmp_path))
    if min_size == 0:  # every kernel with a dimension divisible by 2 is sharded
        spec = state.params["conv_in"]["kernel"].sharding.spec
        assert "fsdp" in tuple(spec)
        assert state.opt_state[1][0].mu["conv_in"]["kernel"].sharding.spec == spec
    ref_state, ref_metrics = one_device_run
    assert len(ref_state.params["conv_in"]["kernel"].sharding.device_set) == 1
    np.testing.assert_allclose(metrics["loss"], ref_metrics["loss"], rtol=1e-5)
    jax.tree.map(
        lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6),
        _params(state),
        _params(ref_state),
    )
