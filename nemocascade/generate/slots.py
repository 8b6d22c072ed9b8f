"""Slots: per-sequence cache rows that sequences enter, leave and re-enter while others decode.

A *slot cache* is the model's cache (`NemotronH.init_cache`) for S rows ("slots") in which every
attention layer's `KVCache.index` is per row (`[S]` int32) instead of one scalar for the batch, so
each slot sits at its own position: a slot can be refilled with a new sequence (its KV positions
start again at 0) while the other slots go on decoding. Every leaf is batch-major, so inserting or
taking rows is the same indexed update / gather on every leaf:

    cache = init_slots(model, S, max_len)                 # S empty slots
    logits, fresh = prefill_rows(model, ids, seg, max_len, mesh)  # new rows, model layout
    cache = put_rows(cache, slots_M, take_rows(slot_layout(fresh), src_M))
    cache = put_rows(cache, slots_M, rows)                # rows: a slot cache of M rows
    rows = take_rows(cache, slots_M)                      # e.g. to keep a conversation aside
    h, cache = forward(model, ids_BT, seg_BT, cache)      # every row continues at its own index

`forward` is `NemotronH.hidden_states` with per-row positions: attention blocks run under
`jax.vmap` over the rows (each row a batch-1 `KVCache` with a scalar index, the model's own code);
every other block (Mamba, MoE, MLP) runs batched as usual, its cache being per row already. Mamba
states carry only the positions of the cached segment, so a cached call must not start with
padding: `extend` runs new tokens on top of existing slots unpadded, in power-of-two pieces (the
compiled programs are shared between lengths).

Continuation (multi-turn / agentic rollouts): a conversation's slot can be taken aside
(`take_rows`), the slot released and refilled, and the conversation put back later, into any
slot (`put_rows`), and `extend`-ed with only its new tokens (a tool response): its cache then
equals that of one prefill of the whole sequence (`tests/generate/test_slots.py`).
"""

from __future__ import annotations

import functools
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.sharding import Mesh

from nemocascade.generate.request import constrain_batch, empty_routes
from nemocascade.model.attention import KVCache
from nemocascade.model.layers import dtype_of


def prefill_rows(
    model,
    ids_BT,
    seg_BT,
    cache_len: int,
    mesh: Mesh | None,
    chunk: int = 0,
    record_routes: bool = False,
):
    """Runs left-padded prompts through a fresh cache of `cache_len` positions (the model's own
    layout: one scalar index); returns (last-position logits [B, V], cache), and with
    `record_routes` the experts every prompt position used ([B, T, n_moe_layers, K] int32, -1 on
    padding), for routing replay.

    `chunk` > 0 (chunked prefill, for long prompts): the prompt goes through the cache in slices
    of `chunk` positions (the first slice takes the remainder of T / chunk), a `fori_loop` over
    equal slices, so no activation, attention score or SSD block spans more than one slice of the
    prompt: the same cache and logits as one pass up to fp32 summation order."""
    b, t = ids_BT.shape
    cache = constrain_batch(model.init_cache(b, cache_len), mesh)
    routes = empty_routes(model.cfg, b, t) if record_routes else None

    def run(ids, seg, cache, routes, start):
        if not record_routes:
            h, cache = model.hidden_states(ids, seg, cache)
            return h, cache, routes
        h, cache, aux = model.hidden_states(ids, seg, cache, return_aux=True)
        mine = jnp.where(seg[:, :, None, None] > 0, jnp.moveaxis(aux["routes"], 0, 2), -1)
        return h, cache, jax.lax.dynamic_update_slice_in_dim(routes, mine, start, 1)

    ids_rest, seg_rest, start = ids_BT, seg_BT, 0
    if 0 < chunk < t:
        head, n = t % chunk, t // chunk
        if head:
            _, cache, routes = run(ids_BT[:, :head], seg_BT[:, :head], cache, routes, 0)

        def body(i, carry):
            cache, routes = carry
            start = head + i * chunk
            ids = jax.lax.dynamic_slice_in_dim(ids_BT, start, chunk, 1)
            seg = jax.lax.dynamic_slice_in_dim(seg_BT, start, chunk, 1)
            _, cache, routes = run(ids, seg, cache, routes, start)
            return constrain_batch(cache, mesh), routes

        cache, routes = jax.lax.fori_loop(0, n - 1, body, (cache, routes))
        ids_rest, seg_rest, start = ids_BT[:, t - chunk :], seg_BT[:, t - chunk :], t - chunk
    h_BTD, cache, routes = run(ids_rest, seg_rest, cache, routes, start)
    logits_BV = model.logits(h_BTD[:, -1:])[:, 0]
    if record_routes:
        return logits_BV, constrain_batch(cache, mesh), constrain_batch(routes, mesh)
    return logits_BV, constrain_batch(cache, mesh)


