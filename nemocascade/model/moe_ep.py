"""Expert parallelism: experts sharded over the mesh's `expert` axis, tokens exchanged with
`all_to_all` inside `jax.shard_map`.

Per device (tokens sharded over the batch axes, `T_l` tokens, `K` choices, `P` = expert-axis size,
`E_l = E / P` local experts):

  1. dispatch: each assignment (t, k) goes to device `idx // E_l`; it gets a slot (its rank among
     this device's assignments to that destination, in token order) in a static send buffer
     `[P, C, D]` (+ the local expert id of each slot).
  2. `all_to_all` over `expert`: device p receives `[P, C, D]`, the rows all sources sent to it.
  3. the local experts run on the received rows through any `moe_backends` backend (one expert
     per row, weight 1; empty slots carry the out-of-range id `E_l`, i.e. "no expert").
  4. `all_to_all` back; the source combines `y_t = sum_k w_tk * row(t, k)` in fp32.

`ragged_all_to_all` is not implemented on XLA:CPU, so the exchange uses static padded buffers:

  * dropless (default, `capacity_factor=None`): `C = T_l * min(K, E_l)`, the worst case (a token
    sends at most min(K, E_l) rows to one device), so nothing is ever dropped.
  * `capacity_factor=c`: `C = ceil(c * T_l * K / P)` rows per (source, destination) pair, i.e.
    `c` times the balanced load; assignments past it (latest tokens first) are dropped (they
    contribute zero) and counted in the returned `dropped` (a global count).

The routing weights are applied at the source, so with fp32 the result equals the single-device
`moe_backends.expert_mlp` up to summation order. Gradients flow through `all_to_all` (its
transpose is the reverse exchange); expert-weight gradients stay on their expert shard and are
summed over the other batch axes by `shard_map`.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import jax
import jax.numpy as jnp
from jax.sharding import Mesh
from jax.sharding import PartitionSpec as P

from nemocascade import sharding
from nemocascade.model import moe_backends
from nemocascade.model.moe_balance import expert_counts

EXPERT_AXIS = "expert"


def capacity(
    tokens_per_device: int,
    top_k: int,
    num_experts: int,
    ep_size: int,
    capacity_factor: float | None,
) -> int:
    """Rows per (source, destination) pair of the send buffer (see the module docstring)."""
    worst = tokens_per_device * min(top_k, num_experts // ep_size)
    if capacity_factor is None:
        return max(worst, 1)
    if capacity_factor <= 0:
        raise ValueError(
            f"moe_ep: capacity_factor must be > 0 (or None for dropless), got {capacity_factor}"
        )
    return max(1, min(worst, math.ceil(capacity_factor * tokens_per_device * top_k / ep_size)))


def dispatch_permutation(
    idx_TK: jax.Array, num_experts: int, ep_size: int, cap: int
) -> tuple[moe_backends.Permutation, jax.Array, jax.Array]:
    """Slots of the `[ep_size * cap]` send buffer for a device's assignments.

    Returns (perm, local_expert_N, dropped): `perm.pos_TK` is the slot of each (t, k) (out of range
    if dropped or routed nowhere), `perm.assign_N` the assignment in each slot (out of range if
    empty), `local_expert_N` the destination-local expert id per slot (`E_l` if empty), `dropped`
    the number of valid assignments that did not fit.
    """
    T, K = idx_TK.shape
    A, N = T * K, ep_size * cap
    e_local = num_experts // ep_size
    e_A = idx_TK.reshape(A).astype(jnp.int32)
    valid_A = (e_A >= 0) & (e_A < num_experts)
    dest_A = jnp.where(valid_A, e_A // e_local, ep_size)  # ep_size = nowhere
    onehot_AP = jax.nn.one_hot(dest_A, ep_size, dtype=jnp.int32)
    rank_A = jnp.sum((jnp.cumsum(onehot_AP, axis=0) - 1) * onehot_AP, axis=1)
    keep_A = valid_A & (rank_A < cap)
    slot_A = jnp.where(keep_A, dest_A * cap + rank_A, N)
    arange_A = jnp.arange(A, dtype=jnp.int32)
    assign_N = jnp.full((N,), A, jnp.int32).at[slot_A].set(arange_A, mode="drop")
    local_A = jnp.where(valid_A, e_A % e_local, e_local)
    local_expert_N = jnp.take(local_A, assign_N, mode="fill", fill_value=e_local)
    dropped = jnp.sum(valid_A & ~keep_A)
    perm = moe_backends.Permutation(slot_A.reshape(T, K), assign_N, None, None, None)
    return perm, local_expert_N, dropped


def expert_parallel_mlp(
    x_TD: jax.Array,
    idx_TK: jax.Array,
    w_TK: jax.Array,
    up_EDF: jax.Array,
    down_EFD: jax.Array,
    *,
    mesh: Mesh | None,
    capacity_factor: float | None = None,
    backend: str = "sorted",
) -> tuple[jax.Array, jax.Array]:
    """`moe_backends.expert_mlp` with experts sharded over `mesh`'s expert axis.

    x_TD [T, D] (T = all tokens of the global batch, sharded over the batch axes), idx_TK, w_TK
    [T, K], up_EDF [E, D, F], down_EFD [E, F, D]. Returns (y_TD, dropped) where `dropped` is the
    global number of dropped assignments (always 0 when dropless). Without a mesh or with an
    expert axis of size 1 this is the plain single-device backend.

    On a mesh with a `context` axis the tokens may come as [B, T, D] (idx, w [B, T, K]): each
    device then dispatches its own (batch shard, sequence slice) tokens, as laid out by the
    context-parallel layers, and y has the same shape.
    """
    if x_TD.ndim == 3:
        return _sequence_parallel_mlp(
            x_TD, idx_TK, w_TK, up_EDF, down_EFD, mesh, capacity_factor, backend
        )
    E, D, _F = up_EDF.shape
    T, K = idx_TK.shape
    if mesh is None or mesh.shape.get(EXPERT_AXIS, 1) == 1:
        y = moe_backends.expert_mlp(x_TD, idx_TK, w_TK, up_EDF, down_EFD, backend=backend)
        return y, jnp.zeros((), jnp.int32)
    ep = _expert_shards(E, mesh)
    axes = sharding.batch_axes(mesh)
    if EXPERT_AXIS not in axes:
        raise ValueError(
            f"moe_ep: the batch axes {axes} must include '{EXPERT_AXIS}' "
            f"(see sharding.LOGICAL_RULES['batch'])"
        )
    shards = math.prod(mesh.shape[a] for a in axes)
    if T % shards:
        raise ValueError(
            f"moe_ep: {T} tokens do not divide over the batch axes {axes} ({shards} shards)"
        )
    local = _local_exchange(T // shards, K, E, ep, D, capacity_factor, backend, axes)
    tok, exp = P(axes, None), P(EXPERT_AXIS, None, None)
    fn = jax.shard_map(local, mesh=mesh, in_specs=(tok, tok, tok, exp, exp), out_specs=(tok, P()))
    return fn(x_TD, idx_TK, w_TK, up_EDF, down_EFD)


def _expert_shards(n_experts: int, mesh: Mesh) -> int:
    """The mesh's expert-axis size, which must divide the expert count."""
    ep = mesh.shape[EXPERT_AXIS]
    if n_experts % ep:
        raise ValueError(f"moe_ep: {n_experts} experts do not divide over expert axis of size {ep}")
    return ep


