"""The convolution with the matrix-product weight gradient against autodiff of
`lax.conv_general_dilated` on the same inputs, and its fallbacks."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from jax import lax

from imagen_jax.models import conv

NHWC = ("NHWC", "HWIO", "NHWC")


def _grads(fn, x, w, **kw):
    def loss(x, w):
        y = fn(x, w, (1, 1), kw.pop("padding", "SAME"), dimension_numbers=NHWC, **kw)
        return jnp.sum(y * jnp.cos(y))

    return jax.jit(jax.grad(loss, argnums=(0, 1)))(x, w)


def _inputs(shape, kernel, seed=0):
    rng = np.random.default_rng(seed)
    x = jnp.asarray(rng.standard_normal(shape), jnp.float32)
    w = jnp.asarray(0.1 * rng.standard_normal(kernel), jnp.float32)
    return x, w


def _everywhere(monkeypatch):
    """The matrix-product weight gradient for every shape, however small."""
    for name in ("MIN_IMAGE_PIXELS", "MIN_BATCH", "MIN_PIXELS", "MIN_IN_CHANNELS"):
        monkeypatch.setattr(conv, name, 1)


@pytest.mark.parametrize(
    "shape, kernel, padding",
    [
        ((2, 9, 7, 5), (3, 3, 5, 4), "SAME"),  # odd sizes, padding as a string
        ((3, 6, 6, 4), (3, 3, 4, 6), ((1, 1), (1, 1))),  # torch-style explicit padding
        ((2, 8, 5, 3), (5, 3, 3, 2), "SAME"),  # unequal kernel sides
        ((2, 5, 6, 7), (1, 1, 7, 3), ((0, 0), (0, 0))),  # 1x1
    ],
)
def test_weight_gradient_matches_autodiff(monkeypatch, shape, kernel, padding):
    _everywhere(monkeypatch)
    x, w = _inputs(shape, kernel)
    assert conv._matmul_weight_grad_pays(x.shape, w.shape)
    forward = lambda x, w: conv.conv_general_dilated(x, w, (1, 1), padding, dimension_numbers=NHWC)  # noqa: E731
    assert "custom_vjp" in str(jax.make_jaxpr(forward)(x, w))  # the gradient under test is ours
    y = forward(x, w)
    ref_y = lax.conv_general_dilated(x, w, (1, 1), padding, dimension_numbers=NHWC)
    np.testing.assert_array_equal(y, ref_y)  # the forward pass is lax's own
    ours = _grads(conv.conv_general_dilated, x, w, padding=padding)
    ref = _grads(lax.conv_general_dilated, x, w, padding=padding)
    for a, b in zip(ours, ref, strict=True):
        np.testing.assert_allclose(a, b, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("batch, groups", [(6, 3), (5, 1), (4, 4)])
def test_weight_gradient_in_groups_of_images(monkeypatch, batch, groups):
    # On one device the products are split over groups of images (at most MAX_GROUPS, a
    # divisor of the batch); the tests' 8 devices would otherwise always take one group.
    _everywhere(monkeypatch)
    monkeypatch.setattr(conv, "MAX_GROUPS", 4)
    monkeypatch.setattr(conv.jax, "device_count", lambda: 1)
    x, w = _inputs((batch, 7, 6, 5), (3, 3, 5, 4), seed=3)
    jaxpr = str(
        jax.make_jaxpr(jax.grad(lambda w: conv._conv_same(x, w, ((1, 1), (1, 1)), None).sum()))(w)
    )
    assert jaxpr.count("dot_general") == 9 * groups
    ours = _grads(conv.conv_general_dilated, x, w)
    for a, b in zip(ours, _grads(lax.conv_general_dilated, x, w), strict=True):
        np.testing.assert_allclose(a, b, atol=1e-5, rtol=1e-5)


def test_threshold_and_fallbacks(monkeypatch):
    assert conv._matmul_weight_grad_pays((8, 32, 32, 64), (3, 3, 64, 64))
    assert not conv._matmul_weight_grad_pays((16, 32, 32, 32), (3, 3, 32, 32))  # few channels
    assert not conv._matmul_weight_grad_pays((2, 64, 64, 128), (3, 3, 128, 64))  # few images
    assert not conv._matmul_weight_grad_pays((32, 16, 16, 128), (3, 3, 128, 128))  # small ones
    assert conv._matmul_weight_grad_pays((1, 4, 4, 8), (1, 1, 8, 8))  # 1x1: always
    # Strided, dilated, grouped and even-kernel convolutions go to lax unchanged (values and
    # gradients), as does every case when the custom gradient is switched off.
    monkeypatch.setattr(conv, "_conv_same", None)  # any use of the custom path would fail
    x, w = _inputs((2, 8, 8, 4), (3, 3, 4, 4), seed=1)
    for kw in (
        dict(window_strides=(2, 2)),
        dict(rhs_dilation=(2, 2)),
        dict(feature_group_count=2, rhs=w[:, :, :2]),
        dict(rhs=jnp.ones((2, 2, 4, 4))),
    ):
        rhs = kw.pop("rhs", w)
        args = dict(window_strides=(1, 1), padding="SAME", dimension_numbers=NHWC) | kw
        np.testing.assert_array_equal(
            conv.conv_general_dilated(x, rhs, **args), lax.conv_general_dilated(x, rhs, **args)
        )
    np.testing.assert_array_equal(
        conv.conv_general_dilated(
            x.astype(jnp.bfloat16), w.astype(jnp.bfloat16), (1, 1), "SAME", dimension_numbers=NHWC
        ),
        lax.conv_general_dilated(
            x.astype(jnp.bfloat16), w.astype(jnp.bfloat16), (1, 1), "SAME", dimension_numbers=NHWC
        ),
    )


def test_conv_module_has_nnx_conv_parameters():
    # Checkpoints of nnx.Conv load into conv.Conv: the same parameters, the same outputs.
    ours = conv.Conv(4, 6, (3, 3), rngs=nnx.Rngs(0))
    ref = nnx.Conv(4, 6, (3, 3), rngs=nnx.Rngs(0))
    a, b = nnx.state(ours, nnx.Param), nnx.state(ref, nnx.Param)
    assert jax.tree.structure(a) == jax.tree.structure(b)
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True):
        np.testing.assert_array_equal(x, y)
    x = jnp.ones((1, 5, 5, 4))
    np.testing.assert_allclose(ours(x), ref(x), rtol=1e-6)


def test_batch_sharded_over_devices(monkeypatch):
    # The weight gradient reduces per image, so a batch split over the 8 test devices needs
    # no exchange of pixels between them (only the all-reduce of the weight gradient), and
    # gives lax's gradient.
    _everywhere(monkeypatch)
    mesh = jax.sharding.Mesh(np.array(jax.devices()), ("data",))
    x, w = _inputs((len(jax.devices()), 6, 5, 4), (3, 3, 4, 3), seed=2)
    x = jax.device_put(x, jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec("data")))
    ours = _grads(conv.conv_general_dilated, x, w)
    for a, b in zip(ours, _grads(lax.conv_general_dilated, x, w), strict=True):
        np.testing.assert_allclose(a, b, atol=1e-5, rtol=1e-5)
    step = jax.jit(lambda x, w: _grads(conv.conv_general_dilated, x, w))
    hlo = step.lower(x, w).compile().as_text()
    assert "all-gather" not in hlo and "collective-permute" not in hlo
