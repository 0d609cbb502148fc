"""Scaled dot-product attention for every model here: one entry point, two ways to compute.

`dot_product_attention(q, k, v)` takes q [B, Lq, N, D] and k, v [B, Lk, N, D] (the layout of
`jax.nn.dot_product_attention`) and returns [B, Lq, N, D]. The logits and the softmax are
float32 whatever the compute dtype (diffusers' `upcast_attention` / `upcast_softmax`).

- "xla": `jax.nn.dot_product_attention`, which builds the whole [B, N, Lq, Lk] score tensor
  in one piece. Right on GPUs and TPUs, where XLA fuses it (or cuDNN takes it).
- "blockwise": one head at a time (`lax.map` over B * N), each head's queries in blocks of
  at most `BLOCK_SCORES` scores, softmax normalisation after the value product. On XLA's
  CPU backend the score tensor of a 1024-token self-attention does not stay in cache and
  the fused-in-one-piece version is 3-5x slower than this (forward and gradient);
  `bench/attention.py` measures both against PyTorch's fused SDPA.

"auto" (the default) picks "blockwise" on the CPU backend when a head has at least
`BLOCKWISE_MIN_SCORES` scores (self-attention over 512+ tokens) and "xla" otherwise: for
short keys (cross-attention to text) or small maps, one fused piece is the faster of the two
there too. Both agree to float32 rounding (tests/models/test_attention.py).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

IMPLEMENTATIONS = ("auto", "xla", "blockwise")
# Scores per query block of one head: 2**20 float32 = 4 MiB, which stays in a CPU's L2/L3.
BLOCK_SCORES = 1 << 20
# Below this many scores per head (Lq * Lk), "auto" keeps the "xla" path on the CPU too.
BLOCKWISE_MIN_SCORES = 1 << 18


def dot_product_attention(q, k, v, *, bias=None, mask=None, implementation: str = "auto"):
    """Multi-head attention of q [B, Lq, N, D] over k, v [B, Lk, N, D] -> [B, Lq, N, D].

    bias: [B, Lk], added to every query's and head's logits (diffusers' attention-mask
    bias). mask: [B, Lk] bool, False keys are left out; a query with no key left attends
    uniformly to all of them, as `jax.nn.dot_product_attention` does.
    """
    if implementation not in IMPLEMENTATIONS:
        raise ValueError(f"attention implementation {implementation!r}: one of {IMPLEMENTATIONS}")
    if implementation == "auto":
        cpu = jax.default_backend() == "cpu"
        long = q.shape[1] * k.shape[1] >= BLOCKWISE_MIN_SCORES
        implementation = "blockwise" if cpu and long else "xla"
    if implementation == "xla":
        if bias is not None:
            bias = bias.astype(jnp.float32)[:, None, None, :]  # [B, 1, 1, Lk]
        if mask is not None:
            mask = mask.astype(bool)[:, None, None, :]
        return jax.nn.dot_product_attention(q, k, v, bias=bias, mask=mask)
    return _blockwise(q, k, v, bias=bias, mask=mask)


def _blockwise(q, k, v, *, bias, mask):
    b, lq, n, d = q.shape
    lk = k.shape[1]
    # [B, L, N, D] -> [B * N, L, D]: one row per head.
    qh, kh, vh = (x.transpose(0, 2, 1, 3).reshape(b * n, x.shape[1], d) for x in (q, k, v))
    add = jnp.zeros((b, lk), jnp.float32) if bias is None else bias.astype(jnp.float32)
    if mask is not None:  # jax.nn.dot_product_attention's masked logit value
        add = jnp.where(mask.astype(bool), add, -0.7 * jnp.finfo(jnp.float32).max)
    add = jnp.repeat(add, n, axis=0)  # [B * N, Lk], in the order of the heads' rows
    block = _query_block(lq, lk)
    scale = d**-0.5

    def one_block(qb, kk, vv, bb):  # qb [Lb, D], kk / vv [Lk, D], bb [Lk]
        logits = jnp.dot(qb, kk.T, preferred_element_type=jnp.float32) * scale + bb
        e = jnp.exp(logits - logits.max(axis=-1, keepdims=True))
        out = jnp.dot(e.astype(vv.dtype), vv, preferred_element_type=jnp.float32)
        return (out / e.sum(axis=-1, keepdims=True)).astype(q.dtype)

    def one_head(args):
        qq, kk, vv, bb = args
        if block == lq:
            return one_block(qq, kk, vv, bb)
        blocks = qq.reshape(lq // block, block, d)
        return jax.lax.map(lambda qb: one_block(qb, kk, vv, bb), blocks).reshape(lq, d)

    out = jax.lax.map(one_head, (qh, kh, vh, add))  # [B * N, Lq, D]
    return out.reshape(b, n, lq, d).transpose(0, 2, 1, 3)


def _query_block(lq: int, lk: int) -> int:
    """The largest divisor of lq whose block of scores [block, lk] fits BLOCK_SCORES."""
    if lq * lk <= BLOCK_SCORES:
        return lq
    target = max(1, BLOCK_SCORES // lk)
    return max(c for c in range(1, target + 1) if lq % c == 0)
