"""Expert computation backends for the MoE layer, behind one interface.

Every backend computes, for tokens `x_TD` routed to experts `idx_TK` with weights `w_TK`,

    y_t = sum_k w_tk * down_{e_tk}( relu(up_{e_tk}(x_t))^2 )

with `up_EDF` [experts, hidden, width] and `down_EFD` [experts, width, hidden] (non-gated
squared-ReLU experts, as in Nemotron-3-Nano). The weighted sum is accumulated in fp32 and cast
back to `x_TD.dtype`. Backends are chosen by name from the model config, never by platform.
An index outside `[0, n_experts)` (e.g. `n_experts`) means "no expert": that slot contributes
zero. The expert-parallel exchange (`moe_ep.py`) uses this for padding and dropped tokens.

All backends are dropless. The layer is split into steps:

    route (moe.py) -> permute (`permute`) -> expert matmuls (grouped) -> unpermute (`unpermute`)

Backends:
  dense       the oracle: every token through every expert, masked by the one-hot routing
              weights. Costs `n_experts / top_k` times the useful FLOPs.
  ragged_dot  sorted rows, `jax.lax.ragged_dot` (on XLA:CPU this lowers to a dense masked
              product costing `n_experts` times the useful work; fast on TPU/GPU).
  pallas      sorted rows, `pallas_kernels.gmm` (interpret mode off TPU/GPU).
  sorted      sorted rows padded so each tile of `tile_rows` rows belongs to one expert; a
              loop over the *active* tiles runs each tile through its expert's MLP (hand-written
              backward). Cost = active FLOPs + at most `n_experts *
              tile_rows` padding rows; the fast choice on CPU.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import NamedTuple, Protocol

import jax
import jax.numpy as jnp

from nemocascade.model.layers import make_varying, relu2


class ExpertBackend(Protocol):
    def __call__(
        self,
        x_TD: jax.Array,
        idx_TK: jax.Array,
        w_TK: jax.Array,
        up_EDF: jax.Array,
        down_EFD: jax.Array,
    ) -> jax.Array: ...


_BACKENDS: dict[str, ExpertBackend] = {}


def register_backend(name: str) -> Callable[[ExpertBackend], ExpertBackend]:
    def deco(fn: ExpertBackend) -> ExpertBackend:
        _BACKENDS[name] = fn
        return fn

    return deco


def get_backend(name: str) -> ExpertBackend:
    if name not in _BACKENDS:
        raise ValueError(f"unknown MoE backend {name!r}; available: {sorted(_BACKENDS)}")
    return _BACKENDS[name]


def available_backends() -> tuple[str, ...]:
    return tuple(sorted(_BACKENDS))


# --------------------------------------------------------------------------- dense (oracle)
@register_backend("dense")
def dense_experts(x_TD, idx_TK, w_TK, up_EDF, down_EFD):
    """One-hot reference: all experts on all tokens, combined with a dense [T, E] weight matrix."""
    num_experts = up_EDF.shape[0]
    # one_hot of an out-of-range index is a zero row: "no expert" slots drop out here.
    combine_TE = jnp.sum(
        jax.nn.one_hot(idx_TK, num_experts, dtype=jnp.float32)
        * w_TK[..., None].astype(jnp.float32),
        axis=1,
    )
    h_TEF = relu2(jnp.einsum("td,edf->tef", x_TD, up_EDF))
    y_TED = jnp.einsum("tef,efd->ted", h_TEF, down_EFD)
    y_TD = jnp.einsum("ted,te->td", y_TED.astype(jnp.float32), combine_TE)
    return y_TD.astype(x_TD.dtype)


# --------------------------------------------------------------------------- permute / unpermute
class Permutation(NamedTuple):
    """Where each (token, k) assignment lives in the expert-sorted row buffer of N rows.

    pos_TK:        row of assignment (t, k) in the buffer; N (out of range) if it has no expert.
    assign_N:      assignment `t * K + k` held by buffer row n; `T * K` (out of range) for padding.
    group_sizes_E: rows per expert in the buffer (including tile padding for the tiled layout).
    tile_expert_G: expert of each tile (tiled layout only; else None).
    num_tiles:     number of tiles that hold rows (dynamic scalar; tiled layout only).
    """

    pos_TK: jax.Array
    assign_N: jax.Array
    group_sizes_E: jax.Array
    tile_expert_G: jax.Array | None
    num_tiles: jax.Array | None


def permute(idx_TK: jax.Array, num_experts: int, tile_rows: int | None = None) -> Permutation:
    """Sort the T*K assignments by expert (stable, so token order is kept within an expert).

    Without `tile_rows` the buffer has exactly T*K rows, experts contiguous in order, assignments
    without an expert at the end. With `tile_rows = m`, each expert's group is padded up to a
    multiple of m so every tile of m rows belongs to one expert; the buffer has a static
    `(ceil(T*K/m) + E) * m` rows (the worst case), of which only the first `num_tiles` tiles
    are used.
    """
    T, K = idx_TK.shape
    A = T * K
    e_A = idx_TK.reshape(A).astype(jnp.int32)
    valid_A = (e_A >= 0) & (e_A < num_experts)
    key_A = jnp.where(valid_A, e_A, num_experts)  # "no expert" sorts last
    order_A = jnp.argsort(key_A, stable=True).astype(jnp.int32)  # sorted position -> assignment
    key_sorted = key_A[order_A]
    counts = jnp.zeros((num_experts + 1,), jnp.int32).at[key_A].add(1)
    group_sizes_E = counts[:num_experts]
    start_E1 = jnp.cumsum(counts) - counts  # exclusive cumsum, [E+1]
    rank_A = jnp.arange(A, dtype=jnp.int32) - start_E1[key_sorted]  # rank within its expert
    if tile_rows is None:
        num_rows = A
        row_sorted = jnp.arange(A, dtype=jnp.int32)
        tile_expert, num_tiles = None, None
        padded_sizes = group_sizes_E
    else:
        m = int(tile_rows)
        num_tiles_static = -(-A // m) + num_experts
        num_rows = num_tiles_static * m
        tiles_E = (group_sizes_E + m - 1) // m
        padded_sizes = tiles_E * m
        pstart_E = jnp.cumsum(padded_sizes) - padded_sizes
        pstart_E1 = jnp.concatenate([pstart_E, jnp.array([num_rows], jnp.int32)])
        row_sorted = pstart_E1[key_sorted] + rank_A
        tile_end_E = jnp.cumsum(tiles_E)
        num_tiles = tile_end_E[-1]
        tile_ids = jnp.arange(num_tiles_static, dtype=jnp.int32)
        tile_expert = jnp.minimum(
            jnp.searchsorted(tile_end_E, tile_ids, side="right"), num_experts - 1
        ).astype(jnp.int32)
    row_sorted = jnp.where(key_sorted < num_experts, row_sorted, num_rows)
    pos_A = jnp.zeros((A,), jnp.int32).at[order_A].set(row_sorted)
    assign_N = jnp.full((num_rows,), A, jnp.int32).at[row_sorted].set(order_A, mode="drop")
    return Permutation(pos_A.reshape(T, K), assign_N, padded_sizes, tile_expert, num_tiles)


# The two data movements below are written with gathers in both directions (a custom VJP):
# the map between valid assignments and buffer rows is a bijection, so the transpose of a
# gather by one index is a gather by the other. XLA's default transpose (a scatter-add) is
# several times slower on CPU.
def _take_rows(v, index):
    return jnp.take(v, index, axis=0, mode="fill", fill_value=0)


@jax.custom_vjp
def _tokens_to_rows(x_TD, assign_N, pos_TK):
    return _take_rows(x_TD, assign_N // pos_TK.shape[1])


def _tokens_to_rows_fwd(x_TD, assign_N, pos_TK):
    return _tokens_to_rows(x_TD, assign_N, pos_TK), (assign_N, pos_TK)


def _tokens_to_rows_bwd(res, ct_ND):
    _assign_N, pos_TK = res
    ct_TD = jnp.sum(_take_rows(ct_ND, pos_TK).astype(jnp.float32), axis=1).astype(ct_ND.dtype)
    return ct_TD, None, None


_tokens_to_rows.defvjp(_tokens_to_rows_fwd, _tokens_to_rows_bwd)


@jax.custom_vjp
def _combine(y_ND, w_TK, pos_TK, assign_N):
    """fp32 `y_t = sum_k w_tk * y_ND[pos_tk]` (written as gather * w -> sum so XLA can fuse it
    without a [T, K, D] temporary)."""
    y_TKD = _take_rows(y_ND, pos_TK).astype(jnp.float32)
    return jnp.sum(y_TKD * w_TK.astype(jnp.float32)[..., None], axis=1)


def _combine_fwd(y_ND, w_TK, pos_TK, assign_N):
    return _combine(y_ND, w_TK, pos_TK, assign_N), (y_ND, w_TK, pos_TK, assign_N)


def _combine_bwd(res, dy_TD):
    y_ND, w_TK, pos_TK, assign_N = res
    T, K = pos_TK.shape
    # row n holds assignment a = assign_N[n]: dy_ND[n] = w[a] * dy[a // K] (zero for empty rows)
    w_N = jnp.take(w_TK.reshape(T * K).astype(jnp.float32), assign_N, mode="fill", fill_value=0)
    dy_ND = (_take_rows(dy_TD, assign_N // K) * w_N[:, None]).astype(y_ND.dtype)
    dw_TK = jnp.sum(_take_rows(y_ND, pos_TK).astype(jnp.float32) * dy_TD[:, None, :], axis=-1)
    return dy_ND, dw_TK.astype(w_TK.dtype), None, None


_combine.defvjp(_combine_fwd, _combine_bwd)


def gather_rows(x_TD: jax.Array, perm: Permutation) -> jax.Array:
    """Buffer rows `x_ND[n] = x_TD[token of row n]` (zero for padding rows)."""
    args = (x_TD, perm.assign_N, perm.pos_TK)
    return _tokens_to_rows(*make_varying(args, *args))  # (shard_map: see tiled_expert_mlp)


def unpermute(y_ND: jax.Array, perm: Permutation, w_TK: jax.Array, dtype) -> jax.Array:
    """`y_t = sum_k w_tk * y_ND[pos_tk]`, summed in fp32, cast to `dtype`."""
    args = (y_ND, w_TK, perm.pos_TK, perm.assign_N)
    return _combine(*make_varying(args, *args)).astype(dtype)  # (shard_map: see tiled_expert_mlp)


def _grouped_expert_mlp(gmm: Callable, x_TD, idx_TK, w_TK, up_EDF, down_EFD):
    """permute -> gmm(up) -> relu^2 -> gmm(down) -> unpermute, for row-grouped matmuls."""
    perm = permute(idx_TK, up_EDF.shape[0])
    x_ND = gather_rows(x_TD, perm)
    h_NF = relu2(gmm(x_ND, up_EDF, perm.group_sizes_E))
    y_ND = gmm(h_NF.astype(x_TD.dtype), down_EFD, perm.group_sizes_E)
    return unpermute(y_ND, perm, w_TK, x_TD.dtype)


# --------------------------------------------------------------------------- ragged_dot / pallas
def _ragged_gmm(lhs_ND, rhs_EKN, group_sizes_E):
    return jax.lax.ragged_dot(lhs_ND, rhs_EKN, group_sizes_E)


@register_backend("ragged_dot")
def ragged_dot_experts(x_TD, idx_TK, w_TK, up_EDF, down_EFD):
    """Sorted rows through `jax.lax.ragged_dot` (rows past sum(group_sizes) give zeros)."""
    return _grouped_expert_mlp(_ragged_gmm, x_TD, idx_TK, w_TK, up_EDF, down_EFD)


def _pallas_gmm(lhs_ND, rhs_EKN, group_sizes_E):
    import pallas_kernels  # imported lazily: the kernel package is optional for other backends

    return pallas_kernels.gmm(lhs_ND, rhs_EKN, group_sizes_E)


@register_backend("pallas")
def pallas_experts(x_TD, idx_TK, w_TK, up_EDF, down_EFD):
    """Sorted rows through the Pallas grouped matmul `pallas_kernels.gmm`."""
    return _grouped_expert_mlp(_pallas_gmm, x_TD, idx_TK, w_TK, up_EDF, down_EFD)


# --------------------------------------------------------------------------- sorted (tiled)
MAX_TILE_ROWS = 128


def default_tile_rows(num_rows: int, num_experts: int) -> int:
    """Rows per tile: the largest power of two <= num_rows / (4 * num_experts), clipped to
    [8, MAX_TILE_ROWS]. The padding (about num_experts * tile / 2 rows on average) then stays
    near 1/8 of the rows, while tiles are large enough for efficient matmuls."""
    target = max(1, num_rows // (4 * num_experts))
    return int(min(MAX_TILE_ROWS, max(8, 1 << (target.bit_length() - 1))))


def _tile_loop(n, body, init, *operands):
    """fori_loop over the first `n` tiles. Under `shard_map`, the zero-initialised carry is first
    marked varying over the manual mesh axes its operands vary over (else the loop types clash)."""
    return jax.lax.fori_loop(0, n, body, make_varying(init, n, *operands))


def _dyn(a, i):
    return jax.lax.dynamic_index_in_dim(a, i, 0, keepdims=False)


def _dot_t(a, b, contract_a: int, contract_b: int):
    """fp32-accumulated 2-D dot contracting `a`'s dim `contract_a` with `b`'s `contract_b`."""
    return jax.lax.dot_general(
        a, b, (((contract_a,), (contract_b,)), ((), ())), preferred_element_type=jnp.float32
    )


def tiled_expert_mlp(
    x_GMD: jax.Array,
    up_EDF: jax.Array,
    down_EFD: jax.Array,
    tile_expert_G: jax.Array,
    num_tiles: jax.Array,
) -> jax.Array:
    """`y[g] = relu(x[g] @ up[e_g])^2 @ down[e_g]` (e_g = tile_expert[g]) for tiles g < num_tiles;
    zeros for the rest. x_GMD: G tiles of M rows.

    One loop over the active tiles only, so the cost tracks the rows actually routed.
    Differentiable in x, up and down (hand-written backward: one more loop over the active tiles;
    the pre-activation is kept in fp32 from the forward pass).
    """
    # Under shard_map the operands may vary over different mesh axes (e.g. weights replicated over
    # `data`): align them first so the custom VJP's cotangents match, and JAX's transpose of this
    # cast (a psum) sums the weight gradient over the replicas.
    args = (x_GMD, up_EDF, down_EFD, tile_expert_G, num_tiles)
    return _tiled_expert_mlp(*make_varying(args, *args))


@jax.custom_vjp
def _tiled_expert_mlp(x_GMD, up_EDF, down_EFD, tile_expert_G, num_tiles):
    return _tiled_expert_mlp_fwd(x_GMD, up_EDF, down_EFD, tile_expert_G, num_tiles)[0]


def _tiled_expert_mlp_fwd(x_GMD, up_EDF, down_EFD, tile_expert_G, num_tiles):
    G, M, D = x_GMD.shape
    y_GMD = jnp.zeros((G, M, D), x_GMD.dtype)
    pre_GMF = jnp.zeros((G, M, up_EDF.shape[2]), jnp.float32)

    def body(g, carry):
        y_GMD, pre_GMF = carry
        e = tile_expert_G[g]
        pre_MF = jnp.dot(_dyn(x_GMD, g), _dyn(up_EDF, e), preferred_element_type=jnp.float32)
        h_MF = relu2(pre_MF).astype(x_GMD.dtype)
        y_MD = jnp.dot(h_MF, _dyn(down_EFD, e), preferred_element_type=jnp.float32)
        return (
            jax.lax.dynamic_update_index_in_dim(y_GMD, y_MD.astype(y_GMD.dtype), g, 0),
            jax.lax.dynamic_update_index_in_dim(pre_GMF, pre_MF, g, 0),
        )

    y_GMD, pre_GMF = _tile_loop(
        num_tiles, body, (y_GMD, pre_GMF), x_GMD, up_EDF, down_EFD, tile_expert_G
    )
    return y_GMD, (x_GMD, up_EDF, down_EFD, tile_expert_G, num_tiles, pre_GMF)


def _tiled_expert_mlp_bwd(res, dy_GMD):
    x_GMD, up_EDF, down_EFD, tile_expert_G, num_tiles, pre_GMF = res
    dx_GMD = jnp.zeros_like(x_GMD)
    dup_EDF = jnp.zeros(up_EDF.shape, jnp.float32)
    ddown_EFD = jnp.zeros(down_EFD.shape, jnp.float32)

    def body(g, carry):
        dx_GMD, dup_EDF, ddown_EFD = carry
        e = tile_expert_G[g]
        x_MD, dy_MD = _dyn(x_GMD, g), _dyn(dy_GMD, g)
        r_MF = jax.nn.relu(_dyn(pre_GMF, g))
        h_MF = jnp.square(r_MF).astype(x_MD.dtype)
        dh_MF = _dot_t(dy_MD, _dyn(down_EFD, e), 1, 1)
        dpre_MF = (2.0 * r_MF * dh_MF).astype(x_MD.dtype)
        dx_MD = _dot_t(dpre_MF, _dyn(up_EDF, e), 1, 1)
        dx_GMD = jax.lax.dynamic_update_index_in_dim(dx_GMD, dx_MD.astype(dx_GMD.dtype), g, 0)
        dup_EDF = jax.lax.dynamic_update_index_in_dim(
            dup_EDF, _dyn(dup_EDF, e) + _dot_t(x_MD, dpre_MF, 0, 0), e, 0
        )
        ddown_EFD = jax.lax.dynamic_update_index_in_dim(
            ddown_EFD, _dyn(ddown_EFD, e) + _dot_t(h_MF, dy_MD, 0, 0), e, 0
        )
        return dx_GMD, dup_EDF, ddown_EFD

    dx_GMD, dup_EDF, ddown_EFD = _tile_loop(
        num_tiles,
        body,
        (dx_GMD, dup_EDF, ddown_EFD),
        x_GMD,
        up_EDF,
        down_EFD,
        tile_expert_G,
        dy_GMD,
        pre_GMF,
    )
    return dx_GMD, dup_EDF.astype(up_EDF.dtype), ddown_EFD.astype(down_EFD.dtype), None, None


_tiled_expert_mlp.defvjp(_tiled_expert_mlp_fwd, _tiled_expert_mlp_bwd)


def sorted_experts_tiled(x_TD, idx_TK, w_TK, up_EDF, down_EFD, *, tile_rows: int | None = None):
    """The `sorted` backend with an explicit tile size (rows per single-expert tile; default
    `default_tile_rows`)."""
    T, K = idx_TK.shape
    if tile_rows is None:
        tile_rows = default_tile_rows(T * K, up_EDF.shape[0])
    m = max(1, min(int(tile_rows), T * K))
    perm = permute(idx_TK, up_EDF.shape[0], tile_rows=m)
    G = perm.assign_N.shape[0] // m
    x_GMD = gather_rows(x_TD, perm).reshape(G, m, -1)
    y_GMD = tiled_expert_mlp(x_GMD, up_EDF, down_EFD, perm.tile_expert_G, perm.num_tiles)
    return unpermute(y_GMD.reshape(G * m, -1), perm, w_TK, x_TD.dtype)


@register_backend("sorted")
def sorted_experts(x_TD, idx_TK, w_TK, up_EDF, down_EFD):
    """Dropless tiles of sorted rows; cost tracks the active FLOPs (the fast backend on CPU)."""
    return sorted_experts_tiled(x_TD, idx_TK, w_TK, up_EDF, down_EFD)


# --------------------------------------------------------------------------- entry point
def expert_mlp(x_TD, idx_TK, w_TK, up_EDF, down_EFD, *, backend: str = "dense"):
    """Routed expert MLP with the named backend (see module docstring).

    x_TD [T, D]; idx_TK int [T, K] expert ids (out of range = no expert); w_TK [T, K] combine
    weights; up_EDF [E, D, F]; down_EFD [E, F, D]. Returns [T, D] in x's dtype.
    """
    E, D, F = up_EDF.shape
    if x_TD.ndim != 2 or x_TD.shape[1] != D:
        raise ValueError(
            f"moe_backends.expert_mlp: x_TD {x_TD.shape} does not match up_EDF {up_EDF.shape}"
        )
    if down_EFD.shape != (E, F, D):
        raise ValueError(f"moe_backends.expert_mlp: down_EFD {down_EFD.shape} != {(E, F, D)}")
    if idx_TK.shape != w_TK.shape or idx_TK.shape[0] != x_TD.shape[0] or idx_TK.ndim != 2:
        raise ValueError(
            f"moe_backends.expert_mlp: idx_TK {idx_TK.shape} / w_TK {w_TK.shape} "
            f"do not match x_TD {x_TD.shape}"
        )
    return get_backend(backend)(x_TD, idx_TK, w_TK, up_EDF, down_EFD)
