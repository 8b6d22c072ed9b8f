"""On-device programs of multi-turn decoding (`rl.episodes`): S slots, each holding one episode
at its own position and turn.

The slot state is `generate.continuous.SlotState` with one change of meaning: `step_S` is the
position in the episode of the token sampled next (the sampling key's step), and `toks_SG` /
`lps_SG` / `lprs_SG` [S, max_episode_tokens] hold each sampled token at its position, and
`routes_SG` (routing replay) the experts of every position the slot has run: fed tokens by
`feed`, sampled ones by the decode loop as they are fed back.

    empty_state   S empty slots
    reset_rows    zero some slots (a new episode)
    feed          run new tokens on top of a slot's cached state (`slots.extend`)
    start_turn    sample a turn's first token from `feed`'s logits, set the slot's turn state

Decoding is `generate.continuous.decode_loop` with `hold_finished=True`: a slot whose turn has
ended keeps its cached state (`slots.hold_rows`) until its tools answer.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence

import jax
import jax.numpy as jnp
from flax import nnx
from jax.sharding import Mesh

from nemocascade.generate import slots as sl
from nemocascade.generate.continuous import SlotState
from nemocascade.generate.request import (
    LENGTH,
    RUNNING,
    bucket,
    classify,
    constrain_batch,
    empty_routes,
)
from nemocascade.generate.sampling import SamplingMode, row_keys, sample_step


@functools.partial(
    jax.jit, static_argnames=("graphdef", "slots", "length", "mesh", "record_routes")
)
def empty_state(
    graphdef, state, *, slots: int, length: int, mesh: Mesh | None, record_routes: bool = False
) -> SlotState:
    zeros = jnp.zeros((slots,), jnp.int32)
    model = nnx.merge(graphdef, state)
    routes = empty_routes(model.cfg, slots, length) if record_routes else None
    st = SlotState(
        cache=sl.init_slots(model, slots, length),
        tok_S=zeros,
        step_S=zeros,
        row_S=zeros - 1,
        budget_S=zeros + 1,
        reason_S=zeros + LENGTH,
        length_S=zeros,
        toks_SG=jnp.zeros((slots, length), jnp.int32),
        lps_SG=jnp.zeros((slots, length), jnp.float32),
        lprs_SG=jnp.zeros((slots, length), jnp.float32),
        routes_SG=routes,
    )
    return constrain_batch(st, mesh)


@functools.partial(jax.jit, donate_argnames=("cache",))
def reset_rows(cache: list, slots_M: jax.Array) -> list:
    """Zeroes the rows `slots_M` (an empty cache is all zeros: KV index 0, Mamba states 0)."""
    return jax.tree.map(lambda a: a.at[slots_M].set(0), cache)


@functools.partial(jax.jit, static_argnames=("mode", "mesh"), donate_argnames=("st",))
def start_turn(
    st: SlotState,
    logits_M1V,
    slots_M,
    eps_M,
    pos_M,
    budget_M,
    seed,
    temperature,
    top_p,
    eos_E,
    stop_S,
    *,
    mode: SamplingMode,
    mesh: Mesh | None,
) -> SlotState:
    """Samples the first token of a turn (position `pos_M`) from the logits of the fed tokens and
    sets the slots' decode state: the next input, position, budget (the turn ends once position
    `budget_M - 1` is sampled), episode."""
    tok_M, lp_M, lpr_M = sample_step(
        logits_M1V[:, 0], row_keys(seed, eps_M), pos_M, mode, temperature, top_p
    )
    reason_M = classify(tok_M, pos_M, budget_M, eos_E, stop_S)
    at_MG = jnp.arange(st.toks_SG.shape[1])[None, :] == pos_M[:, None]

    def put(a, v):
        return a.at[slots_M].set(v.astype(a.dtype))

    def put_row(a, v):
        return put(a, jnp.where(at_MG, v[:, None], a[slots_M]))

    new = st.replace(
        tok_S=put(st.tok_S, tok_M),
        step_S=put(st.step_S, pos_M + 1),
        row_S=put(st.row_S, eps_M),
        budget_S=put(st.budget_S, budget_M),
        reason_S=put(st.reason_S, reason_M),
        length_S=put(st.length_S, jnp.where(reason_M != RUNNING, pos_M + 1, 0)),
        toks_SG=put_row(st.toks_SG, tok_M),
        lps_SG=put_row(st.lps_SG, lp_M),
        lprs_SG=put_row(st.lprs_SG, lpr_M),
    )
    return constrain_batch(new, mesh)


@functools.partial(jax.jit, donate_argnames=("routes_SG",))
def _write_routes(routes_SG, slot, start, routes_TLK):
    """routes_SG[slot, start + t] = routes_TLK[t]; positions past the end are dropped (T is a
    power-of-two bucket: the padding lands on positions the slot has not run yet)."""
    pos_T = start + jnp.arange(routes_TLK.shape[0])
    return routes_SG.at[slot, pos_T].set(routes_TLK, mode="drop")


def feed(
    model_parts,
    st: SlotState,
    slot: int,
    ids: Sequence[int],
    max_piece: int | None = None,
    rows: int = 1,
    start: int = 0,
) -> tuple[jax.Array, SlotState]:
    """Runs `ids` on top of slot `slot`'s cached state (only these tokens); returns (logits of
    the last position [1, 1, V], state). `max_piece` cuts `ids` into blocks of at most that many
    tokens before `slots.extend`'s power-of-two pieces: fewer compiled programs (log2(max_piece)
    + 1), more calls (a cached call continues exactly, so the result is the same). `rows` > 1
    runs the slot as that many identical rows (written back to the same slot, all equal): a
    sharded model needs its token count to divide over the batch shards (expert parallelism
    splits tokens over them), which one row of 1, 2 or 4 tokens does not. When the state records
    routes, the fed tokens' experts go to positions `start`... of the slot."""
    ids = [int(t) for t in ids]
    step = len(ids) if max_piece is None else int(max_piece)
    cache, routes = st.cache, st.routes_SG
    record = routes is not None
    for a in range(0, len(ids), step):
        piece = ids[a : a + step]
        logits, cache, *r = sl.extend(
            model_parts, cache, [slot] * rows, [piece] * rows, record_routes=record
        )
        if record:  # padded to a power of two: one write program per bucket
            pad = bucket(len(piece), 1) - len(piece)
            r_TLK = jnp.pad(r[0][0], ((0, pad), (0, 0), (0, 0)), constant_values=-1)
            routes = _write_routes(routes, jnp.int32(slot), jnp.int32(start + a), r_TLK)
    return logits[:1], st.replace(cache=cache, routes_SG=routes)
