"""Pure-jnp reference of flash attention (the parity oracle for the kernels).

The simple definition: build the [B, N, T, T] scores, mask, softmax in fp32, weight the values.
A query sees a key iff they share a segment id and (with `causal`) the key is not after it.
Masked scores are `finfo(float32).min` before the softmax, as in
`nemocascade.model.attention.gqa_attention`; since every query sees itself, no row is fully
masked. Differentiable with ordinary JAX autodiff, which is what the kernels' custom VJP is tested
against.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jax import lax


def attention_mask(segment_ids_BT: jax.Array, *, causal: bool) -> jax.Array:
    """[B, T, T] bool: mask[b, t, s] is True iff query t may attend to key s."""
    t = segment_ids_BT.shape[1]
    same_BTS = segment_ids_BT[:, :, None] == segment_ids_BT[:, None, :]
    if not causal:
        return same_BTS
    pos_T = jnp.arange(t)
    return same_BTS & (pos_T[None, None, :] <= pos_T[None, :, None])


def flash_attention_reference(
    q_BTNH: jax.Array,
    k_BTKH: jax.Array,
    v_BTKH: jax.Array,
    segment_ids_BT: jax.Array | None = None,
    *,
    causal: bool = True,
) -> jax.Array:
    """softmax(q k^T / sqrt(H) + mask) v with N query heads over K kv heads (N % K == 0).

    q: [B, T, N, H]; k, v: [B, T, K, H]; segment_ids: [B, T] int (None: one segment).
    Computed in fp32 at the highest matmul precision; returns [B, T, N, H] in q's dtype.
    """
    b, t, n, h = q_BTNH.shape
    kv = k_BTKH.shape[2]
    if segment_ids_BT is None:
        segment_ids_BT = jnp.ones((b, t), jnp.int32)
    hi = lax.Precision.HIGHEST
    q_BTKGH = q_BTNH.astype(jnp.float32).reshape(b, t, kv, n // kv, h)
    s_BKGTS = jnp.einsum("btkgh,bskh->bkgts", q_BTKGH, k_BTKH.astype(jnp.float32), precision=hi)
    s_BKGTS = s_BKGTS * h**-0.5
    mask_BTS = attention_mask(segment_ids_BT, causal=causal)
    s_BKGTS = jnp.where(mask_BTS[:, None, None], s_BKGTS, jnp.finfo(jnp.float32).min)
    p_BKGTS = jax.nn.softmax(s_BKGTS, axis=-1)
    o_BTKGH = jnp.einsum("bkgts,bskh->btkgh", p_BKGTS, v_BTKH.astype(jnp.float32), precision=hi)
    return o_BTKGH.reshape(b, t, n, h).astype(q_BTNH.dtype)
