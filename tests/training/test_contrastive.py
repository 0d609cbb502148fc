"""The contrastive losses: a float64 NumPy reference, and 8 simulated devices (the batch
sharded over "data") equal to 1 device, values and gradients. (transformers' own losses on
real towers: tests/models/test_two_towers.py.)"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from scipy.special import log_expit, logsumexp

from imagen_jax import parallel
from imagen_jax.training import contrastive

BATCH, DIM = 16, 8  # 2 examples per device on 8
# float32 against float64: the losses are sums of B^2 = 256 terms of size ~10.
LOSS_RTOL = 2e-6
GRAD_ATOL = 2e-6  # gradients are O(1 / B)


def reference(loss, img, txt, scale, bias):
    """The loss in float64 NumPy, written from the papers' formulas."""
    logits = np.exp(scale) * img @ txt.T  # [B, B], rows: images
    n = len(img)
    if loss == "softmax":
        i2t = logsumexp(logits, axis=1) - np.diag(logits)
        t2i = logsumexp(logits, axis=0) - np.diag(logits)
        return 0.5 * (i2t.mean() + t2i.mean())
    z = 2 * np.eye(n) - 1
    return -log_expit(z * (logits + bias)).sum(axis=1).mean()


def numeric_grad(f, x, eps=1e-6):
    """Central differences of a float64 function, entry by entry."""
    x = np.array(x, np.float64)
    grad = np.zeros_like(x)
    for i in np.ndindex(x.shape):
        hi, lo = x.copy(), x.copy()
        hi[i] += eps
        lo[i] -= eps
        grad[i] = (f(hi) - f(lo)) / (2 * eps)
    return grad


def embeddings(seed=0):
    rng = np.random.default_rng(seed)
    img, txt = rng.normal(size=(2, BATCH, DIM))
    txt = img + 1.5 * txt  # matching pairs are more alike than others
    norm = lambda x: x / np.linalg.norm(x, axis=-1, keepdims=True)  # noqa: E731
    return norm(img), norm(txt)


PARAMS = {
    "softmax": dict(logit_scale=np.log(10.0)),
    "sigmoid": dict(logit_scale=np.log(10.0), logit_bias=-5.0),
}


def run(loss, mesh, img, txt, params):
    """(loss, grads wrt image, text embeddings and the scale (and bias)) jitted on `mesh`
    with the batch sharded over its data axis."""
    batch, rep = parallel.batch_sharding(mesh), parallel.replicated(mesh)

    def f(img, txt, params):
        return contrastive.contrastive_loss(loss, img, txt, **params, mesh=mesh)

    step = jax.jit(jax.value_and_grad(f, argnums=(0, 1, 2)), in_shardings=(batch, batch, rep))
    params = {k: jnp.float32(v) for k, v in params.items()}
    value, grads = step(jnp.float32(img), jnp.float32(txt), params)
    assert grads[0].sharding.spec == batch.spec  # the batch stayed sharded
    return float(value), jax.tree.map(np.asarray, grads)


@pytest.mark.parametrize("loss", contrastive.LOSSES)
def test_loss_on_8_devices_equals_1_device_and_float64(loss):
    assert len(jax.devices()) == 8
    img, txt = embeddings()
    params = PARAMS[loss]
    scale, bias = params["logit_scale"], params.get("logit_bias", 0.0)
    want = reference(loss, img, txt, scale, bias)
    want_grads = (
        numeric_grad(lambda x: reference(loss, x, txt, scale, bias), img),
        numeric_grad(lambda x: reference(loss, img, x, scale, bias), txt),
        {
            "logit_scale": numeric_grad(lambda s: reference(loss, img, txt, s, bias), scale),
            **(
                {"logit_bias": numeric_grad(lambda b: reference(loss, img, txt, scale, b), bias)}
                if "logit_bias" in params
                else {}
            ),
        },
    )
    results = {
        n: run(loss, parallel.make_mesh(devices=jax.devices()[:n]), img, txt, params)
        for n in (1, 8)
    }
    for n, (value, grads) in results.items():
        assert value == pytest.approx(want, rel=LOSS_RTOL), n
        for got, ref in zip(jax.tree.leaves(grads), jax.tree.leaves(want_grads), strict=True):
            np.testing.assert_allclose(got, ref, atol=GRAD_ATOL, rtol=1e-5, err_msg=str(n))
    # 8 devices against 1: the same float32 program up to the order of the reductions.
    assert results[8][0] == pytest.approx(results[1][0], rel=1e-6)
    # Each device sees the whole batch: a loss over each device's own 2 pairs differs.
    local = np.mean(
        [reference(loss, img[i : i + 2], txt[i : i + 2], scale, bias) for i in range(0, BATCH, 2)]
    )
    assert abs(local - want) > 0.1


