"""Continuous batching: S slots decode together; a finished row's slot takes the next waiting row.

    res = generate(model, prompts, max_new_tokens=8192, temperature=1.0, n=8, slots=64)

Rollout lengths are long-tailed: the static engine keeps every row resident until the longest
has finished, so most of its batch idles through the tail. Here at most S rows are resident (the
decode batch, S slots of `slots.py`: KV of `prompt bucket + generation bucket` positions per
attention layer, conv + SSM state per Mamba layer). The host loop:

    refill: the waiting rows (prompt-major) go to the free slots; one program (`_refill`)
            prefills their prompts (once per prompt among them, left-padded to the bucket of the
            longest), inserts the caches into those slots (their KV positions start again at 0),
            samples each row's first token, and hands back the outputs of the finished rows the
            slots held (they stay on device until the end);
    decode: `decode_loop`, one `lax.while_loop` of at most `chunk_steps` steps over all S slots
            (every slot at its own position), which stops early once `refill_at` slots are free
            while rows wait; with no row waiting it runs until every resident row has finished;
    then one [S] finish-code array comes back to the host (the only sync per chunk) to see which
    slots are free.

Chunk size k = `chunk_steps` (default 32) and `refill_at` (default max(1, S // 8)): a refill
round costs a host round trip and two program dispatches (~2 ms each on a CPU: a few decode steps
of the tiny model, a fraction of one step of a real model on an accelerator), and a freed slot
idles until its chunk ends. Ending a chunk once S/8 slots are free keeps ~S/16 slots idle on
average (6% of the batch) and makes one round trip per S/8 finished rows instead of one per row;
k bounds how long a freed slot waits when rows finish rarely (k/2 steps on average: < 2% of a
1000-token row at k = 32). The host never syncs per token: one [S] array per chunk.
`benchmarks/continuous_batching.py` measures the schedule (`--sweep`: k x refill_at).

Same tokens as the static engine: row r = i*n + j samples step t with the key
`fold_in(fold_in(key(seed), r), t)` whichever slot it runs in and whenever, each slot carrying its
row id and step. The log-probs equal the static engine's up to fp32 summation order: the per-row
arithmetic is the same, but matrix products over a batch of S slots (and prefills over the
prompts of one refill, padded to their own bucket) may round differently from one over all rows
(tests/generate/test_continuous.py states and measures the difference).
"""

from __future__ import annotations

import collections
import functools
import time

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx, struct
from jax.sharding import Mesh

from nemocascade import sharding as shd
from nemocascade.generate import slots as sl
from nemocascade.generate.request import (
    LENGTH,
    RUNNING,
    Request,
    bucket,
    classify,
    constrain_batch,
    empty_routes,
    finish,
    left_pad,
)
from nemocascade.generate.sampling import SamplingMode, row_keys, sample_step

CHUNK_STEPS = 32  # k: decode steps between two visits of the host (see the module docstring)


@struct.dataclass
class SlotState:
    """Everything the decode loop carries per slot (leading axis S, laid out like batch rows)."""

    cache: list  # slot cache (slots.py)
    tok_S: jax.Array  # last sampled token: the next input
    step_S: jax.Array  # tokens generated so far by the slot's row (column of the next one)
    row_S: jax.Array  # the row the slot holds (its key), -1 when empty
    budget_S: jax.Array  # the row's max_new_tokens
    reason_S: jax.Array  # RUNNING, or the finish code of its row (LENGTH when empty)
    length_S: jax.Array  # the row's length once finished
    toks_SG: jax.Array  # [S, gen_len] the row's tokens so far, pad_id after
    lps_SG: jax.Array  # log-probs under the sampled distribution
    lprs_SG: jax.Array  # untempered log-probs
    # [S, gen_len, n_moe, K]: the experts of each token when fed back (record_routes; else None)
    routes_SG: jax.Array | None = None


@functools.partial(
    jax.jit, static_argnames=("graphdef", "slots", "cache_len", "gen_len", "mesh", "record_routes")
)
def _empty(
    graphdef, state, pad_id, *, slots: int, cache_len: int, gen_len: int, mesh, record_routes
):
    model = nnx.merge(graphdef, state)
    zeros = jnp.zeros((slots,), jnp.int32)
    routes = empty_routes(model.cfg, slots, gen_len) if record_routes else None
    st = SlotState(
        cache=sl.init_slots(model, slots, cache_len),
        tok_S=zeros,
        step_S=zeros,
        row_S=zeros - 1,
        budget_S=zeros + 1,
        reason_S=zeros + LENGTH,
        length_S=zeros,
        toks_SG=jnp.full((slots, gen_len), pad_id, jnp.int32),
        lps_SG=jnp.zeros((slots, gen_len), jnp.float32),
        lprs_SG=jnp.zeros((slots, gen_len), jnp.float32),
        routes_SG=routes,
    )
    return constrain_batch(st, mesh)