def _sequence_parallel_mlp(x_BTD, idx_BTK, w_BTK, up_EDF, down_EFD, mesh, capacity_factor, backend):
    """`expert_parallel_mlp` of [B, T, ...] tokens sharded over the batch axes and `context`."""
    (B, T, D), K, E = x_BTD.shape, idx_BTK.shape[-1], up_EDF.shape[0]
    if mesh is None or mesh.shape.get(EXPERT_AXIS, 1) == 1:
        y, dropped = expert_parallel_mlp(
            x_BTD.reshape(B * T, D),
            idx_BTK.reshape(B * T, K),
            w_BTK.reshape(B * T, K),
            up_EDF,
            down_EFD,
            mesh=mesh,
            capacity_factor=capacity_factor,
            backend=backend,
        )
        return y.reshape(B, T, D), dropped
    ep = _expert_shards(E, mesh)
    spec = sharding.logical_to_spec(("batch", "seq"), mesh=mesh)
    c_sh = mesh.shape.get("context", 1)
    axes = sharding.batch_axes(mesh) + (("context",) if c_sh > 1 else ())
    if EXPERT_AXIS not in axes:
        raise ValueError(f"moe_ep: the batch axes of {spec} must include '{EXPERT_AXIS}'")
    b_sh = math.prod(mesh.shape[a] for a in sharding.batch_axes(mesh))
    if B % b_sh or T % c_sh:
        raise ValueError(
            f"moe_ep: [{B}, {T}] tokens do not divide over the mesh's batch ({b_sh}) and context "
            f"({c_sh}) shards"
        )
    tokens = (B // b_sh) * (T // c_sh)
    flat = _local_exchange(tokens, K, E, ep, D, capacity_factor, backend, axes)

    def local(x, idx, w, up, down):
        b, t = x.shape[:2]
        y, dropped = flat(x.reshape(b * t, D), idx.reshape(b * t, K), w.reshape(b * t, K), up, down)
        return y.reshape(b, t, D), dropped

    tok, exp = P(*spec, None), P(EXPERT_AXIS, None, None)
    fn = jax.shard_map(local, mesh=mesh, in_specs=(tok, tok, tok, exp, exp), out_specs=(tok, P()))
    return fn(x_BTD, idx_BTK, w_BTK, up_EDF, down_EFD)


def _local_exchange(tokens: int, K: int, E: int, ep: int, D: int, capacity_factor, backend, axes):
    """The per-device body of the exchange (module docstring, steps 1-4) for `tokens` local
    tokens; `dropped` is summed over the token `axes`."""
    cap = capacity(tokens, K, E, ep, capacity_factor)

    def local(x_TD, idx_TK, w_TK, up_EDF, down_EFD):
        perm, local_e_N, dropped = dispatch_permutation(idx_TK, E, ep, cap)
        send_ND = moe_backends.gather_rows(x_TD, perm)
        recv_PCD = jax.lax.all_to_all(send_ND.reshape(ep, cap, D), EXPERT_AXIS, 0, 0)
        recv_e_PC = jax.lax.all_to_all(local_e_N.reshape(ep, cap), EXPERT_AXIS, 0, 0)
        rows = ep * cap
        ones_R1 = jnp.ones((rows, 1), jnp.float32)
        out_RD = moe_backends.expert_mlp(
            recv_PCD.reshape(rows, D),
            recv_e_PC.reshape(rows, 1),
            ones_R1,
            up_EDF,
            down_EFD,
            backend=backend,
        )
        back_ND = jax.lax.all_to_all(out_RD.reshape(ep, cap, D), EXPERT_AXIS, 0, 0).reshape(rows, D)
        y_TD = moe_backends.unpermute(back_ND, perm, w_TK, x_TD.dtype)
        return y_TD, jax.lax.psum(dropped, axes)

    return local


def expert_mesh(mesh: Mesh | None) -> Mesh | None:
    """`mesh` if its expert axis has more than one device (experts are then sharded), else None
    (the MoE layer runs the single-device backend)."""
    if mesh is None or mesh.shape.get(EXPERT_AXIS, 1) == 1:
        return None
    return mesh


def global_expert_counts(
    idx_TK: jax.Array, num_experts: int, axis_names: Sequence[str], valid_T: jax.Array | None = None
) -> jax.Array:
    """Inside `shard_map`: the global-batch expert counts (local counts `psum`-ed over the batch
    axes), the input of `moe_balance.update_expert_bias`. Outside shard_map (plain jit over
    sharded arrays) use `moe_balance.expert_counts` directly: its sum is already global."""
    return jax.lax.psum(expert_counts(idx_TK, num_experts, valid_T), tuple(axis_names))
