"""Low-rank adapters on the project's own stages (`model.lora`, `train.init_from`): the run
trains and checkpoints the adapters alone, its network starts as the stage it adapts, a
resumed run equals the uninterrupted one bitwise, the export is the stage with the adapters
merged in, and a run of adapters without weights to adapt is refused by name.
"""

import shutil

import numpy as np
import pytest
from conftest import assert_same_tree, host_tree, tiny
from flax.nnx import traversals
from safetensors.numpy import load_file

from imagen_jax import stages
from imagen_jax.models import lora
from imagen_jax.training import export, train_and_evaluate
from imagen_jax.training import state as state_lib


@pytest.fixture(scope="module")
def adapted(tmp_path_factory):
    """A stage (3 steps of the runlocal base, exported in float32), then two steps of rank-2
    adapters on it at a learning rate that moves them far."""
    root = tmp_path_factory.mktemp("lora_stage")
    train_and_evaluate(tiny(steps=3), str(root / "base_run"))
    stage = export.export_stage(
        tiny(steps=3), str(root / "base_run"), str(root / "stage"), storage_dtype="float32"
    )
    config = tiny(steps=2, checkpoint_every=1)
    config.model.lora.rank = 2
    config.model.lora.alpha = 4.0
    config.optim.lr = 0.05
    config.train.init_from = stage
    state, metrics = train_and_evaluate(config, str(root / "run"))
    return config, state, root


def test_adapters_alone_train_on_the_frozen_stage(adapted):
    config, state, root = adapted
    flat = traversals.flatten_mapping(host_tree(state.params))
    assert {p[-1] for p in flat} == {lora.DOWN, lora.UP}
    names = {".".join(map(str, p[:-1])) for p in flat}
    assert names and all(n.split(".")[-2] in ("self_attn", "cross_attn") for n in names)
    assert max(np.abs(x).max() for p, x in flat.items() if p[-1] == lora.UP) > 1e-2


def test_the_export_is_the_stage_with_the_adapters_merged(adapted, tmp_path):
    config, state, root = adapted
    out = export.export_stage(config, str(root / "run"), str(tmp_path), storage_dtype="float32")
    got = load_file(f"{out}/params.safetensors")
    base = load_file(root / "stage" / "params.safetensors")
    assert got.keys() == base.keys()
    net = state_lib.make_network(config.model)
    ema = host_tree(state.ema_params)
    changed = 0
    for path in net.lora.paths:
        key = "/".join(map(str, path))
        down = traversals.flatten_mapping(ema)[path[:-1] + (lora.DOWN,)]
        up = traversals.flatten_mapping(ema)[path[:-1] + (lora.UP,)]
        want = base[key] + 2.0 * down @ up  # alpha / rank = 4 / 2
        np.testing.assert_allclose(got[key], want, rtol=1e-5, atol=1e-6)
        changed += int(np.abs(got[key] - base[key]).max() > 1e-3)
    assert changed >= len(net.lora.paths) // 2  # the adapters moved the weights
    untouched = set(base) - {"/".join(map(str, p)) for p in net.lora.paths}
    assert all(np.array_equal(got[k], base[k]) for k in untouched)
    stages.load_stage(out)  # a stage directory like any other


def test_resumed_adapter_run_matches_the_uninterrupted_one(adapted, tmp_path):
    config, state, root = adapted
    shutil.copytree(root / "run" / "checkpoints" / "1", tmp_path / "checkpoints" / "1")
    resumed, _ = train_and_evaluate(config, str(tmp_path))
    assert_same_tree(resumed, state)


def test_adapters_need_weights_to_adapt(tmp_path):
    config = tiny(steps=1)
    config.model.lora.rank = 2
    with pytest.raises(ValueError, match="set train.init_from"):
        train_and_evaluate(config, str(tmp_path))
    config.model.lora.targets = "nothing_here$"
    with pytest.raises(ValueError, match="matches no layer"):
        state_lib.make_network(config.model)
