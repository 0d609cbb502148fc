"""The contrastive losses of two-tower image-text models (`models.two_towers`), over the
global batch.

    loss = clip_loss(image_embeds, text_embeds, logit_scale=model.logit_scale[...], mesh=mesh)
    loss = siglip_loss(image_embeds, text_embeds, logit_scale=..., logit_bias=..., mesh=mesh)

Both take the L2-normalised embeddings of B matching pairs, image_embeds and text_embeds
[B, P] (pair i is row i of each), and the learnable log-temperature t' (the logits are
exp(t') * cosine; a scalar or shape [1]), SigLIP also the learnable bias b. Every
example is compared with every other of the *global* batch: under `jax.jit`, with the batch
sharded over the mesh's data axes, pass `mesh=` and each device gathers the other side's
embeddings (an all-gather of [B, P], not of [B, B]) and holds the logits of its own rows
against all B columns, [B / n, B]; the sums over rows then reduce across devices. The value
does not depend on the number of devices (tests/training/test_contrastive.py checks 8
devices against 1 and both against a float64 reference). Without a mesh the same math runs
on whatever the arrays are placed on. The logits are computed in float32.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from imagen_jax import parallel

LOSSES = ("softmax", "sigmoid")  # CLIP | SigLIP


def clip_loss(
    image_embeds: jax.Array,
    text_embeds: jax.Array,
    *,
    logit_scale: jax.Array,
    mesh: Mesh | None = None,
    negatives: jax.Array | None = None,
    negatives_valid: jax.Array | None = None,
) -> jax.Array:
    """The softmax contrastive loss of CLIP (Radford et al. 2021, Fig. 3; big_vision's
    `contrastive` trainer): the mean of the image->text and text->image cross-entropies,

        L = -1/(2B) sum_i [log softmax_j(l_ij)_i + log softmax_j(l_ji)_i],
        l_ij = exp(t') <x_i, y_j>.

    negatives [B, P] (with negatives_valid bool [B]): hard-negative texts appended as extra
    columns of every image's softmax (NegCLIP, Yuksekgonul et al. 2023, sec. 5); the
    text->image direction is unchanged.
    """
    per_image = _pair_logits(image_embeds, text_embeds, logit_scale, None, mesh)  # [B, B]
    per_text = _pair_logits(text_embeds, image_embeds, logit_scale, None, mesh)  # [B, B]
    if negatives is not None:
        extra = _negative_logits(image_embeds, negatives, negatives_valid, logit_scale, None, mesh)
        per_image = jnp.concatenate([per_image, extra], axis=-1)  # [B, 2B]
    return 0.5 * (_cross_entropy_diagonal(per_image) + _cross_entropy_diagonal(per_text))


def siglip_loss(
    image_embeds: jax.Array,
    text_embeds: jax.Array,
    *,
    logit_scale: jax.Array,
    logit_bias: jax.Array,
    mesh: Mesh | None = None,
    negatives: jax.Array | None = None,
    negatives_valid: jax.Array | None = None,
) -> jax.Array:
    """The sigmoid loss of SigLIP (Zhai et al. 2023, Algorithm 1; big_vision's
    `siglip` trainer): every pair is a binary classification, normalised per example,

        L = -1/B sum_i sum_j log sigmoid(z_ij (exp(t') <x_i, y_j> + b)),
        z_ij = 1 if i == j else -1.

    negatives [B, P] (with negatives_valid bool [B]): hard-negative texts, each one more
    negative pair (z = -1) for every image, in the same per-example normalisation.
    """
    logits = _pair_logits(image_embeds, text_embeds, logit_scale, logit_bias, mesh)  # [B, B]
    n = logits.shape[0]
    z = 2.0 * jnp.eye(n, dtype=logits.dtype) - 1.0
    loss = -jnp.sum(jax.nn.log_sigmoid(z * logits)) / n
    if negatives is not None:
        extra = _negative_logits(
            image_embeds, negatives, negatives_valid, logit_scale, logit_bias, mesh
        )
        loss = loss - jnp.sum(jnp.where(jnp.isfinite(extra), jax.nn.log_sigmoid(-extra), 0)) / n
    return loss


def contrastive_loss(
    loss: str,
    image_embeds,
    text_embeds,
    *,
    logit_scale,
    logit_bias=None,
    mesh=None,
    negatives=None,
    negatives_valid=None,
):
    """`clip_loss` (loss="softmax") or `siglip_loss` ("sigmoid"), by name (a config's)."""
    kw = dict(
        logit_scale=logit_scale, mesh=mesh, negatives=negatives, negatives_valid=negatives_valid
    )
    if loss == "softmax":
        return clip_loss(image_embeds, text_embeds, **kw)
    if loss == "sigmoid":
        if logit_bias is None:
            raise ValueError("the sigmoid loss needs a logit_bias")
        return siglip_loss(image_embeds, text_embeds, logit_bias=logit_bias, **kw)
    raise ValueError(f"loss={loss!r}; expected one of {LOSSES}")


def _pair_logits(rows, columns, logit_scale, logit_bias, mesh):
    """[B, B] float32: exp(t') <rows_i, columns_j> (+ b), rows left where they are, the
    columns gathered from every device."""
    if rows.shape != columns.shape or rows.ndim != 2:
        raise ValueError(
            f"expected two [B, P] arrays of matching pairs, got {rows.shape} and {columns.shape}"
        )
    rows, columns = rows.astype(jnp.float32), columns.astype(jnp.float32)
    if mesh is not None:
        columns = jax.lax.with_sharding_constraint(columns, parallel.replicated(mesh))
    logits = (rows @ columns.T) * jnp.exp(jnp.asarray(logit_scale, jnp.float32).reshape(()))
    if logit_bias is not None:
        logits = logits + jnp.asarray(logit_bias, jnp.float32).reshape(())
    if mesh is not None:  # each device: its own rows against every column
        logits = jax.lax.with_sharding_constraint(
            logits, NamedSharding(mesh, P(parallel.data_axes(mesh) or None, None))
        )
    return logits


def _negative_logits(image_embeds, negatives, valid, logit_scale, logit_bias, mesh):
    """[B, Bn] logits of every image against every hard-negative text; -inf in the columns
    of rows without one (`valid` False)."""
    logits = _pair_logits(image_embeds, negatives, logit_scale, logit_bias, mesh)
    if valid is None:
        return logits
    return jnp.where(jnp.asarray(valid, bool)[None, :], logits, -jnp.inf)


def _cross_entropy_diagonal(logits: jax.Array) -> jax.Array:
    """Mean over rows of the softmax cross-entropy whose label is the diagonal."""
    diagonal = jnp.diagonal(logits)
    return jnp.mean(jax.nn.logsumexp(logits, axis=-1) - diagonal)
