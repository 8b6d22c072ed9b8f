"""The public flash-attention op: `flash_attention` (custom VJP over the Pallas kernels).

`interpret=None` -> native on TPU, `interpret=True` elsewhere (the kernels are written for
Mosaic TPU; interpret mode runs them as plain JAX ops, for tests). The choice is made here from
`jax.default_backend()` and never inside a model layer.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

from pallas_kernels.flash_attention import kernels


def _resolve_interpret(interpret: bool | None) -> bool:
    return jax.default_backend() != "tpu" if interpret is None else bool(interpret)


@functools.partial(jax.custom_vjp, nondiff_argnums=(5, 6, 7, 8))
def _flash(q_BNTH, k_BKSH, v_BKSH, seg_q_BT1, seg_k_B1S, causal, bq, bk, interpret):
    return _flash_fwd(q_BNTH, k_BKSH, v_BKSH, seg_q_BT1, seg_k_B1S, causal, bq, bk, interpret)[0]


def _flash_fwd(q_BNTH, k_BKSH, v_BKSH, seg_q_BT1, seg_k_B1S, causal, bq, bk, interpret):
    kw = dict(causal=causal, bq=bq, bk=bk, interpret=interpret)
    o_BNTH, lse_BNT1 = kernels.flash_fwd_pallas(q_BNTH, k_BKSH, v_BKSH, seg_q_BT1, seg_k_B1S, **kw)
    return o_BNTH, (q_BNTH, k_BKSH, v_BKSH, seg_q_BT1, seg_k_B1S, o_BNTH, lse_BNT1)


def _flash_bwd(causal, bq, bk, interpret, residuals, do_BNTH):
    q_BNTH, k_BKSH, v_BKSH, seg_q_BT1, seg_k_B1S, o_BNTH, lse_BNT1 = residuals
    delta_BNT1 = jnp.sum(
        do_BNTH.astype(jnp.float32) * o_BNTH.astype(jnp.float32), axis=-1, keepdims=True
    )
    args = (q_BNTH, k_BKSH, v_BKSH, seg_q_BT1, seg_k_B1S, do_BNTH, lse_BNT1, delta_BNT1)
    kw = dict(causal=causal, bq=bq, bk=bk, interpret=interpret)
    dk_BKSH, dv_BKSH = kernels.flash_dkv_pallas(*args, **kw)
    dq_BNTH = kernels.flash_dq_pallas(*args, **kw)
    return dq_BNTH, dk_BKSH, dv_BKSH, None, None


_flash.defvjp(_flash_fwd, _flash_bwd)


def flash_attention(
    q,
    k,
    v,
    segment_ids=None,
    *,
    causal: bool = True,
    block_q: int = 512,
    block_k: int = 512,
    interpret: bool | None = None,
) -> jax.Array:
    """Flash attention of N query heads over K kv heads (GQA, N % K == 0), no positional encoding.

    Args:
      q: [B, T, N, H] float; k, v: [B, T, K, H] (same dtype as q).
      segment_ids: [B, T] int (None: one segment). A query sees a key iff they share a segment id
        and, with `causal`, the key is not after it. Padding (id 0) is a segment like any other.
      causal: apply the causal mask (and skip the tiles above the diagonal).
      block_q, block_k: tile sizes, clamped to T. On TPU use multiples of 128 (or T itself).
      interpret: None = native kernel on TPU, interpret mode elsewhere.

    Returns:
      [B, T, N, H] in q's dtype; scores are scaled by H**-0.5, softmax statistics in fp32.
      Differentiable in q, k and v (custom VJP: a dk/dv kernel and a dq kernel that recompute
      the tiles from the saved row log-sum-exp).
    """
    q, k, v = jnp.asarray(q), jnp.asarray(k), jnp.asarray(v)
    if q.ndim != 4 or k.ndim != 4 or k.shape != v.shape:
        raise ValueError(f"flash_attention: q [B,T,N,H], k = v [B,T,K,H]; got {q.shape}, {k.shape}")
    b, t, n, h = q.shape
    if k.shape[:2] != (b, t) or k.shape[3] != h or n % k.shape[2]:
        raise ValueError(
            f"flash_attention: q {q.shape} and k/v {k.shape} disagree (B, T, H must match and "
            "the query heads must be a multiple of the kv heads)"
        )
    if not (jnp.issubdtype(q.dtype, jnp.floating) and q.dtype == k.dtype == v.dtype):
        raise ValueError(f"flash_attention: q, k, v must share a float dtype: {q.dtype}, {k.dtype}")
    seg = jnp.ones((b, t), jnp.int32) if segment_ids is None else jnp.asarray(segment_ids)
    if seg.shape != (b, t) or not jnp.issubdtype(seg.dtype, jnp.integer):
        raise ValueError(f"flash_attention: segment_ids must be int [B, T], got {seg.shape}")
    if block_q < 1 or block_k < 1:
        raise ValueError(f"flash_attention: block sizes must be >= 1, got {block_q}, {block_k}")
    seg = seg.astype(jnp.int32)
    o_BNTH = _flash(
        q.transpose(0, 2, 1, 3),
        k.transpose(0, 2, 1, 3),
        v.transpose(0, 2, 1, 3),
        seg[:, :, None],
        seg[:, None, :],
        bool(causal),
        min(block_q, t),
        min(block_k, t),
        _resolve_interpret(interpret),
    )
    return o_BNTH.transpose(0, 2, 1, 3)
