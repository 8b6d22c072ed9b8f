"""Pure-jnp references for the grouped matmuls (the parity oracle for the kernels).

Rows of `lhs` are sorted by group: group g owns rows [start_g, end_g) with
end_g = min(cumsum(group_sizes)[g], M) and start_g = end_{g-1} (start_0 = 0).
Rows at or after end_{G-1} belong to no group. Negative group sizes count as 0.

The references are written for clarity, not speed: they loop over the groups
with `lax.scan` (O(G * M * K * N) flops), and they are differentiable with
ordinary JAX autodiff, which is what the kernel's custom VJP is tested against.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jax import lax


def group_boundaries(group_sizes_G: jax.Array, m: int) -> tuple[jax.Array, jax.Array]:
    """Returns (starts_G, ends_G): the row range [start, end) of each group, clamped to [0, m]."""
    sizes_G = jnp.maximum(group_sizes_G.astype(jnp.int32), 0)
    ends_G = jnp.minimum(jnp.cumsum(sizes_G), m).astype(jnp.int32)
    starts_G = jnp.concatenate([jnp.zeros((1,), jnp.int32), ends_G[:-1]])
    return starts_G, ends_G


def _row_masks_GM(group_sizes_G: jax.Array, m: int) -> jax.Array:
    """[G, M] bool: mask[g, r] is True iff row r belongs to group g."""
    starts_G, ends_G = group_boundaries(group_sizes_G, m)
    rows_M = jnp.arange(m, dtype=jnp.int32)
    return (rows_M[None, :] >= starts_G[:, None]) & (rows_M[None, :] < ends_G[:, None])


def gmm_reference(
    lhs_MK: jax.Array, rhs_GKN: jax.Array, group_sizes_G: jax.Array, *, preferred_element_type=None
) -> jax.Array:
    """out[r] = lhs[r] @ rhs[g(r)] for each row r of group g(r); rows in no group are 0.

    Products accumulate in float32; the result is cast to `preferred_element_type`
    (default: the promoted input dtype). Returns [M, N].
    """
    out_dtype = preferred_element_type or jnp.result_type(lhs_MK.dtype, rhs_GKN.dtype)
    masks_GM = _row_masks_GM(group_sizes_G, lhs_MK.shape[0])
    lhs_MK = lhs_MK.astype(jnp.float32)

    def one_group(acc_MN, mask_and_rhs):
        mask_M, rhs_KN = mask_and_rhs
        part_MN = jnp.dot(lhs_MK, rhs_KN.astype(jnp.float32), precision=lax.Precision.HIGHEST)
        return acc_MN + jnp.where(mask_M[:, None], part_MN, 0.0), None

    init_MN = jnp.zeros((lhs_MK.shape[0], rhs_GKN.shape[2]), jnp.float32)
    out_MN, _ = lax.scan(one_group, init_MN, (masks_GM, rhs_GKN))
    return out_MN.astype(out_dtype)


def tgmm_reference(
    lhs_MK: jax.Array, grad_MN: jax.Array, group_sizes_G: jax.Array, *, preferred_element_type=None
) -> jax.Array:
    """out[g] = lhs[rows of g]^T @ grad[rows of g]: [G, K, N] (zeros for empty groups).

    This is the weight gradient of `gmm_reference`. Accumulates in float32, result
    cast to `preferred_element_type` (default: the promoted input dtype).
    """
    out_dtype = preferred_element_type or jnp.result_type(lhs_MK.dtype, grad_MN.dtype)
    masks_GM = _row_masks_GM(group_sizes_G, lhs_MK.shape[0])
    lhs_MK = lhs_MK.astype(jnp.float32)
    grad_MN = grad_MN.astype(jnp.float32)

    def one_group(mask_M):
        masked_MK = jnp.where(mask_M[:, None], lhs_MK, 0.0)
        return jnp.dot(masked_MK.T, grad_MN, precision=lax.Precision.HIGHEST)

    return lax.map(one_group, masks_GM).astype(out_dtype)