def _outputs(st: SlotState, idx=None):
    """(tokens, logprobs, logprobs_untempered, lengths, reasons[, routes]) of all slots or of
    `idx`."""
    out = (st.toks_SG, st.lps_SG, st.lprs_SG, st.length_S, st.reason_S)
    out += () if st.routes_SG is None else (st.routes_SG,)
    if idx is None:
        return out
    return tuple(jnp.take(a, idx, axis=0, mode="clip") for a in out)


@functools.partial(
    jax.jit,
    static_argnames=("graphdef", "cache_len", "mode", "mesh", "prefill_chunk"),
    donate_argnames=("st",),
)
def _refill(
    graphdef,
    state,
    st: SlotState,
    ids_PT,
    seg_PT,
    dest_M,
    src_M,
    rows_M,
    budget_M,
    seed,
    temperature,
    top_p,
    eos_E,
    stop_S,
    pad_id,
    *,
    cache_len: int,
    mode: SamplingMode,
    mesh: Mesh | None,
    prefill_chunk: int = 0,
):
    """Prefills the P left-padded prompts `ids_PT`; rows `rows_M` enter slots `dest_M` (an index
    >= S is padding, dropped) with prompt `src_M`'s cache (KV positions from 0) and logits, and
    sample their first token (step 0). Returns (state, the outputs of the rows the slots held
    before, and when the state records routes the experts of each entering row's prompt
    positions [M, T, n_moe, K], -1 on padding)."""
    model = nnx.merge(graphdef, state)
    record = st.routes_SG is not None
    logits_PV, cache, *prompt_routes = sl.prefill_rows(
        model, ids_PT, seg_PT, cache_len, mesh, prefill_chunk, record
    )
    evicted = _outputs(st, dest_M)
    keys_M = row_keys(seed, rows_M)
    tok_M, lp_M, lpr_M = sample_step(
        jnp.take(logits_PV, src_M, axis=0), keys_M, 0, mode, temperature, top_p
    )
    reason_M = classify(tok_M, 0, budget_M, eos_E, stop_S)
    m, g = dest_M.shape[0], st.toks_SG.shape[1]
    first = jnp.arange(g)[None, :] == 0

    def row_buf(v, fill, dtype):
        return jnp.where(first, v[:, None], fill).astype(dtype)

    def put(a, v):
        return a.at[dest_M].set(v.astype(a.dtype), mode="drop")

    new = SlotState(
        cache=sl.put_rows(st.cache, dest_M, sl.take_rows(sl.slot_layout(cache), src_M)),
        tok_S=put(st.tok_S, tok_M),
        step_S=put(st.step_S, jnp.ones((m,), jnp.int32)),
        row_S=put(st.row_S, rows_M),
        budget_S=put(st.budget_S, budget_M),
        reason_S=put(st.reason_S, reason_M),
        length_S=put(st.length_S, jnp.where(reason_M != RUNNING, 1, 0)),
        toks_SG=put(st.toks_SG, row_buf(tok_M, pad_id, jnp.int32)),
        lps_SG=put(st.lps_SG, row_buf(lp_M, 0.0, jnp.float32)),
        lprs_SG=put(st.lprs_SG, row_buf(lpr_M, 0.0, jnp.float32)),
        routes_SG=st.routes_SG,
    )
    if record:  # an entering row has no generated tokens yet; its prompt's routes go out
        new = new.replace(routes_SG=put(st.routes_SG, jnp.full((m,) + st.routes_SG.shape[1:], -1)))
        evicted += (jnp.take(prompt_routes[0], src_M, axis=0),)
    return constrain_batch(new, mesh), evicted


