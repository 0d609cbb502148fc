"""Scaled dot-product attention for every model here: one entry point, two ways to compute.

`dot_product_attention(q, k, v)` takes q [B, Lq, N, D] and k, v [B, Lk, N, D] (the layout of
`jax.nn.dot_product_attention`) and returns [B, Lq, N, D]. The logits and the softmax are
float32 whatever the compute dtype (diffusers' `upcast_attention` / `upcast_softmax`).

- "xla": `jax.nn.dot_product_attention`, which builds the whole [B, N, Lq, Lk] score tensor
  in one piece. Right on GPUs and TPUs, where XLA fuses it (or cuDNN takes it).
- "blockwise": one head at a time (`lax.map` over B * N), each head's queries in blocks of
  at most `BLOCK_SCORES` scores, softmax normalisation after the value product. Its
  gradient is FlashAttention's backward pass (a custom VJP, so reverse mode only, no
  `jax.jvp`): the forward keeps only each query's largest logit and sum of exponentials,
  and the backward recomputes each block's weights from q and k, so no [Lq, Lk] tensor is
  stored between the passes. On XLA's CPU backend the score tensor of a 1024-token
  self-attention does not stay in cache and the fused-in-one-piece version is 3-7x slower
  than this (forward and gradient); `bench/attention.py` measures both against PyTorch's
  fused SDPA.

- "cudnn": `jax.nn.dot_product_attention(..., implementation="cudnn")`, cuDNN's fused
  (flash) attention on NVIDIA GPUs: no [Lq, Lk] tensor in memory, the softmax in float32
  inside the kernel. It takes bfloat16 / float16 inputs and a head size of at most 128.

"auto" (the default) picks "cudnn" on a GPU for unmasked, unbiased bfloat16 / float16
attention with a head size it takes (a UNet's self-attention; on an H100 the paper-width
base's train step spends a fifth of its time in the one-piece path's 1024-token score
tensors, bench/README.md), and "xla" where cuDNN refuses the shape at trace time. On the
CPU backend it picks "blockwise" when a head has at least `BLOCKWISE_MIN_SCORES` scores and
`BLOCKWISE_MIN_KEYS` keys (self-attention over 256+ tokens) and "xla" otherwise: for short
keys (cross-attention to text) or small maps, one fused piece is the faster of the two
there too. Both agree to float32 rounding, values and
gradients (tests/models/test_attention.py).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

IMPLEMENTATIONS = ("auto", "xla", "blockwise", "cudnn")
# Scores per query block of one head: 2**20 float32 = 4 MiB, which stays in a CPU's L2/L3.
BLOCK_SCORES = 1 << 20
# Below this many scores per head (Lq * Lk), or this many keys, "auto" keeps the "xla" path
# on the CPU too (bench/attention.py: with short keys, as in cross-attention to text, the
# one-piece path is the faster).
BLOCKWISE_MIN_SCORES = 1 << 16
BLOCKWISE_MIN_KEYS = 256
# The logit of a masked key (jax.nn.dot_product_attention's value).
_MASKED = -0.7 * float(jnp.finfo(jnp.float32).max)


def dot_product_attention(q, k, v, *, bias=None, mask=None, implementation: str = "auto"):
    """Multi-head attention of q [B, Lq, N, D] over k, v [B, Lk, N, D] -> [B, Lq, N, D].

    bias: [B, Lk], added to every query's and head's logits (diffusers' attention-mask
    bias). mask: [B, Lk] bool, False keys are left out; a query with no key left attends
    uniformly to all of them, as `jax.nn.dot_product_attention` does.
    """
    if implementation not in IMPLEMENTATIONS:
        raise ValueError(f"attention implementation {implementation!r}: one of {IMPLEMENTATIONS}")
    if implementation == "auto":
        if jax.default_backend() == "gpu" and _cudnn_takes(q, bias, mask):
            try:
                return jax.nn.dot_product_attention(q, k, v, implementation="cudnn")
            except (ValueError, NotImplementedError, RuntimeError):
                pass  # a shape or cuDNN version it does not take: the one-piece path
        lq, lk = q.shape[1], k.shape[1]
        long = lq * lk >= BLOCKWISE_MIN_SCORES and lk >= BLOCKWISE_MIN_KEYS
        implementation = "blockwise" if jax.default_backend() == "cpu" and long else "xla"
    if implementation == "cudnn":
        if bias is not None or mask is not None:
            raise ValueError("attention implementation 'cudnn' is used here without bias or mask")
        return jax.nn.dot_product_attention(q, k, v, implementation="cudnn")
    if implementation == "xla":
        if bias is not None:
            bias = bias.astype(jnp.float32)[:, None, None, :]  # [B, 1, 1, Lk]
        if mask is not None:
            mask = mask.astype(bool)[:, None, None, :]
        return jax.nn.dot_product_attention(q, k, v, bias=bias, mask=mask)
    return _blockwise(q, k, v, bias=bias, mask=mask)


def _cudnn_takes(q, bias, mask) -> bool:
    """Whether "auto" hands this attention to cuDNN's fused kernel on a GPU."""
    d = q.shape[-1]
    half = q.dtype in (jnp.bfloat16, jnp.float16)
    return half and bias is None and mask is None and d <= 128 and d % 8 == 0


def _blockwise(q, k, v, *, bias, mask):
    b, lq, n, d = q.shape
    lk = k.shape[1]
    # [B, L, N, D] -> [B * N, L, D]: one row per head.
    qh, kh, vh = (x.transpose(0, 2, 1, 3).reshape(b * n, x.shape[1], d) for x in (q, k, v))
    add = jnp.zeros((b, lk), jnp.float32) if bias is None else bias.astype(jnp.float32)
    if mask is not None:
        add = jnp.where(mask.astype(bool), add, _MASKED)
    add = jnp.repeat(add, n, axis=0)  # [B * N, Lk], in the order of the heads' rows
    out = _heads_attention(qh, kh, vh, add, _query_block(lq, lk))
    return out.reshape(b, n, lq, d).transpose(0, 2, 1, 3)


