"""The blockwise attention against `jax.nn.dot_product_attention` (the "xla" path), on the
same inputs: values, gradients, bias, masks, query blocks, bfloat16."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from imagen_jax.models import attention


def _qkv(b, lq, lk, n, d, seed=0, dtype=jnp.float32):
    rng = np.random.default_rng(seed)
    q = rng.standard_normal((b, lq, n, d)).astype(np.float32)
    k, v = (rng.standard_normal((b, lk, n, d)).astype(np.float32) for _ in range(2))
    return tuple(jnp.asarray(x, dtype) for x in (q, k, v))


def _both(q, k, v, **kw):
    run = lambda impl: attention.dot_product_attention(q, k, v, implementation=impl, **kw)  # noqa: E731
    return jax.jit(lambda: run("blockwise"))(), jax.jit(lambda: run("xla"))()


@pytest.mark.parametrize("shape", [(2, 64, 64, 4, 8), (3, 50, 7, 2, 16), (1, 16, 16, 1, 32)])
def test_blockwise_matches_xla(shape):
    ours, ref = _both(*_qkv(*shape))
    assert ours.shape == ref.shape == shape[:2] + shape[3:]
    np.testing.assert_allclose(ours, ref, atol=2e-6, rtol=1e-5)


def test_query_blocks(monkeypatch):
    # 4096 scores per block, 64 keys: the largest divisor of 96 queries that is <= 64 is 48.
    monkeypatch.setattr(attention, "BLOCK_SCORES", 4096)
    assert attention._query_block(96, 64) == 48
    assert attention._query_block(64, 64) == 64
    assert attention._query_block(7, 4096) == 1
    ours, ref = _both(*_qkv(2, 96, 64, 3, 8, seed=1))
    np.testing.assert_allclose(ours, ref, atol=2e-6, rtol=1e-5)


def test_bias_and_mask():
    q, k, v = _qkv(2, 12, 9, 2, 8, seed=2)
    bias = jnp.asarray(np.random.default_rng(3).standard_normal((2, 9)), jnp.float32)
    ours, ref = _both(q, k, v, bias=bias)
    np.testing.assert_allclose(ours, ref, atol=2e-6, rtol=1e-5)
    # Second example: every key masked, which both sides answer with uniform weights.
    mask = jnp.asarray([[True] * 5 + [False] * 4, [False] * 9])
    ours, ref = _both(q, k, v, mask=mask)
    np.testing.assert_allclose(ours, ref, atol=2e-6, rtol=1e-5)
    np.testing.assert_allclose(ours[1], jnp.broadcast_to(v[1].mean(0), ours[1].shape), atol=1e-6)
    # The masked keys are really left out: changing them changes nothing.
    v2 = v.at[0, 5:].set(100.0)
    np.testing.assert_array_equal(
        attention.dot_product_attention(q, k, v2, mask=mask, implementation="blockwise")[0],
        ours[0],
    )


def test_gradients_match(monkeypatch):
    monkeypatch.setattr(attention, "BLOCK_SCORES", 32 * 40)
    q, k, v = _qkv(2, 64, 40, 2, 8, seed=4)
    bias = jnp.linspace(-1.0, 1.0, 2 * 40).reshape(2, 40)

    def grads(impl):
        def loss(q, k, v, bias):
            out = attention.dot_product_attention(q, k, v, bias=bias, implementation=impl)
            return jnp.sum(out * jnp.cos(out))

        return jax.jit(jax.grad(loss, argnums=(0, 1, 2, 3)))(q, k, v, bias)

    for ours, ref in zip(grads("blockwise"), grads("xla"), strict=True):
        np.testing.assert_allclose(ours, ref, atol=1e-5, rtol=1e-4)


def test_gradients_with_masks_and_bfloat16(monkeypatch):
    # The custom backward pass (recomputed weights from the saved log-sum-exp) against
    # autodiff of the one-piece path, with masked keys and a query block per 8 queries.
    monkeypatch.setattr(attention, "BLOCK_SCORES", 8 * 9)
    q, k, v = _qkv(2, 16, 9, 2, 8, seed=6)
    mask = jnp.asarray([[True] * 5 + [False] * 4, [False] * 9])  # 2nd example: all masked

    def grads(impl, q, k, v):
        def loss(q, k, v):
            out = attention.dot_product_attention(q, k, v, mask=mask, implementation=impl)
            return jnp.sum(out.astype(jnp.float32) ** 2)

        return jax.jit(jax.grad(loss, argnums=(0, 1, 2)))(q, k, v)

    for ours, ref in zip(grads("blockwise", q, k, v), grads("xla", q, k, v), strict=True):
        np.testing.assert_allclose(ours, ref, atol=1e-5, rtol=1e-4)
    ours = grads("blockwise", q, k, v)
    assert float(jnp.abs(ours[1][0, 5:]).max()) == 0.0  # masked keys get no gradient
    low = tuple(x.astype(jnp.bfloat16) for x in (q, k, v))
    for ours, ref in zip(grads("blockwise", *low), grads("xla", *low), strict=True):
        assert ours.dtype == jnp.bfloat16
        scale = float(jnp.abs(ref.astype(jnp.float32)).max())
        np.testing.assert_allclose(
            np.asarray(ours, np.float32), np.asarray(ref, np.float32), atol=2e-2 * scale
        )


def test_bfloat16_keeps_dtype_and_float32_softmax():
    q, k, v = _qkv(2, 32, 32, 2, 16, seed=5, dtype=jnp.bfloat16)
    ours, ref = _both(q, k, v)
    assert ours.dtype == jnp.bfloat16
    np.testing.assert_allclose(
        np.asarray(ours, np.float32), np.asarray(ref, np.float32), atol=2e-2, rtol=2e-2
    )


def test_auto_choice_and_unknown_is_named(monkeypatch):
    q, k, v = _qkv(1, 8, 8, 1, 4)
    run = lambda impl="auto": attention.dot_product_attention(q, k, v, implementation=impl)  # noqa: E731
    assert jax.default_backend() == "cpu"
    np.testing.assert_array_equal(run(), run("xla"))  # 64 scores: short, "xla"
    monkeypatch.setattr(attention, "BLOCKWISE_MIN_SCORES", 64)
    np.testing.assert_array_equal(run(), run("xla"))  # 8 keys: still short
    monkeypatch.setattr(attention, "BLOCKWISE_MIN_KEYS", 8)
    np.testing.assert_array_equal(run(), run("blockwise"))
    with pytest.raises(ValueError, match="'flash'"):
        attention.dot_product_attention(q, k, v, implementation="flash")


def test_auto_takes_cudnn_on_a_gpu_for_unmasked_half_precision(monkeypatch):
    calls = []

    def recorder(q, k, v, **kw):
        calls.append(kw.get("implementation"))
        return q

    monkeypatch.setattr(jax, "default_backend", lambda: "gpu")
    monkeypatch.setattr(jax.nn, "dot_product_attention", recorder)
    q, k, v = _qkv(1, 16, 16, 2, 64)
    half = [x.astype(jnp.bfloat16) for x in (q, k, v)]
    attention.dot_product_attention(*half)
    attention.dot_product_attention(q, k, v)  # float32: the one-piece path
    attention.dot_product_attention(*half, mask=jnp.ones((1, 16), bool))  # masked: one piece
    big = [x.astype(jnp.bfloat16) for x in _qkv(1, 4, 4, 1, 256)]  # head size over 128
    attention.dot_product_attention(*big)
    assert calls == ["cudnn", None, None, None]

    def refuses(q, k, v, implementation=None, **kw):  # cuDNN refusing a shape at trace time
        calls.append(implementation)
        if implementation == "cudnn":
            raise NotImplementedError("not this shape")
        return q

    monkeypatch.setattr(jax.nn, "dot_product_attention", refuses)
    calls.clear()
    attention.dot_product_attention(*half)
    assert calls == ["cudnn", None]  # "auto" falls back to the one-piece path
    with pytest.raises(ValueError, match="'cudnn'.*without bias or mask"):
        attention.dot_product_attention(*half, mask=jnp.ones((1, 16), bool), implementation="cudnn")
