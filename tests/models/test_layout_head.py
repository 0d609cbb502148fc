"""The layout head (`model.layout_grid`): what it predicts, how the UNet reads it, what trains
it, and the tool that fits it on a stage's data."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from test_imagen_unet import _model as jittered_model  # every parameter jittered

from imagen_jax.models import imagen_unet
from imagen_jax.models import layout_head as layers
from imagen_jax.proj.shapes import layout_fit
from imagen_jax.proj.shapes import losses as shapes_losses
from imagen_jax.training import step as step_lib


def test_layout_target_is_the_pooled_image_minus_its_mean():
    x = np.zeros((1, 8, 8, 3), np.float32)
    x[0, :4, :4, 0] = 1.0  # the top-left quarter red
    target = np.asarray(layers.layout_target(jnp.asarray(x), 2))
    expected = np.zeros((1, 2, 2, 3), np.float32)
    expected[0, :, :, 0] = -0.25
    expected[0, 0, 0, 0] = 0.75
    np.testing.assert_allclose(target, expected, atol=1e-6)
    with pytest.raises(ValueError, match="layout grid 3 does not divide the image size 8 x 8"):
        layers.layout_target(jnp.asarray(x), 3)


def _cond(dim=32, drop=(False, False)):
    rng = np.random.default_rng(0)
    return dict(
        text=jnp.asarray(rng.normal(size=(2, 6, dim)), jnp.float32),
        text_mask=jnp.asarray(np.arange(6)[None] < np.array([[3], [6]])),
        drop_text=jnp.asarray(drop),
    )


def _params(model):
    return nnx.to_pure_dict(nnx.state(model, nnx.Param))


def test_layout_head_grows_as_the_identity_and_is_read_once_trained():
    """A stage given a layout head computes the stage's function while `layout_in` is zero;
    once it is not, the caption's layout changes the output, except where the text is
    dropped (the unconditional branch gets no layout)."""
    stage = jittered_model("runlocal", text_dim=32)
    grown = jittered_model("runlocal", text_dim=32, layout_grid=4)  # a head that predicts
    params = _params(grown)
    params.update(_params(stage))
    params["layout_in"] = jax.tree.map(jnp.zeros_like, params["layout_in"])  # as grown
    nnx.update(grown, params)
    z, t = jax.random.normal(jax.random.key(2), (2, 16, 16, 3)), jnp.array([0.3, 0.9])
    cond = _cond(drop=(False, True))
    np.testing.assert_allclose(grown(z, t, cond), stage(z, t, cond), atol=1e-6)

    grown.layout_in.kernel[...] = jax.random.normal(jax.random.key(3), grown.layout_in.kernel.shape)
    out = np.asarray(grown(z, t, cond))
    reference = np.asarray(stage(z, t, cond))
    assert not np.allclose(out[0], reference[0], atol=1e-3)  # row 0 reads its layout
    np.testing.assert_allclose(out[1], reference[1], atol=1e-6)  # row 1: text dropped
    grown.layout_scale = 0.0  # the sampling gain (sample.layout_scale): 0 reads no layout
    np.testing.assert_allclose(grown(z, t, cond), reference, atol=1e-6)


def test_layout_loss_trains_only_the_head_and_the_denoiser_never_does():
    """The UNet sees the head's prediction with the gradient stopped: the denoising loss
    gives the head no gradient, and the layout loss gives nothing but the head one."""
    model = jittered_model("runlocal", text_dim=32, layout_grid=4)
    cond = _cond()
    batch = dict(image=jnp.full((2, 16, 16, 3), 100, jnp.uint8), **cond)
    batch["image"] = batch["image"].at[:, :8].set(250)
    graphdef, params, rest = nnx.split(model, nnx.Param, ...)

    def grads(loss):
        return nnx.to_pure_dict(jax.grad(lambda p: loss(nnx.merge(graphdef, p, rest)))(params))

    def norms(tree, module):
        return max(float(jnp.abs(x).max()) for x in jax.tree.leaves(tree[module]))

    z, t = jax.random.normal(jax.random.key(1), (2, 16, 16, 3)), jnp.array([0.5, 0.8])
    denoise = grads(lambda m: jnp.mean(jnp.square(m(z, t, cond))))
    assert norms(denoise, "layout") == 0.0
    assert norms(denoise, "layout_in") > 0.0 and norms(denoise, "conv_in") > 0.0
    layout = grads(lambda m: shapes_losses.layout_loss(m, step_lib.stage_x0(batch), batch))
    assert norms(layout, "layout") > 0.0
    others = {k: v for k, v in layout.items() if k not in ("layout", "layout_in")}
    assert max(float(jnp.abs(x).max()) for x in jax.tree.leaves(others)) == 0.0


def test_a_head_reading_refined_tokens_trains_the_refiner_too():
    """layout_text="refined": the layout loss reaches the token refiner and the text
    projection, and the head's prediction depends on them; the denoising loss still gives
    the head nothing (the hint's gradient is stopped). Without a refiner it is refused."""
    model = jittered_model("runlocal", text_dim=32, layout_grid=4, text_refiner=1)
    refined = jittered_model(
        "runlocal", text_dim=32, layout_grid=4, text_refiner=1, layout_text="refined"
    )
    nnx.update(refined, _params(model))  # the same weights, read the other way
    cond = _cond()
    frozen_pred = model.layout_prediction(cond["text"], cond["text_mask"])
    assert not np.allclose(
        refined.layout_prediction(cond["text"], cond["text_mask"]), frozen_pred, atol=1e-4
    )
    batch = dict(image=jnp.full((2, 16, 16, 3), 100, jnp.uint8), **cond)
    batch["image"] = batch["image"].at[:, :8].set(250)
    graphdef, params, rest = nnx.split(refined, nnx.Param, ...)

    def grads(loss):
        return nnx.to_pure_dict(jax.grad(lambda p: loss(nnx.merge(graphdef, p, rest)))(params))

    def largest(tree):
        return max(float(jnp.abs(x).max()) for x in jax.tree.leaves(tree))

    layout = grads(lambda m: shapes_losses.layout_loss(m, step_lib.stage_x0(batch), batch))
    assert largest(layout["text_refiner"]) > 0.0 and largest(layout["text_proj"]) > 0.0
    assert largest({k: v for k, v in layout.items() if k.startswith("down")}) == 0.0
    z, t = jax.random.normal(jax.random.key(1), (2, 16, 16, 3)), jnp.array([0.5, 0.8])
    denoise = grads(lambda m: jnp.mean(jnp.square(m(z, t, cond))))
    assert largest(denoise["layout"]) == 0.0
    with pytest.raises(ValueError, match="set layout_grid and text_refiner above 0"):
        imagen_unet.make_config("runlocal", text_dim=32, layout_grid=4, layout_text="refined")
    with pytest.raises(ValueError, match="layout_depth=2 adds layers to the layout head"):
        imagen_unet.make_config("runlocal", text_dim=32, layout_depth=2)
    with pytest.raises(ValueError, match="layout_text='tokens'"):
        imagen_unet.make_config("runlocal", text_dim=32, layout_text="tokens")


def test_fit_layout_head_learns_which_token_goes_where():
    """Synthetic captions: token 0 is A or B and the image is bright on A's side; the head
    must learn the side from the token (a caption-blind fit cannot beat the mean)."""
    rng = np.random.default_rng(0)
    n, dim = 600, 16
    a, b = rng.normal(size=dim), rng.normal(size=dim)
    left = rng.random(n) < 0.5
    text = rng.normal(size=(n, 4, dim)).astype(np.float32) * 0.3
    text[:, 0] = np.where(left[:, None], a, b)
    images = np.zeros((n, 8, 8, 3), np.float32)
    images[left, :, :4] = 1.0
    images[~left, :, 4:] = 1.0
    target = np.asarray(layers.layout_target(jnp.asarray(images), 2))
    mask = np.ones((n, 4), bool)
    model = imagen_unet.ImagenUNet(
        imagen_unet.make_config("runlocal", text_dim=dim, layout_grid=2), rngs=nnx.Rngs(0)
    )
    before = _params(model)
    result = layout_fit.fit_layout_head(model, (text, mask, target), steps=300, batch=64, lr=3e-3)
    assert result["val_mse"] < 0.1 * float(np.mean(np.square(target)))  # the mean: 0.25
    assert result["val_mse_before"] > 0.5 * float(np.mean(np.square(target)))
    after = _params(model)
    for key in before:  # only the head moved
        same = jax.tree.map(lambda x, y: bool(jnp.all(x == y)), before[key], after[key])
        assert all(jax.tree.leaves(same)) == (key != "layout"), key