@functools.partial(
    jax.jit,
    static_argnames=("graphdef", "mode", "mesh", "hold_finished"),
    donate_argnames=("st",),
)
def decode_loop(
    graphdef,
    state,
    st: SlotState,
    seed,
    temperature,
    top_p,
    eos_E,
    stop_S,
    max_steps,
    stop_at,
    *,
    mode: SamplingMode,
    mesh: Mesh | None,
    hold_finished: bool,
):
    """Decodes every running slot, each at its own position and step, until `max_steps` steps
    have run, no slot is running, or at least `stop_at` slots are not running. Returns (state,
    steps). The one decode program of this engine and of multi-turn episodes (`rl.episodes`).

    `hold_finished`: a slot that is not running keeps its cached state (KV index, Mamba states)
    and its next input, as a multi-turn episode waiting for its tools must (`rl.turns`); without
    it (this engine) finished slots run along and their state is discarded at the next refill."""
    s, g = st.tok_S.shape[0], st.toks_SG.shape[1]
    cols_G = jnp.arange(g)[None, :]
    sample = functools.partial(sample_step, mode=mode, temperature=temperature, top_p=top_p)

    def cond(carry):
        i, st = carry
        running = jnp.sum(st.reason_S == RUNNING)
        return (i < max_steps) & (running > 0) & (s - running < stop_at)

    def body(carry):
        i, st = carry
        model = nnx.merge(graphdef, state)
        ids_S1 = st.tok_S[:, None]
        record = st.routes_SG is not None
        h_S1D, cache, *fed = sl.forward(model, ids_S1, jnp.ones_like(ids_S1), st.cache, record)
        logits_SV = model.logits(h_S1D)[:, 0]
        keys_S = row_keys(seed, jnp.maximum(st.row_S, 0))
        tok_S, lp_S, lpr_S = sample(logits_SV, keys_S, st.step_S)
        active = st.reason_S == RUNNING
        if hold_finished:
            cache, tok_S = sl.hold_rows(cache, st.cache, active), jnp.where(active, tok_S, st.tok_S)
        at_SG = active[:, None] & (cols_G == st.step_S[:, None])
        routes = st.routes_SG
        if record:  # the token fed back now is the one generated at step - 1
            fed_at = (active[:, None] & (cols_G == st.step_S[:, None] - 1))[:, :, None, None]
            routes = jnp.where(fed_at, fed[0], routes)
        code = classify(tok_S, st.step_S, st.budget_S, eos_E, stop_S)
        reason = jnp.where(active, code, st.reason_S)
        ended = active & (reason != RUNNING)
        new = SlotState(
            cache=cache,
            tok_S=tok_S,
            step_S=st.step_S + active.astype(jnp.int32),
            row_S=st.row_S,
            budget_S=st.budget_S,
            reason_S=reason,
            length_S=jnp.where(ended, st.step_S + 1, st.length_S),
            toks_SG=jnp.where(at_SG, tok_S[:, None], st.toks_SG),
            lps_SG=jnp.where(at_SG, lp_S[:, None], st.lps_SG),
            lprs_SG=jnp.where(at_SG, lpr_S[:, None], st.lprs_SG),
            routes_SG=routes,
        )
        return i + 1, constrain_batch(new, mesh)

    steps, st = jax.lax.while_loop(cond, body, (jnp.int32(0), st))
    return st, steps


def compiled_program_counts() -> dict[str, int]:
    return {"refill": _refill._cache_size(), "decode_chunk": decode_loop._cache_size()}


# ----------------------------------------------------------------------------- host loop
def _collect(req: Request, g_len: int, parts) -> list:
    """Host outputs (tokens, logprobs, logprobs_untempered, lengths, reasons[, token routes]) of
    every row from `parts`: (device outputs of some slots, the row each of those slots held, -1
    for none)."""
    rows: list = [None] * req.rows
    for out, held in parts:
        out = jax.device_get(out)
        for j, r in enumerate(held):
            if r >= 0:
                rows[r] = [a[j] for a in out]
    return [np.stack(col) for col in zip(*rows, strict=True)]


