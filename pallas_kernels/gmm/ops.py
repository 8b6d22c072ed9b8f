"""The public grouped-matmul ops: `gmm` (custom VJP) and `tgmm`.

Backend choice, made here from `jax.default_backend()` and nowhere else:

* `impl=None` -> "ragged_dot" on GPU, "pallas" everywhere else.
  "pallas" is the TPU kernel of `kernels.py`; "ragged_dot" is `lax.ragged_dot`
  / `lax.ragged_dot_general`, which XLA lowers to a grouped GEMM on GPU (see
  README.md for why we do not write a Pallas GPU kernel). Both are selectable on
  every backend.
* `interpret=None` -> native on TPU, `interpret=True` elsewhere (the TPU kernel
  cannot be compiled for CPU/GPU; interpret mode runs it as plain JAX ops).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax import lax

from pallas_kernels.gmm import kernels
from pallas_kernels.gmm.tiling import resolve_tiling

IMPLS = ("pallas", "ragged_dot")


def _resolve_impl(impl: str | None) -> str:
    if impl is None:
        return "ragged_dot" if jax.default_backend() == "gpu" else "pallas"
    if impl not in IMPLS:
        raise ValueError(f"gmm: impl must be one of {IMPLS} or None, got {impl!r}")
    return impl


def _resolve_interpret(interpret: bool | None) -> bool:
    return jax.default_backend() != "tpu" if interpret is None else bool(interpret)


def _check_args(name: str, lhs, other, group_sizes, other_ndim: int) -> None:
    if lhs.ndim != 2:
        raise ValueError(f"{name}: lhs must be [M, K], got shape {lhs.shape}")
    if other.ndim != other_ndim:
        raise ValueError(f"{name}: second operand must have {other_ndim} dims, got {other.shape}")
    if group_sizes.ndim != 1 or not jnp.issubdtype(group_sizes.dtype, jnp.integer):
        raise ValueError(
            f"{name}: group_sizes must be a 1-D integer array, got "
            f"{group_sizes.dtype}{list(group_sizes.shape)}"
        )
    if group_sizes.shape[0] == 0:
        raise ValueError(f"{name}: need at least one group, got group_sizes of shape [0]")
    for x in (lhs, other):
        if not jnp.issubdtype(x.dtype, jnp.floating):
            raise ValueError(f"{name}: operands must be floating point, got {x.dtype}")


# ----------------------------------------------------------------- raw (non-differentiable)


def _gmm_raw(
    lhs_MK, rhs_GKN, group_sizes_G, *, out_dtype, impl, interpret, tiling, transpose_rhs=False
):
    """[M, N] grouped matmul with fp32 accumulation; rhs is [G, N, K] if transpose_rhs."""
    m, k = lhs_MK.shape
    n = rhs_GKN.shape[1] if transpose_rhs else rhs_GKN.shape[2]
    if m == 0 or k == 0:
        return jnp.zeros((m, n), out_dtype)
    if impl == "ragged_dot":
        rhs = rhs_GKN.swapaxes(1, 2) if transpose_rhs else rhs_GKN
        sizes_G = jnp.maximum(group_sizes_G, 0)  # negative sizes count as 0, as in the kernel
        out = lax.ragged_dot(lhs_MK, rhs, sizes_G, preferred_element_type=jnp.float32)
        return out.astype(out_dtype)
    tiles = resolve_tiling(tiling, m, k, n, rhs_GKN.shape[0], native=not interpret)
    return kernels.gmm_pallas(
        lhs_MK,
        rhs_GKN,
        group_sizes_G,
        tiling=tiles,
        out_dtype=out_dtype,
        transpose_rhs=transpose_rhs,
        interpret=interpret,
    )


def _tgmm_raw(lhs_MK, grad_MN, group_sizes_G, *, out_dtype, impl, interpret, tiling):
    """[G, K, N]: per-group lhs^T @ grad with fp32 accumulation."""
    (m, k), n, g = lhs_MK.shape, grad_MN.shape[1], group_sizes_G.shape[0]
    if m == 0:
        return jnp.zeros((g, k, n), out_dtype)
    if impl == "ragged_dot":
        dims = lax.RaggedDotDimensionNumbers(
            dot_dimension_numbers=(([0], [0]), ([], [])),
            lhs_ragged_dimensions=[0],
            rhs_group_dimensions=[],
        )
        sizes_G = jnp.maximum(group_sizes_G, 0)
        # ragged_dot_general has no notion of rows after the last group: zero them.
        rows_M = jnp.arange(m)
        valid_M = rows_M < jnp.minimum(jnp.sum(sizes_G), m)
        lhs_MK = jnp.where(valid_M[:, None], lhs_MK, 0)
        grad_MN = jnp.where(valid_M[:, None], grad_MN, 0)
        out = lax.ragged_dot_general(
            lhs_MK, grad_MN, sizes_G, dims, preferred_element_type=jnp.float32
        )
        return out.astype(out_dtype)
    tiles = resolve_tiling(tiling, m, k, n, g, native=not interpret)
    return kernels.tgmm_pallas(
        lhs_MK, grad_MN, group_sizes_G, tiling=tiles, out_dtype=out_dtype, interpret=interpret
    )


# ----------------------------------------------------------------- custom VJP


@functools.partial(jax.custom_vjp, nondiff_argnums=(3, 4, 5, 6))
def _gmm_op(lhs_MK, rhs_GKN, group_sizes_G, out_dtype, impl, interpret, tiling):
    return _gmm_raw(
        lhs_MK,
        rhs_GKN,
        group_sizes_G,
        out_dtype=out_dtype,
        impl=impl,
        interpret=interpret,
        tiling=tiling,
    )


def _gmm_fwd(lhs_MK, rhs_GKN, group_sizes_G, out_dtype, impl, interpret, tiling):
    out = _gmm_op(lhs_MK, rhs_GKN, group_sizes_G, out_dtype, impl, interpret, tiling)
    return out, (lhs_MK, rhs_GKN, group_sizes_G)


def _gmm_bwd(out_dtype, impl, interpret, tiling, residuals, grad_MN):
    lhs_MK, rhs_GKN, group_sizes_G = residuals
    # d_lhs contracts over N and outputs K: swap the fwd tiling's tk and tn
    dlhs_tiling = None if tiling is None else (tiling[0], tiling[2], tiling[1])
    d_lhs = _gmm_raw(
        grad_MN,
        rhs_GKN,
        group_sizes_G,
        out_dtype=lhs_MK.dtype,
        impl=impl,
        interpret=interpret,
        tiling=dlhs_tiling,
        transpose_rhs=True,
    )  # no-group rows: 0
    d_rhs = _tgmm_raw(
        lhs_MK,
        grad_MN,
        group_sizes_G,
        out_dtype=rhs_GKN.dtype,
        impl=impl,
        interpret=interpret,
        tiling=tiling,
    )
    return d_lhs, d_rhs, None


_gmm_op.defvjp(_gmm_fwd, _gmm_bwd)


def gmm(
    lhs,
    rhs,
    group_sizes,
    *,
    interpret: bool | None = None,
    tiling=None,
    preferred_element_type=None,
    impl: str | None = None,
) -> jax.Array:
    """Grouped matmul: out[r] = lhs[r] @ rhs[g(r)], rows sorted by group.

    Args:
      lhs: [M, K] float (f32 or bf16), rows sorted by group.
      rhs: [G, K, N] float, one matrix per group.
      group_sizes: [G] int32 rows per group (not differentiable). Group g owns rows
        [sum(sizes[:g]), sum(sizes[:g+1])) clamped to M; rows after the last group
        produce zeros (and get zero gradient). Negative sizes count as 0.
      interpret: None = native kernel on TPU, interpret mode elsewhere.
      tiling: None (per-generation default, see tiling.py) or (tm, tk, tn).
      preferred_element_type: output dtype (default: promoted input dtype).
        Accumulation is always float32.
      impl: None (ragged_dot on GPU, pallas elsewhere), "pallas" or "ragged_dot".

    Returns:
      [M, N]. Differentiable in lhs and rhs (custom VJP: dlhs = gmm(grad, rhs^T),
      drhs = tgmm(lhs, grad)).
    """
    lhs, rhs, group_sizes = jnp.asarray(lhs), jnp.asarray(rhs), jnp.asarray(group_sizes)
    _check_args("gmm", lhs, rhs, group_sizes, 3)
    if lhs.shape[1] != rhs.shape[1] or group_sizes.shape[0] != rhs.shape[0]:
        raise ValueError(
            f"gmm: shapes do not match: lhs {lhs.shape} [M, K], rhs {rhs.shape} "
            f"[G, K, N], group_sizes {group_sizes.shape} [G]"
        )
    out_dtype = jnp.dtype(preferred_element_type or jnp.result_type(lhs.dtype, rhs.dtype))
    tiling = None if tiling is None else tuple(tiling)
    return _gmm_op(
        lhs,
        rhs,
        group_sizes.astype(jnp.int32),
        out_dtype,
        _resolve_impl(impl),
        _resolve_interpret(interpret),
        tiling,
    )


def tgmm(
    lhs,
    grad,
    group_sizes,
    *,
    interpret: bool | None = None,
    tiling=None,
    preferred_element_type=None,
    impl: str | None = None,
) -> jax.Array:
    """Transposed grouped matmul: out[g] = lhs[rows of g]^T @ grad[rows of g].

    lhs: [M, K], grad: [M, N], group_sizes: [G] -> [G, K, N] (zeros for empty
    groups; rows after the last group are ignored). This is the weight gradient
    of `gmm`. Same options as `gmm`; not itself differentiable.
    """
    lhs, grad, group_sizes = jnp.asarray(lhs), jnp.asarray(grad), jnp.asarray(group_sizes)
    _check_args("tgmm", lhs, grad, group_sizes, 2)
    if lhs.shape[0] != grad.shape[0]:
        raise ValueError(f"tgmm: lhs {lhs.shape} [M, K] and grad {grad.shape} [M, N] differ in M")
    out_dtype = jnp.dtype(preferred_element_type or jnp.result_type(lhs.dtype, grad.dtype))
    tiling = None if tiling is None else tuple(tiling)
    return _tgmm_raw(
        lhs,
        grad,
        group_sizes.astype(jnp.int32),
        out_dtype=out_dtype,
        impl=_resolve_impl(impl),
        interpret=_resolve_interpret(interpret),
        tiling=tiling,
    )