@functools.partial(
    jax.jit, static_argnames=("graphdef", "cache_len", "mesh", "chunk", "record_routes")
)
def prefill(
    graphdef,
    state,
    ids_BT,
    seg_BT,
    *,
    cache_len: int,
    mesh: Mesh | None,
    chunk: int = 0,
    record_routes: bool = False,
):
    """`prefill_rows` as one program (the static engine's prefill)."""
    model = nnx.merge(graphdef, state)
    return prefill_rows(model, ids_BT, seg_BT, cache_len, mesh, chunk, record_routes)


def _is_kv(x) -> bool:
    return isinstance(x, KVCache)


def slot_layout(cache: list) -> list:
    """A model cache of B rows (scalar `KVCache.index`) as a slot cache (`index` [B])."""

    def f(c):
        if not _is_kv(c):
            return c
        return c.replace(index=jnp.broadcast_to(c.index, (c.k_BSKH.shape[0],)).astype(jnp.int32))

    return [f(c) for c in cache]


def init_slots(model, slots: int, max_len: int, dtype: Any = None) -> list:
    """An empty slot cache: `slots` rows of `max_len` positions each."""
    return slot_layout(model.init_cache(slots, max_len, dtype))


def take_rows(cache: list, slots_M: jax.Array) -> list:
    """The rows `slots_M` [M] of a slot cache, as a slot cache of M rows."""
    return jax.tree.map(lambda a: jnp.take(a, slots_M, axis=0), cache)


def put_rows(cache: list, slots_M: jax.Array, rows: list) -> list:
    """Writes the M rows of the slot cache `rows` into slots `slots_M` [M] (every layer: KV with
    its positions and index, conv and SSM states). An index >= S is dropped (batch padding)."""
    return jax.tree.map(lambda a, r: a.at[slots_M].set(r.astype(a.dtype), mode="drop"), cache, rows)


def hold_rows(new: list, old: list, active_S: jax.Array) -> list:
    """The slot cache after a decode step with the rows that are not `active_S` kept as they were:
    KV index and Mamba states (the KV entry such a row wrote at its index is masked, and
    overwritten by the row's next tokens, so the [S, L] KV arrays are never copied)."""

    def keep(n, o):
        a = active_S.reshape(active_S.shape + (1,) * (n.ndim - 1))
        return jnp.where(a, n, o)

    out = []
    for n, o in zip(new, old, strict=True):
        if isinstance(n, KVCache):
            out.append(n.replace(index=keep(n.index, o.index)))
        else:
            out.append(jax.tree.map(keep, n, o))
    return out


def _attention_per_row(block, x_BTD, seg_BT, cache: KVCache):
    """One attention block, each row continuing its own cache at its own index."""

    def one(x_TD, seg_T, c):
        c1 = jax.tree.map(lambda a: a if a.ndim == 0 else a[None], c)  # batch 1, scalar index
        y_1TD, c1, _ = block(x_TD[None], seg_T[None], c1)
        return y_1TD[0], jax.tree.map(lambda a: a if a.ndim == 0 else a[0], c1)

    return jax.vmap(one)(x_BTD, seg_BT, cache)


