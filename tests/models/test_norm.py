"""The CPU group norm against torch's group_norm in float64 and flax's `nnx.GroupNorm`
(two-pass variance) on the same inputs and parameters: values, gradients, its fallbacks,
and that checkpoints fit both."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from flax import nnx

from imagen_jax.models import norm


def _pair(channels, groups, **kw):
    ours = norm.GroupNorm(channels, num_groups=groups, use_fast_variance=False, **kw)
    ref = nnx.GroupNorm(channels, num_groups=groups, use_fast_variance=False, **kw)
    rng = np.random.default_rng(0)
    for module in (ours, ref):  # the same non-trivial scale and bias on both
        if module.scale is not None:
            module.scale[...] = jnp.asarray(1 + 0.3 * rng.standard_normal(channels), jnp.float32)
            rng = np.random.default_rng(0)
        if module.bias is not None:
            module.bias[...] = jnp.asarray(0.2 * rng.standard_normal(channels), jnp.float32)
            rng = np.random.default_rng(0)
    return ours, ref


def _torch_float64(x, groups, scale, bias, epsilon):
    """torch.nn.functional.group_norm in float64: values and d sum(y sin y) / dx."""
    tx = torch.tensor(np.moveaxis(np.asarray(x, np.float64), -1, 1)).requires_grad_()
    as64 = lambda p: None if p is None else torch.tensor(np.asarray(p, np.float64))  # noqa: E731
    y = torch.nn.functional.group_norm(tx, groups, as64(scale), as64(bias), eps=epsilon)
    (y * torch.sin(y)).sum().backward()
    return np.moveaxis(y.detach().numpy(), 1, -1), np.moveaxis(tx.grad.numpy(), 1, -1)


@pytest.mark.parametrize(
    "shape, groups, kw",
    [
        ((2, 8, 6, 32), 8, {}),
        ((3, 5, 5, 12), 4, dict(epsilon=1e-6)),
        ((2, 7, 16), 16, dict(use_bias=False)),  # [B, L, C]: a sequence
        ((1, 4, 4, 2, 8), 2, dict(use_scale=False)),  # two spatial axes and a third
    ],
)
def test_matches_torch_float64_and_flax(shape, groups, kw):
    ours, ref = _pair(shape[-1], groups, rngs=nnx.Rngs(0), **kw)
    rng = np.random.default_rng(1)
    # An offset larger than the spread: the two-pass variance keeps its precision.
    x = jnp.asarray(5 + rng.standard_normal(shape) * np.linspace(0.5, 2, shape[-1]), jnp.float32)
    scale = None if ours.scale is None else ours.scale[...]
    bias = None if ours.bias is None else ours.bias[...]
    want, want_dx = _torch_float64(x, groups, scale, bias, ours.epsilon)

    def grads(module):
        graph, params = nnx.split(module)

        def loss(params, x):
            y = nnx.merge(graph, params)(x)
            return jnp.sum(y * jnp.sin(y))

        return jax.grad(loss, argnums=(0, 1))(params, x)

    np.testing.assert_allclose(ours(x), want, atol=1e-5)
    (ours_p, ours_dx), (ref_p, _) = grads(ours), grads(ref)
    np.testing.assert_allclose(ours_dx, want_dx, atol=1e-4)
    # flax's own GroupNorm: the same values and parameter gradients to float32 rounding.
    np.testing.assert_allclose(ours(x), ref(x), atol=1e-5)
    for a, b in zip(jax.tree.leaves(ours_p), jax.tree.leaves(ref_p), strict=True):
        np.testing.assert_allclose(a, b, atol=1e-4, rtol=1e-4)


def test_cpu_path_is_taken_and_fallbacks(monkeypatch):
    ours, ref = _pair(8, 2, rngs=nnx.Rngs(0))
    x = jnp.asarray(np.random.default_rng(2).standard_normal((2, 4, 4, 8)), jnp.float32)
    calls = []
    monkeypatch.setattr(norm, "group_norm", lambda *a, **k: calls.append(1) or jnp.zeros(()))
    ours(x)
    assert calls == [1]  # float32 on the CPU: ours
    mask = jnp.ones((2, 4, 4, 8), bool)
    np.testing.assert_array_equal(ours(x, mask=mask), ref(x, mask=mask))
    low = x.astype(jnp.bfloat16)
    np.testing.assert_array_equal(ours(low), ref(low))
    assert calls == [1]  # masks and bfloat16 went to flax


def test_same_parameters_as_flax():
    ours = norm.GroupNorm(16, num_groups=4, rngs=nnx.Rngs(0))
    ref = nnx.GroupNorm(16, num_groups=4, rngs=nnx.Rngs(0))
    a, b = nnx.state(ours, nnx.Param), nnx.state(ref, nnx.Param)
    assert jax.tree.structure(a) == jax.tree.structure(b)
