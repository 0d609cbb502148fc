"""The Imagen UNets: shapes, conditioning paths, and use as a sampler's network."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from imagen_jax.diffusion import config as diffusion_config
from imagen_jax.diffusion import samplers
from imagen_jax.models import imagen_unet
from imagen_jax.models import unet_layers as layers


def _model(variant="runlocal", **overrides):
    """A tiny model whose zero-initialised output layers are randomised, so that every path
    from input to output carries signal."""
    model = imagen_unet.ImagenUNet(imagen_unet.make_config(variant, **overrides), rngs=nnx.Rngs(0))
    state = nnx.state(model, nnx.Param)
    leaves, treedef = jax.tree.flatten(state)
    keys = jax.random.split(jax.random.key(1), len(leaves))
    leaves = [x + 0.05 * jax.random.normal(k, x.shape) for x, k in zip(leaves, keys, strict=True)]
    nnx.update(model, jax.tree.unflatten(treedef, leaves))
    return model


def _cond(cfg, batch=2, length=6, res=16, seed=0):
    rng = np.random.default_rng(seed)
    cond = dict(
        text=jnp.asarray(rng.normal(size=(batch, length, cfg.text_dim)), jnp.float32),
        text_mask=jnp.asarray(np.arange(length)[None] < np.array([[3], [6]])[:batch]),
    )
    if cfg.low_res:
        cond["low_res"] = jnp.asarray(rng.normal(size=(batch, res // 2, res // 2, 3)), jnp.float32)
        cond["aug_t"] = jnp.asarray([0.1, 0.4][:batch], jnp.float32)
    return cond


@nnx.jit
def _apply(model, z, t, cond):
    return model(z, t, cond)


def _z(batch=2, res=16):
    return jax.random.normal(jax.random.key(2), (batch, res, res, 3))


@pytest.mark.parametrize(
    "overrides",
    [
        {},
        dict(efficient=True, num_res_blocks=(1, 2)),
        dict(low_res=True, efficient=True),
        dict(out_channels=6),
        dict(text_refiner=2),
    ],
)
def test_output_shapes(overrides):
    cfg = imagen_unet.make_config("runlocal", **overrides)
    model = nnx.eval_shape(lambda: imagen_unet.ImagenUNet(cfg, rngs=nnx.Rngs(0)))
    out = nnx.eval_shape(lambda m: m(_z(), jnp.array([0.2, 0.8]), _cond(cfg)), model)
    assert out.shape == (2, 16, 16, cfg.out_channels)


def test_gradients_are_finite():
    model = _model(low_res=True, efficient=True)
    cond = _cond(model.cfg)

    def loss(m):
        return jnp.mean(m(_z(), jnp.array([0.2, 0.8]), cond) ** 2)

    grads = nnx.jit(nnx.grad(loss))(model)
    norms = [float(jnp.abs(g).max()) for g in jax.tree.leaves(grads)]
    assert all(np.isfinite(norms)) and max(norms) > 0


@pytest.mark.parametrize("refiner", [0, 2])
def test_text_mask_hides_padding_tokens(refiner):
    model = _model(text_refiner=refiner)  # the refiner's tokens attend to the mask's only
    cond = _cond(model.cfg)
    changed = dict(cond, text=cond["text"].at[0, 4:].set(9.0))  # row 0 has 3 real tokens
    a, b = (_apply(model, _z(), jnp.array([0.5, 0.5]), c) for c in (cond, changed))
    np.testing.assert_allclose(a, b, atol=1e-5)
    assert not np.allclose(
        a,
        _apply(model, _z(), jnp.array([0.5, 0.5]), dict(cond, text=cond["text"].at[0, 1].set(9.0))),
    )


def test_dropped_text_uses_the_null_embedding():
    model = _model()
    cond = dict(_cond(model.cfg), drop_text=jnp.array([True, False]))
    other = dict(cond, text=cond["text"] + 1.0)
    a, b = (_apply(model, _z(), jnp.array([0.5, 0.5]), c) for c in (cond, other))
    np.testing.assert_allclose(a[0], b[0], atol=1e-5)  # dropped: the text does not matter
    assert not np.allclose(a[1], b[1])


def test_super_resolution_reads_low_res_and_aug_level():
    model = _model(low_res=True, efficient=True)
    cond = _cond(model.cfg)
    base = _apply(model, _z(), jnp.array([0.5, 0.5]), cond)
    for key, value in (("low_res", cond["low_res"] + 1.0), ("aug_t", cond["aug_t"] + 0.3)):
        assert not np.allclose(
            base, _apply(model, _z(), jnp.array([0.5, 0.5]), {**cond, key: value})
        )


def test_samples_through_the_diffusion_core():
    model = _model()
    cond = _cond(model.cfg)
    uncond = dict(cond, drop_text=jnp.ones((2,), bool))
    cond = dict(cond, drop_text=jnp.zeros((2,), bool))
    s = diffusion_config.make_sampling(
        diffusion_config.diffusion_config(), diffusion_config.sample_config(steps=3)
    )
    out = samplers.sample(
        lambda z, t, c: model(z, t, c), _z(), s.grid, cond=cond, uncond=uncond, guidance_scale=3.0
    )
    assert out.shape == (2, 16, 16, 3) and bool(jnp.all(jnp.isfinite(out)))


def test_variant_table_and_counts():
    cfg = imagen_unet.make_config("runlocal")
    model = imagen_unet.ImagenUNet(cfg, rngs=nnx.Rngs(0))
    n = sum(x.size for x in jax.tree.leaves(nnx.state(model, nnx.Param)))
    assert imagen_unet.count_params(cfg) == n
    with pytest.raises(ValueError, match="unknown UNet variant 'huge'"):
        imagen_unet.make_config("huge")
    with pytest.raises(ValueError, match="unknown UNet config keys \\['chanels'\\]"):
        imagen_unet.make_config("runlocal", chanels=3)


def _block(pos_emb, pos_scale):
    """A self-attention block with randomised weights; its positional projection (if any)
    scaled by `pos_scale` (0: as initialised)."""
    block = layers.TransformerBlock(
        16, text_dim=8, cross_attn=False, head_dim=8, groups=4, pos_emb=pos_emb, rngs=nnx.Rngs(0)
    )
    leaves, treedef = jax.tree.flatten(nnx.state(block, nnx.Param))
    keys = jax.random.split(jax.random.key(3), len(leaves))
    leaves = [x + 0.1 * jax.random.normal(k, x.shape) for x, k in zip(leaves, keys, strict=True)]
    nnx.update(block, jax.tree.unflatten(treedef, leaves))
    if pos_emb:
        block.pos.kernel[...] = pos_scale * block.pos.kernel[...]
        block.pos.bias[...] = pos_scale * block.pos.bias[...]
    return block


def test_positional_embedding_tells_attention_where_pixels_are():
    x = jax.random.normal(jax.random.key(4), (1, 8, 8, 16))
    flip = (slice(None), slice(None, None, -1))  # upside down
    mask = jnp.ones((1, 1), bool)

    def flipped_equivariant(block):
        return np.allclose(block(x[flip], None, mask), block(x, None, mask)[flip], atol=1e-5)

    # Without positions, attention over pixels commutes with flipping the image: "above"
    # and "below" are the same to it. Zero-initialised positions change nothing; trained
    # (non-zero) ones break the symmetry.
    blind = _block(False, 0.0)
    assert flipped_equivariant(blind)
    grown = _block(True, 0.0)
    nnx.update(grown, nnx.state(blind, nnx.Param))
    np.testing.assert_allclose(grown(x, None, mask), blind(x, None, mask), atol=1e-6)
    assert flipped_equivariant(grown)
    assert not flipped_equivariant(_block(True, 1.0))


def test_position_features_are_per_row_and_column():
    f = layers.position_features(4, 6).reshape(4, 6, layers.POS_FEATURES)
    half = layers.POS_FEATURES // 2
    assert np.ptp(f[:, :, :half], axis=1).max() == 0  # rows: by row only
    assert np.ptp(f[:, :, half:], axis=0).max() == 0  # columns: by column only
    flat = np.asarray(layers.position_features(4, 6))
    assert len({tuple(np.round(r, 5)) for r in flat}) == 24  # every pixel distinct
    np.testing.assert_allclose(np.abs(flat).max(), 1.0, atol=1e-6)


def test_text_refiner_grows_as_the_identity():
    """A UNet given a token refiner, with a stage's weights for everything else, computes
    the stage's function until the refiner is trained; trained, it changes the output."""
    stage = _model()
    grown = imagen_unet.ImagenUNet(
        imagen_unet.make_config("runlocal", text_refiner=2), rngs=nnx.Rngs(5)
    )
    params = nnx.to_pure_dict(nnx.state(grown, nnx.Param))
    params.update({k: v for k, v in nnx.to_pure_dict(nnx.state(stage, nnx.Param)).items()})
    nnx.update(grown, params)
    cond, t = _cond(stage.cfg), jnp.array([0.3, 0.7])
    np.testing.assert_allclose(
        _apply(grown, _z(), t, cond), _apply(stage, _z(), t, cond), atol=1e-6
    )
    for ff_out in grown.text_refiner.ff_out:
        ff_out.kernel[...] = 0.1 * jax.random.normal(jax.random.key(6), ff_out.kernel.shape)
    assert not np.allclose(_apply(grown, _z(), t, cond), _apply(stage, _z(), t, cond), atol=1e-3)
