"""`materialize` is an exact identity, and with it XLA's CPU backend stops recomputing the SD3
transformer's residual stream inside the fusions of every later consumer.

Without it the largest fused computation of the transformer's gradient grows with the depth
(226, 384 and 700 instructions at 2, 4 and 8 blocks with this jaxlib) and all fusions together
grow faster than the depth; with it both are set by one block.
"""

import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from imagen_jax.models import latent_mmdit
from imagen_jax.models import sd3_transformer as sd3
from imagen_jax.models.cpu_fusion import materialize


def test_materialize_is_an_exact_identity_and_passes_gradients_unchanged():
    # Normal floats; subnormals come out flushed to zero (the CPU divides with FTZ).
    x = jnp.asarray(np.random.default_rng(0).normal(size=(3, 5, 7)) * 1e3, jnp.float32)
    x = x.at[0, 0, 1].set(-0.0).at[1, 2, 3].set(1e-30).at[2, 4, 6].set(3e38)
    np.testing.assert_array_equal(jax.jit(materialize)(x), x)
    g = jax.grad(lambda v: jnp.sum(jnp.sin(v) * materialize(v) ** 2))(x)
    want = jax.grad(lambda v: jnp.sum(jnp.sin(v) * v**2))(x)
    np.testing.assert_array_equal(g, want)


def _fusion_sizes(layers: int) -> tuple[int, int]:
    """(largest, total) instruction counts of the fused computations in the compiled
    gradient of the runlocal MMDiT's SD3 transformer with `layers` blocks."""
    cfg = latent_mmdit.make_config("runlocal", num_layers=layers).transformer
    graphdef, params = nnx.split(sd3.SD3Transformer(cfg, rngs=nnx.Rngs(0)))

    def loss(p, x, context, pooled):
        out = nnx.merge(graphdef, p)(x, jnp.array([500.0, 20.0]), context, pooled)
        return jnp.sum(out**2)

    side, width = cfg.sample_size, cfg.joint_attention_dim
    args = (
        jnp.ones((2, side, side, cfg.in_channels)),
        jnp.ones((2, 5, width)),
        jnp.ones((2, width)),
    )
    hlo = jax.jit(jax.grad(loss)).lower(params, *args).compile().as_text()
    computations = re.split(r"\n(?=%?\S+ \(|ENTRY)", hlo)
    sizes = [c.count("\n") for c in computations if c.lstrip("%").startswith("fused_computation")]
    assert sizes, "no fused computations found in the compiled HLO"
    return max(sizes), sum(sizes)


@pytest.mark.skipif(jax.default_backend() != "cpu", reason="the CPU backend's fusion")
def test_sd3_gradient_fusions_do_not_grow_with_depth():
    largest2, total2 = _fusion_sizes(2)
    largest8, total8 = _fusion_sizes(8)
    assert largest8 <= largest2 + 10, (largest2, largest8)
    assert total8 <= 4.5 * total2, (total2, total8)  # linear in the depth: 4x and the ends
