"""Context parallelism: each sequence sharded over the mesh's `context` axis (contiguous slices of
`T_l = T / cp` positions, device i holding positions [i T_l, (i + 1) T_l)), for the two layers that
mix positions. Everything else in a block is position-wise and runs on the local slice (the
model constrains its hidden states to [batch, seq] over the batch axes and `context`, and the MoE
exchange sends each device's own tokens).

Attention (`attention.context_parallel_attention`): each device keeps its queries and
all-gathers the keys, values and key segment ids over the axis (`[B, T, K, H]` per device,
against a ring's `[B, 2 T_l, K, H]`: the simple exchange, chosen because a NemotronH model has 6
attention layers in 52 and GQA with 2 kv heads keeps the gathered KV small; in the backward pass
its transpose is a reduce-scatter of the key / value gradients). Queries sit at their global
positions, so the causal mask and the block skipping of `blockwise_attention` (or the naive mask)
are those of the whole sequence.

Mamba-2 (`mamba2.context_parallel_mixer`), both sequential parts:
  * the causal conv needs the K-1 inputs before the slice: a halo of K-1 positions (with their
    segment ids) is passed from device i to i+1 (`ppermute`; device 0 gets no halo);
  * the chunked SSD scan runs on the slice from a zero state. Its output is linear in the initial
    state, so the state entering slice i is combined afterwards: every device all-gathers each
    slice's final state (of its last segment), the summed log-decay `sum_t dt_t a` over the slice
    and the slice's first / last segment ids; device i folds the states of slices < i
    (`S_in(j+1) = final_j + [slice j is one segment continuing S_in(j)] exp(decay_j) S_in(j)`)
    and adds `y_t += exp(cum_t) C_t . S_in` to the positions of its first segment when that
    segment continues from the previous slice (`cum_t`: the inclusive log-decay from the slice
    start).
Segment ids are assumed to be contiguous runs (packing), as `mamba2.ssd_scan` assumes across
chunks; a reset anywhere cuts every carried path exactly as on one device.

Both run inside `jax.shard_map` over the batch axes and `context` (the `seq` logical axis), with
attention heads also over `tensor` when they divide. This module holds the pieces they share
(the mesh check, the specs, the halo and the state fold); the layers compose them. Only the
forward without a cache (training, scoring, log-probs) is context parallel; a cached call
(generation) runs the single-device path under the mesh's automatic partitioning.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jax import lax
from jax.sharding import Mesh
from jax.sharding import PartitionSpec as P

from nemocascade import sharding

CONTEXT_AXIS = "context"


def context_mesh(mesh: Mesh | None) -> Mesh | None:
    """`mesh` if its context axis has more than one device (sequences are then sharded), else
    None (the single-device layers)."""
    if mesh is None or mesh.shape.get(CONTEXT_AXIS, 1) == 1:
        return None
    return mesh


def seq_spec(mesh: Mesh, ndim: int, tail: tuple = ()) -> P:
    """[batch, seq, ...] over the batch axes and `context`; `tail` names the next dims' axes."""
    lead = sharding.logical_to_spec(("batch", "seq"), mesh=mesh)
    return P(*lead, *(tail + (None,) * (ndim - 2 - len(tail))))


def local_length(t: int, mesh: Mesh, what: str, min_local: int = 1) -> int:
    """T_l, the positions per device; a clear error when `t` does not split."""
    cp = mesh.shape[CONTEXT_AXIS]
    if t % cp or t // cp < min_local:
        raise ValueError(
            f"{what}: sequence length {t} must split into {cp} slices (the mesh's context axis) "
            f"of at least {min_local} positions each"
        )
    return t // cp


# ------------------------------------------------------------- inside shard_map over `context`
def offset(t_l: int) -> jax.Array:
    """Global position of this device's first position."""
    return lax.axis_index(CONTEXT_AXIS) * t_l


def gather(x_BT):
    """The whole sequence [B, T, ...] from every device's slice (the transpose of the backward
    pass is a reduce-scatter)."""
    return lax.all_gather(x_BT, CONTEXT_AXIS, axis=1, tiled=True)


def halo(x_BTC, seg_BT, k1: int):
    """The last `k1` inputs and segment ids of the previous slice (device 0: zeros, segment -1)."""
    cp = lax.axis_size(CONTEXT_AXIS)
    shift = [(i, i + 1) for i in range(cp - 1)]
    prev_x = lax.ppermute(x_BTC[:, -k1:], CONTEXT_AXIS, shift)
    prev_seg = lax.ppermute(seg_BT[:, -k1:], CONTEXT_AXIS, shift)
    first = lax.axis_index(CONTEXT_AXIS) == 0
    return prev_x, jnp.where(first, -1, prev_seg)


def entering_state(final_BHPN, decay_BH, seg_first_B, seg_last_B):
    """The state of a linear recurrence entering this device's slice (zero where the slice's first
    segment does not continue from the previous slice), from every slice's final state (of its
    last segment, started from zero) and summed log-decay."""
    finals = lax.all_gather(final_BHPN, CONTEXT_AXIS)  # [cp, B, H, P, N]
    decays = lax.all_gather(decay_BH, CONTEXT_AXIS)  # [cp, B, H]
    firsts = lax.all_gather(seg_first_B, CONTEXT_AXIS)  # [cp, B]
    lasts = lax.all_gather(seg_last_B, CONTEXT_AXIS)
    entering = [jnp.zeros_like(final_BHPN)]  # into slice 0
    for j in range(finals.shape[0] - 1):
        # slice j passes its entering state on iff it is one segment continuing that state's
        through = (firsts[j] == lasts[j]) & (
            (lasts[j - 1] == firsts[j]) if j > 0 else jnp.zeros_like(firsts[j], bool)
        )
        carried = jnp.exp(decays[j])[..., None, None] * entering[j]
        entering.append(finals[j] + jnp.where(through[:, None, None, None], carried, 0.0))
    i = lax.axis_index(CONTEXT_AXIS)
    prev_last = jnp.where(i > 0, lasts[jnp.maximum(i - 1, 0)], -1)
    continues = prev_last == seg_first_B
    return jnp.where(continues[:, None, None, None], jnp.stack(entering)[i], 0.0)