def forward(model, ids_BT: jax.Array, seg_BT: jax.Array, cache: list, record_routes=False):
    """`model.hidden_states(ids, seg, cache)` for a slot cache: returns (final normalised hidden
    states [B, T, D], new slot cache), and with `record_routes` the experts of every new token
    ([B, T, n_moe_layers, K]); row b's new tokens go to positions index[b]...+T."""
    x = jnp.take(model.embed_VD[...], ids_BT, axis=0).astype(dtype_of(model.cfg.compute_dtype))
    new, routes = [], []
    for i, block in model.layer_blocks():
        if _is_kv(cache[i]):
            x, c = _attention_per_row(block, x, seg_BT, cache[i])
        else:
            x, c, aux = block(x, seg_BT, cache[i])
            routes += [] if aux is None else [aux["routes"]]
        new.append(c)
    if not record_routes:
        return model.norm_f(x), new
    b, t = ids_BT.shape
    k = model.cfg.num_experts_per_tok
    stacked = jnp.stack(routes, axis=2) if routes else jnp.zeros((b, t, 0, k), jnp.int32)
    return model.norm_f(x), new, stacked


@functools.partial(
    jax.jit, static_argnames=("graphdef", "all_logits", "record_routes"), donate_argnames=("cache",)
)
def _extend(graphdef, state, cache, slots_M, ids_MT, *, all_logits: bool, record_routes: bool):
    model = nnx.merge(graphdef, state)
    rows = take_rows(cache, slots_M)
    h_MTD, rows, *routes = forward(model, ids_MT, jnp.ones_like(ids_MT), rows, record_routes)
    logits = model.logits(h_MTD if all_logits else h_MTD[:, -1:])
    return logits, put_rows(cache, slots_M, rows), *routes


def pieces(length: int) -> list[int]:
    """`length` as distinct powers of two, largest first (13 -> [8, 4, 1])."""
    return [1 << b for b in reversed(range(int(length).bit_length())) if length >> b & 1]


def extend(
    model_parts: tuple[nnx.GraphDef, Any],
    cache: list,
    slots: Sequence[int],
    new_ids: np.ndarray | Sequence[Sequence[int]],
    *,
    all_logits: bool = False,
    record_routes: bool = False,
) -> tuple:
    """Runs `new_ids` [M, T] (T >= 1 real tokens per row, no padding) on top of what slots
    `slots` [M] hold, each at its own position; returns (logits, new cache): logits [M, T, V]
    with `all_logits`, else those of the last position [M, 1, V] (what the next token is sampled
    from). The caller keeps every slot's length + T within the cache length (a write past the
    end is clamped onto the last position). `cache` is donated (updated in place).
    `record_routes`: also return the experts of every new token ([M, T, n_moe_layers, K], for
    routing replay).

    T is cut into power-of-two pieces, so any length reuses the programs of at most
    log2(T) + 1 sizes; the pieces continue each other exactly as one call would (a cached call
    is a continuation)."""
    graphdef, state = model_parts
    ids = np.asarray(new_ids, np.int32)
    if ids.ndim != 2 or ids.shape[0] != len(slots) or ids.shape[1] < 1:
        raise ValueError(
            f"extend: new_ids must be [len(slots)={len(slots)}, T >= 1], got {ids.shape}"
        )
    slots_M = jnp.asarray(np.asarray(slots, np.int32))
    outs, routes, start = [], [], 0
    for size in pieces(ids.shape[1]):
        logits, cache, *r = _extend(
            graphdef,
            state,
            cache,
            slots_M,
            jnp.asarray(ids[:, start : start + size]),
            all_logits=all_logits,
            record_routes=record_routes,
        )
        outs.append(logits)
        routes += r
        start += size
    logits = jnp.concatenate(outs, axis=1) if all_logits else outs[-1]
    if record_routes:
        return logits, cache, jnp.concatenate(routes, axis=1)
    return logits, cache