def test_bad_inputs():
    img, txt = embeddings()
    with pytest.raises(ValueError, match=r"matching pairs, got \(16, 8\) and \(15, 8\)"):
        contrastive.clip_loss(img, txt[:15], logit_scale=0.0)
    with pytest.raises(ValueError, match="needs a logit_bias"):
        contrastive.contrastive_loss("sigmoid", img, txt, logit_scale=0.0)
    with pytest.raises(ValueError, match=r"loss='hinge'; expected one of \('softmax', 'sigmoid'\)"):
        contrastive.contrastive_loss("hinge", img, txt, logit_scale=0.0)


def reference_with_negatives(loss, img, txt, neg, valid, scale, bias):
    """`reference` with hard-negative texts: extra columns of every image's softmax
    (NegCLIP), or extra negative pairs of the sigmoid loss; invalid rows left out."""
    logits = np.exp(scale) * img @ txt.T
    extra = (np.exp(scale) * img @ neg.T)[:, valid]  # [B, valid negatives]
    n = len(img)
    if loss == "softmax":
        i2t = logsumexp(np.concatenate([logits, extra], 1), axis=1) - np.diag(logits)
        t2i = logsumexp(logits, axis=0) - np.diag(logits)
        return 0.5 * (i2t.mean() + t2i.mean())
    return reference(loss, img, txt, scale, bias) - log_expit(-(extra + bias)).sum() / n


@pytest.mark.parametrize("loss", contrastive.LOSSES)
def test_hard_negatives_and_accuracy_on_8_devices_equal_float64(loss):
    img, txt = embeddings()
    neg, _ = embeddings(seed=1)
    valid = np.arange(BATCH) % 3 != 0  # some scenes have no counterfactual
    params = PARAMS[loss]
    scale, bias = params["logit_scale"], params.get("logit_bias", 0.0)
    want = reference_with_negatives(loss, img, txt, neg, valid, scale, bias)
    assert abs(want - reference(loss, img, txt, scale, bias)) > 0.05  # the negatives count
    values = {}
    for n in (1, 8):
        mesh = parallel.make_mesh(devices=jax.devices()[:n])
        batch = parallel.batch_sharding(mesh)

        def f(img, txt, neg, valid, mesh=mesh):
            return contrastive.contrastive_loss(
                loss, img, txt, **params, mesh=mesh, negatives=neg, negatives_valid=valid
            )

        step = jax.jit(f, in_shardings=(batch,) * 4)
        values[n] = float(step(*(jnp.asarray(x) for x in (img, txt, neg)), jnp.asarray(valid)))
        assert values[n] == pytest.approx(want, rel=LOSS_RTOL), n
        _, accuracy = jax.jit(
            lambda i, t, mesh=mesh: contrastive.contrastive_loss(
                loss, i, t, **params, mesh=mesh, with_accuracy=True
            ),
            in_shardings=(batch, batch),
        )(jnp.asarray(img), jnp.asarray(txt))
        own = np.argmax(img @ txt.T, axis=1) == np.arange(BATCH)
        assert float(accuracy) == pytest.approx(own.mean()) and 0 < own.mean() < 1