def _prompt_routes(req: Request, parts) -> list[np.ndarray]:
    """Per row, the experts of its prompt's positions ([prompt length, n_moe, K]) from the
    refill it entered with: `parts` holds (device routes [M, T, n_moe, K] of a refill's entering
    rows, those rows, -1 for padding)."""
    out: list = [None] * req.rows
    for routes, rows in parts:
        routes = jax.device_get(routes)
        for j, r in enumerate(rows):
            if r >= 0:
                out[r] = routes[j, routes.shape[1] - len(req.prompts[r // req.n]) :]
    return out


def run(req: Request, *, slots: int, chunk_steps: int = CHUNK_STEPS, refill_at: int | None = None):
    """Generates `req` with `slots` resident rows; see the module docstring."""
    s, mesh, n = int(slots), req.mesh, req.n
    mult = shd.batch_shards(mesh)
    if s < 1 or s % mult:
        raise ValueError(
            f"generate: slots={slots} must be >= 1 and a multiple of {mult} (the "
            "mesh's batch shards)"
        )
    if int(chunk_steps) < 1:
        raise ValueError(f"generate: chunk_steps must be >= 1, got {chunk_steps}")
    refill_at = max(1, s // 8) if refill_at is None else int(refill_at)
    p_max, g_len = bucket(max(len(p) for p in req.prompts)), req.gen_bucket
    args = req.sampling_args()
    graphdef, state = req.graphdef, req.state

    t0 = time.perf_counter()
    st = _empty(
        graphdef,
        state,
        args[-1],
        slots=s,
        cache_len=p_max + g_len,
        gen_len=g_len,
        mesh=mesh,
        record_routes=req.record_routes,
    )
    waiting = collections.deque(range(req.rows))
    slot_row = np.full((s,), -1, np.int64)
    free = list(range(s))
    evicted = []  # (device outputs of the slots a refill took over, the rows they held)
    entered = []  # record_routes: (device prompt routes of a refill's rows, those rows)
    chunks = refills = steps = 0
    prefill_s = None
    while True:
        if waiting and free:
            take = min(len(free), len(waiting))
            dest, rows = free[:take], [waiting.popleft() for _ in range(take)]
            uniq = list(dict.fromkeys(r // n for r in rows))  # prompts, each prefilled once
            prompts = [req.prompts[i] for i in uniq]
            batch = -(-bucket(len(prompts), 1) // mult) * mult
            ids, seg = left_pad(prompts, batch, bucket(max(map(len, prompts))), req.pad_id)
            pad = bucket(take, 1) - take
            st, out = _refill(
                graphdef,
                state,
                st,
                req.put(ids),
                req.put(seg),
                jnp.asarray(np.array(dest + [s] * pad, np.int32)),
                jnp.asarray(np.array([uniq.index(r // n) for r in rows] + [0] * pad, np.int32)),
                jnp.asarray(np.array(rows + [0] * pad, np.int32)),
                jnp.asarray(req.row_budgets(rows + [0] * pad)),
                *args,
                cache_len=p_max + g_len,
                mode=req.mode,
                mesh=mesh,
                prefill_chunk=req.prefill_chunk,
            )
            if req.record_routes:
                out, prompt_routes = out[:-1], out[-1]
                entered.append((prompt_routes, rows + [-1] * pad))
            evicted.append((out, slot_row[dest].copy()))
            slot_row[dest] = rows
            free = free[take:]
            refills += 1
        if prefill_s is None:  # the first fill: blocked on once, to time it apart
            jax.block_until_ready(st.tok_S)
            prefill_s = time.perf_counter() - t0
        st, k = decode_loop(
            graphdef,
            state,
            st,
            *args[:-1],  # not the pad id: pads were written at admission
            jnp.int32(chunk_steps if waiting else g_len),
            jnp.int32(refill_at if waiting else s + 1),
            mode=req.mode,
            mesh=mesh,
            hold_finished=False,
        )
        reason, k = jax.device_get((st.reason_S, k))  # the one sync per chunk
        chunks, steps = chunks + 1, steps + int(k)
        free = [i for i in range(s) if reason[i] != RUNNING]
        if not waiting and len(free) == s:
            break

    toks, lps, lprs, lengths, reasons, *token_routes = _collect(
        req, g_len, evicted + [(_outputs(st), slot_row)]
    )
    routes = (_prompt_routes(req, entered), token_routes[0]) if req.record_routes else None
    total = time.perf_counter() - t0
    timings = {
        "prefill_s": prefill_s,
        "decode_s": total - prefill_s,
        "decode_steps": steps,
        "chunks": chunks,
        "refills": refills,
        "slots": s,
        "slot_utilization": float(np.sum(np.maximum(lengths - 1, 0)) / max(1, steps * s)),
        "prompt_bucket": p_max,
        "gen_bucket": g_len,
    }
    return finish(req, toks, lps, lprs, lengths, reasons, timings, routes)
