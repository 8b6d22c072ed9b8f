"""Pallas TPU kernels: grouped matmul (gmm) and its transposed form (tgmm).

Both walk the visit list of `metadata.py` (scalar-prefetched into SMEM) and
accumulate in an fp32 VMEM scratch. Shapes need not be multiples of the tiles:
edge blocks are partial, out-of-range rows/columns are masked with `where`
(never multiplied, so garbage or NaN in the padding cannot leak), and writes
past the array end are dropped by Pallas. On CPU/GPU they run with
`interpret=True`.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu

from pallas_kernels.gmm.metadata import GroupMetadata, cdiv, make_group_metadata


def _row_mask(offsets_ref, group, m_tile, tm: int, width: int) -> jax.Array:
    """[tm, width] bool: rows of this row tile that belong to `group`."""
    rows = lax.broadcasted_iota(jnp.int32, (tm, width), 0) + m_tile * tm
    return (rows >= offsets_ref[group]) & (rows < offsets_ref[group + 1])


def _select(mask: jax.Array, x: jax.Array, dtype) -> jax.Array:
    """where(mask, x, 0) computed in fp32 (older TPUs have no bf16 VPU), cast to `dtype`."""
    return jnp.where(mask, x.astype(jnp.float32), 0.0).astype(dtype)


def _mask_cols(x: jax.Array, dim: int, start, limit: int, dtype) -> jax.Array:
    """Zeroes the entries of `x` whose index along `dim` (offset by `start`) is >= limit."""
    idx = lax.broadcasted_iota(jnp.int32, x.shape, dim) + start
    return _select(idx < limit, x, dtype)


def gmm_pallas(
    lhs_MK: jax.Array,
    rhs_GKN: jax.Array,
    group_sizes_G: jax.Array,
    *,
    tiling: tuple[int, int, int],
    out_dtype,
    transpose_rhs: bool = False,
    interpret: bool = False,
) -> jax.Array:
    """out[r] = lhs[r] @ rhs[g(r)] ([M, N]); rows in no group are 0.

    With `transpose_rhs`, rhs is [G, N, K] and each group uses rhs[g]^T (the
    lhs-gradient of gmm, without materialising the transpose).
    """
    m, k = lhs_MK.shape
    num_groups = rhs_GKN.shape[0]
    n = rhs_GKN.shape[1] if transpose_rhs else rhs_GKN.shape[2]
    tm, tk, tn = tiling
    tiles_k, tiles_n = cdiv(k, tk), cdiv(n, tn)
    ragged_k = k % tk != 0
    compute_dtype = jnp.promote_types(lhs_MK.dtype, rhs_GKN.dtype)
    meta = make_group_metadata(group_sizes_G, m=m, tm=tm, for_tgmm=False)

    def kernel(offsets_ref, group_ids_ref, m_tile_ids_ref, lhs_ref, rhs_ref, out_ref, acc_ref):
        visit, k_i = pl.program_id(1), pl.program_id(2)
        group = group_ids_ref[visit]

        @pl.when(k_i == 0)
        def _init():
            acc_ref[...] = jnp.zeros_like(acc_ref)

        def accumulate(mask_k: bool):
            x = lhs_ref[...]  # [tm, tk]
            w = rhs_ref[...]  # [tk, tn] or [tn, tk]
            if mask_k:  # last, partial k tile: zero the out-of-range contraction slice
                x = _mask_cols(x, 1, k_i * tk, k, compute_dtype)
                w = _mask_cols(w, 1 if transpose_rhs else 0, k_i * tk, k, compute_dtype)
            x, w = x.astype(compute_dtype), w.astype(compute_dtype)
            contract = (((1,), (1,)), ((), ())) if transpose_rhs else (((1,), (0,)), ((), ()))
            acc_ref[...] += lax.dot_general(x, w, contract, preferred_element_type=jnp.float32)

        is_real_group = group < num_groups  # the tail pseudo-group only writes zeros
        if ragged_k:
            pl.when(is_real_group & (k_i < tiles_k - 1))(functools.partial(accumulate, False))
            pl.when(is_real_group & (k_i == tiles_k - 1))(functools.partial(accumulate, True))
        else:
            pl.when(is_real_group)(functools.partial(accumulate, False))

        @pl.when(k_i == tiles_k - 1)
        def _store():  # write this group's rows; other rows of the tile keep their value
            mask = _row_mask(offsets_ref, group, m_tile_ids_ref[visit], tm, tn)
            out_ref[...] = jnp.where(mask, acc_ref[...], out_ref[...].astype(jnp.float32)).astype(
                out_ref.dtype
            )

    # Tail visits compute nothing: pin their input blocks to k tile 0 so that the
    # pipeline does not fetch new blocks for them at every k step.
    def lhs_map(n_i, visit, k_i, offsets, group_ids, m_tile_ids):
        return m_tile_ids[visit], jnp.where(group_ids[visit] < num_groups, k_i, 0)

    def rhs_map(n_i, visit, k_i, offsets, group_ids, m_tile_ids):
        is_real = group_ids[visit] < num_groups
        group = jnp.minimum(group_ids[visit], num_groups - 1)
        k_i = jnp.where(is_real, k_i, 0)
        return (group, n_i, k_i) if transpose_rhs else (group, k_i, n_i)

    def out_map(n_i, visit, k_i, offsets, group_ids, m_tile_ids):
        return m_tile_ids[visit], n_i

    rhs_block = (None, tn, tk) if transpose_rhs else (None, tk, tn)
    max_visits = meta.group_ids.shape[0]
    cost = pl.CostEstimate(
        flops=2 * m * k * n,
        transcendentals=0,
        bytes_accessed=(
            lhs_MK.nbytes * tiles_n
            + k * n * rhs_GKN.dtype.itemsize * max_visits
            + m * n * jnp.dtype(out_dtype).itemsize
        ),
    )
    call = pl.pallas_call(
        kernel,
        out_shape=jax.ShapeDtypeStruct((m, n), out_dtype),
        grid_spec=pltpu.PrefetchScalarGridSpec(
            num_scalar_prefetch=3,
            grid=(tiles_n, meta.num_visits, tiles_k),
            in_specs=[pl.BlockSpec((tm, tk), lhs_map), pl.BlockSpec(rhs_block, rhs_map)],
            out_specs=pl.BlockSpec((tm, tn), out_map),
            scratch_shapes=[pltpu.VMEM((tm, tn), jnp.float32)],
        ),
        compiler_params=pltpu.CompilerParams(
            dimension_semantics=("parallel", "arbitrary", "arbitrary")
        ),
        interpret=interpret,
        cost_estimate=cost,
        name="nemocascade_gmm",
    )
    return call(meta.offsets, meta.group_ids, meta.m_tile_ids, lhs_MK, rhs_GKN)


def tgmm_pallas(
    lhs_MK: jax.Array,
    grad_MN: jax.Array,
    group_sizes_G: jax.Array,
    *,
    tiling: tuple[int, int, int],
    out_dtype,
    interpret: bool = False,
) -> jax.Array:
    """out[g] = lhs[rows of g]^T @ grad[rows of g] ([G, K, N]); empty groups give zeros."""
    m, k = lhs_MK.shape
    n = grad_MN.shape[1]
    num_groups = group_sizes_G.shape[0]
    tm, tk, tn = tiling
    tiles_k, tiles_n = cdiv(k, tk), cdiv(n, tn)
    compute_dtype = jnp.promote_types(lhs_MK.dtype, grad_MN.dtype)
    meta: GroupMetadata = make_group_metadata(group_sizes_G, m=m, tm=tm, for_tgmm=True)

    def kernel(offsets_ref, group_ids_ref, m_tile_ids_ref, lhs_ref, grad_ref, out_ref, acc_ref):
        visit, last = pl.program_id(2), pl.num_programs(2) - 1
        group, m_tile = group_ids_ref[visit], m_tile_ids_ref[visit]
        prev_group = group_ids_ref[jnp.maximum(visit - 1, 0)]
        next_group = group_ids_ref[jnp.minimum(visit + 1, last)]

        @pl.when((visit == 0) | (prev_group != group))
        def _init():
            acc_ref[...] = jnp.zeros_like(acc_ref)

        @pl.when(offsets_ref[group + 1] > offsets_ref[group])
        def _accumulate():  # rows outside the group (or past M) are selected away
            x = _select(_row_mask(offsets_ref, group, m_tile, tm, tk), lhs_ref[...], compute_dtype)
            y = _select(_row_mask(offsets_ref, group, m_tile, tm, tn), grad_ref[...], compute_dtype)
            acc_ref[...] += lax.dot(x.T, y, preferred_element_type=jnp.float32)  # [tk, tn]

        @pl.when((visit == last) | (next_group != group))
        def _store():
            out_ref[...] = acc_ref[...].astype(out_ref.dtype)

    def lhs_map(k_i, n_i, visit, offsets, group_ids, m_tile_ids):
        return m_tile_ids[visit], k_i

    def grad_map(k_i, n_i, visit, offsets, group_ids, m_tile_ids):
        return m_tile_ids[visit], n_i

    def out_map(k_i, n_i, visit, offsets, group_ids, m_tile_ids):
        return group_ids[visit], k_i, n_i

    cost = pl.CostEstimate(
        flops=2 * m * k * n,
        transcendentals=0,
        bytes_accessed=(
            lhs_MK.nbytes * tiles_n
            + grad_MN.nbytes * tiles_k
            + num_groups * k * n * jnp.dtype(out_dtype).itemsize
        ),
    )
    call = pl.pallas_call(
        kernel,
        out_shape=jax.ShapeDtypeStruct((num_groups, k, n), out_dtype),
        grid_spec=pltpu.PrefetchScalarGridSpec(
            num_scalar_prefetch=3,
            grid=(tiles_k, tiles_n, meta.num_visits),
            in_specs=[pl.BlockSpec((tm, tk), lhs_map), pl.BlockSpec((tm, tn), grad_map)],
            out_specs=pl.BlockSpec((None, tk, tn), out_map),
            scratch_shapes=[pltpu.VMEM((tk, tn), jnp.float32)],
        ),
        compiler_params=pltpu.CompilerParams(
            dimension_semantics=("parallel", "parallel", "arbitrary")
        ),
        interpret=interpret,
        cost_estimate=cost,
        name="nemocascade_tgmm",
    )
    return call(meta.offsets, meta.group_ids, meta.m_tile_ids, lhs_MK, grad_MN)