@functools.partial(jax.custom_vjp, nondiff_argnums=(4,))
def _heads_attention(q, k, v, add, block):
    """softmax(q kᵀ / sqrt(D) + add) v per head: q [H, Lq, D], k, v [H, Lk, D], add [H, Lk]."""
    return _heads_forward(q, k, v, add, block)[0]


def _heads_forward(q, k, v, add, block):
    """(out [H, Lq, D] in q's dtype, (each query's largest logit, the sum of its
    exponentials after subtracting it) [H, Lq] float32): the log-sum-exp, kept in two parts
    because a query whose keys are all masked has logits near -3e38, where adding the log
    of the sum would round away."""
    h, lq, d = q.shape
    # A column of ones after each head's values: the value product then also gives the
    # softmax denominator (its last column), so the exponentials are read once, not twice.
    v1 = jnp.concatenate([v, jnp.ones(v.shape[:2] + (1,), v.dtype)], axis=-1)

    def one_block(qb, kk, vv, aa):  # qb [Lb, D], kk [Lk, D], vv [Lk, D + 1], aa [Lk]
        logits = _logits(qb, kk, aa)
        top = logits.max(axis=-1, keepdims=True)
        e = jnp.exp(logits - top)
        out = jnp.dot(e.astype(vv.dtype), vv, preferred_element_type=jnp.float32)
        total = out[:, d:]
        return (out[:, :d] / total).astype(q.dtype), (top[:, 0], total[:, 0])

    def one_head(args):
        qq, kk, vv, aa = args
        if block == lq:
            return one_block(qq, kk, vv, aa)
        out, stats = jax.lax.map(lambda qb: one_block(qb, kk, vv, aa), qq.reshape(-1, block, d))
        return out.reshape(lq, d), tuple(x.reshape(lq) for x in stats)

    return jax.lax.map(one_head, (q, k, v1, add))


def _heads_attention_fwd(q, k, v, add, block):
    out, stats = _heads_forward(q, k, v, add, block)
    return out, (q, k, v, add, out, stats)


def _heads_attention_bwd(block, residuals, d_out):
    """The gradient without the forward's [Lq, Lk] weights: each query block's logits are
    recomputed from q and k and turned into the softmax weights with the saved maximum and sum
    (FlashAttention's backward pass), so nothing of size Lq x Lk is kept between the passes."""
    q, k, v, add, out, (top, total) = residuals
    h, lq, d = q.shape
    lk = k.shape[1]
    scale = d**-0.5
    f32 = jnp.float32
    # sum_j p_ij dp_ij = d_out_i . out_i: the softmax's Jacobian term, one number per query.
    delta = jnp.sum(d_out.astype(f32) * out.astype(f32), axis=-1)  # [H, Lq]

    def one_head(args):
        qq, kk, vv, aa, gg, mm, ss, dd = args

        def one_block(acc, xs):
            dk, dv, da = acc
            qb, gb, mb, sb, db = xs  # [Lb, D], [Lb, D], [Lb], [Lb] (1 / sum), [Lb]
            logits = _logits(qb, kk, aa)  # as the forward pass computed them
            p = jnp.exp(logits - mb[:, None]) * sb[:, None]  # the forward's weights [Lb, Lk]
            dv = dv + jnp.einsum("qk,qd->kd", p.astype(gb.dtype), gb, preferred_element_type=f32)
            dp = jnp.dot(gb, vv.T, preferred_element_type=f32)
            ds = p * (dp - db[:, None])  # d loss / d logits
            # A masked key's logit is the constant _MASKED (the "xla" path replaces it): no
            # gradient reaches q or k through it, even where a query has no other key.
            ds = jnp.where(aa <= _MASKED, 0.0, ds)
            dq = jnp.dot(ds.astype(kk.dtype), kk, preferred_element_type=f32) * scale
            dk = dk + scale * jnp.einsum(
                "qk,qd->kd", ds.astype(qb.dtype), qb, preferred_element_type=f32
            )
            return (dk, dv, da + ds.sum(axis=0)), dq

        zeros = (jnp.zeros((lk, d), f32), jnp.zeros((lk, d), f32), jnp.zeros((lk,), f32))
        blocks = tuple(x.reshape((lq // block, block) + x.shape[1:]) for x in (qq, gg, mm, ss, dd))
        (dk, dv, da), dq = jax.lax.scan(one_block, zeros, blocks)
        return dq.reshape(lq, d), dk, dv, da

    dq, dk, dv, da = jax.lax.map(one_head, (q, k, v, add, d_out, top, 1.0 / total, delta))
    return dq.astype(q.dtype), dk.astype(k.dtype), dv.astype(v.dtype), da.astype(add.dtype)


_heads_attention.defvjp(_heads_attention_fwd, _heads_attention_bwd)


def _logits(q, k, add):
    """q [Lb, D] . k [Lk, D] / sqrt(D) + add [Lk], float32: one query block's logits."""
    return jnp.dot(q, k.T, preferred_element_type=jnp.float32) * q.shape[-1] ** -0.5 + add


def _query_block(lq: int, lk: int) -> int:
    """The largest divisor of lq whose block of scores [block, lk] fits BLOCK_SCORES."""
    if lq * lk <= BLOCK_SCORES:
        return lq
    target = max(1, BLOCK_SCORES // lk)
    return max(c for c in range(1, target + 1) if lq % c == 0)
