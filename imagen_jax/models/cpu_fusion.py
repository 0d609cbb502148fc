"""`materialize`: keeps a transformer's residual stream from being fused into its consumers by
XLA's CPU backend.

The residual stream of a pre-norm transformer is a chain of elementwise adds of the blocks'
outputs (x + gate * attn + gate * mlp + ...). XLA's CPU fusion duplicates cheap elementwise
producers into every consumer, and does so across blocks: in the backward pass, each
consumer of block k's residual (its norms' statistics, the transposed activations of its
weight gradients) recomputed the whole chain from the embedding onward, quadratic in the
depth. In the 6-block shapes MMDiT's train step those recomputing copies took 534 of the
873 ms of operation time in a profile; with `materialize` the step takes 250 ms, not 605
(bench/README.md, train_step.py). `jax.lax.optimization_barrier` does not help there: the
CPU compiler expands barriers before it fuses.

`materialize(x)` divides x by a one computed at run time (1 + 0 * one element of x): an
exact identity (x / 1 == x in IEEE arithmetic, and the gradient passes through as g / 1;
subnormal values, below 1.2e-38, are flushed to zero, as the CPU's division does),
but a float division is an "expensive" operation, which XLA neither duplicates into several
consumers nor folds away, so x is written once and read by every consumer, in the forward
and (through the division's gradient) in the backward pass. An x whose first element is inf
or NaN comes out NaN everywhere, which a forward pass producing inf already is for any loss.
Other backends fuse by cost models and keep barriers; they get x unchanged.
"""

from __future__ import annotations

import jax


def materialize(x: jax.Array) -> jax.Array:
    """x itself, computed once rather than recomputed in each consumer (on the CPU)."""
    if jax.default_backend() != "cpu":
        return x
    one = jax.lax.stop_gradient(1 + 0 * x.reshape(-1)[0])
    return x / one
