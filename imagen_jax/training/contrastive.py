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
import numpy as np
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
    with_accuracy: bool = False,
):
    """The softmax contrastive loss of CLIP (Radford et al. 2021, Fig. 3; big_vision's
    `contrastive` trainer): the mean of the image->text and text->image cross-entropies,

        L = -1/(2B) sum_i [log softmax_j(l_ij)_i + log softmax_j(l_ji)_i],
        l_ij = exp(t') <x_i, y_j>.

    negatives [B, P] (with negatives_valid bool [B]): hard-negative texts appended as extra
    columns of every image's softmax (NegCLIP, Yuksekgonul et al. 2023, sec. 5); the
    text->image direction is unchanged. with_accuracy: returns (loss, the share of images
    whose own text has the highest logit among the batch's texts).
    """
    _check_pairs(image_embeds, text_embeds)
    columns = _gather(
        mesh, image_embeds, text_embeds, *_negative_columns(negatives, negatives_valid)
    )
    per_image = _logits(image_embeds, columns[1], logit_scale, None, mesh)  # [B, B]
    per_text = _logits(text_embeds, columns[0], logit_scale, None, mesh)  # [B, B]
    accuracy = _diagonal_accuracy(per_image)
    if negatives is not None:
        extra = _negative_logits(image_embeds, columns[2:], logit_scale, None, mesh)
        per_image = jnp.concatenate([per_image, extra], axis=-1)  # [B, 2B]
    loss = 0.5 * (_cross_entropy_diagonal(per_image) + _cross_entropy_diagonal(per_text))
    return (loss, accuracy) if with_accuracy else loss


def siglip_loss(
    image_embeds: jax.Array,
    text_embeds: jax.Array,
    *,
    logit_scale: jax.Array,
    logit_bias: jax.Array,
    mesh: Mesh | None = None,
    negatives: jax.Array | None = None,
    negatives_valid: jax.Array | None = None,
    with_accuracy: bool = False,
):
    """The sigmoid loss of SigLIP (Zhai et al. 2023, Algorithm 1; big_vision's
    `siglip` trainer): every pair is a binary classification, normalised per example,

        L = -1/B sum_i sum_j log sigmoid(z_ij (exp(t') <x_i, y_j> + b)),
        z_ij = 1 if i == j else -1.

    negatives [B, P] (with negatives_valid bool [B]): hard-negative texts, each one more
    negative pair (z = -1) for every image, in the same per-example normalisation.
    with_accuracy: as `clip_loss`.
    """
    _check_pairs(image_embeds, text_embeds)
    columns = _gather(mesh, text_embeds, *_negative_columns(negatives, negatives_valid))
    logits = _logits(image_embeds, columns[0], logit_scale, logit_bias, mesh)  # [B, B]
    n = logits.shape[0]
    z = 2.0 * jnp.eye(n, dtype=logits.dtype) - 1.0
    loss = -jnp.sum(jax.nn.log_sigmoid(z * logits)) / n
    if negatives is not None:
        extra = _negative_logits(image_embeds, columns[1:], logit_scale, logit_bias, mesh)
        loss = loss - jnp.sum(jnp.where(jnp.isfinite(extra), jax.nn.log_sigmoid(-extra), 0)) / n
    return (loss, _diagonal_accuracy(logits)) if with_accuracy else loss


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
    with_accuracy: bool = False,
):
    """`clip_loss` (loss="softmax") or `siglip_loss` ("sigmoid"), by name (a config's)."""
    kw = dict(
        logit_scale=logit_scale,
        mesh=mesh,
        negatives=negatives,
        negatives_valid=negatives_valid,
        with_accuracy=with_accuracy,
    )
    if loss == "softmax":
        return clip_loss(image_embeds, text_embeds, **kw)
    if loss == "sigmoid":
        if logit_bias is None:
            raise ValueError("the sigmoid loss needs a logit_bias")
        return siglip_loss(image_embeds, text_embeds, logit_bias=logit_bias, **kw)
    raise ValueError(f"loss={loss!r}; expected one of {LOSSES}")


def _check_pairs(rows, columns):
    if rows.shape != columns.shape or rows.ndim != 2:
        raise ValueError(
            f"expected two [B, P] arrays of matching pairs, got {rows.shape} and {columns.shape}"
        )


def _negative_columns(negatives, valid) -> tuple:
    """(negatives, valid as float [B, 1]) to gather with the other columns, or ()."""
    if negatives is None:
        return ()
    _check_pairs(negatives, negatives)
    if valid is None:
        valid = jnp.ones(negatives.shape[:1], bool)
    return negatives, jnp.asarray(valid, jnp.float32)[:, None]


def _gather(mesh, *arrays) -> list[jax.Array]:
    """The arrays [B, ...] in float32, whole on every device: ONE all-gather of their
    concatenation. (XLA:CPU may run independent collectives of one program in a different
    order on different devices, which deadlocks; one gather has no order to get wrong.)"""
    arrays = [a.astype(jnp.float32) for a in arrays]
    if mesh is None:
        return arrays
    widths = [a.shape[-1] for a in arrays]
    both = jax.lax.with_sharding_constraint(
        jnp.concatenate(arrays, axis=-1), parallel.replicated(mesh)
    )
    return jnp.split(both, list(np.cumsum(widths)[:-1]), axis=-1)


def _logits(rows, columns, logit_scale, logit_bias, mesh):
    """[B, B] float32: exp(t') <rows_i, columns_j> (+ b) of the local rows against the
    gathered columns, each device holding its own rows."""
    logits = (rows.astype(jnp.float32) @ columns.T) * jnp.exp(
        jnp.asarray(logit_scale, jnp.float32).reshape(())
    )
    if logit_bias is not None:
        logits = logits + jnp.asarray(logit_bias, jnp.float32).reshape(())
    if mesh is not None:  # each device: its own rows against every column
        logits = jax.lax.with_sharding_constraint(
            logits, NamedSharding(mesh, P(parallel.data_axes(mesh) or None, None))
        )
    return logits


def _negative_logits(image_embeds, columns, logit_scale, logit_bias, mesh):
    """[B, Bn] logits of every image against every gathered hard-negative text; -inf in the
    columns of rows without one. columns: (negatives [B, P], valid [B, 1])."""
    negatives, valid = columns
    logits = _logits(image_embeds, negatives, logit_scale, logit_bias, mesh)
    return jnp.where(valid[:, 0][None, :] > 0.5, logits, -jnp.inf)


def _diagonal_accuracy(logits: jax.Array) -> jax.Array:
    """The share of rows whose diagonal entry is their largest."""
    return jnp.mean(
        (jnp.argmax(logits, axis=-1) == jnp.arange(logits.shape[0])).astype(jnp.float32)
    )


def _cross_entropy_diagonal(logits: jax.Array) -> jax.Array:
    """Mean over rows of the softmax cross-entropy whose label is the diagonal."""
    diagonal = jnp.diagonal(logits)
    return jnp.mean(jax.nn.logsumexp(logits, axis=-1) - diagonal)
