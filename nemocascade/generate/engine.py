"""The rollout engine: cached prefill of ragged prompts, then jitted `lax.while_loop` decoding,
static (this module: every row resident until the longest has finished) or continuous
(`generate(..., slots=S)`, `continuous.py`: S resident rows, a finished row's slot refilled).

    result = generate(model, [[5, 9, 2], [7]], max_new_tokens=32, temperature=0.8, top_p=0.95, n=4)
    result.tokens        # [B*n, max(max_new_tokens)] int32, prompt-major, `pad_id` after the end
    result.logprobs      # log-prob of each token under the distribution sampled from
    result.logprobs_untempered  # plain log-softmax at temperature 1 (what the trainer computes)
    result.lengths       # [B*n] generated tokens including the eos / stop token
    result.finish_reason # "eos" | "stop" | "length" per row
    result.routes        # with record_routes=True: per row, the experts of each position a
                         # training forward runs (routing replay); else None

Prefill: prompts are LEFT-padded to a length bucket with segment id 0 (real tokens: segment 1), so
attention never looks at padding and the Mamba conv/SSM states carry only the prompt's own
positions; the last position of every row is its last real token. The cache is prefilled once per
prompt and repeated `n` times for GRPO groups. Decode runs until every row has finished (eos, stop
token, or its prompt's `max_new_tokens`). Prompt and generation lengths are rounded up to powers of
two, so a run compiles one prefill and one decode program per (batch, bucket, sampling mode);
`max_new_tokens`, the temperature, top-p, the seed and the eos / stop ids are runtime values.

`model` is an `nnx.Module` or a `(graphdef, state)` pair from `nnx.split(model)` (the full state,
not a filtered one): an RL loop that keeps its parameters split passes them straight in and pays no
split/merge cost per call; the jitted programs are keyed on the graphdef, the shapes and the static
sampling mode, so calling `generate` every RL step reuses them. With `mesh`,
the prompt batch is laid out over the batch axes of `nemocascade.sharding` (data, fsdp, expert) and
the parameters are used with whatever sharding they already have (e.g. the training
`state_shardings`), so nothing is re-laid out between an RL step and generation.
"""

from __future__ import annotations

import functools
import time
from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.sharding import Mesh

from nemocascade import sharding as shd
from nemocascade.generate import continuous
from nemocascade.generate.request import (
    LENGTH,
    RUNNING,
    GenerateResult,
    Request,
    bucket,
    classify,
    constrain_batch,
    empty_routes,
    finish,
    left_pad,
    make_request,
)
from nemocascade.generate.sampling import SamplingMode, row_keys, sample_step
from nemocascade.generate.slots import prefill

__all__ = ["GenerateResult", "bucket", "compiled_program_counts", "generate", "precompile"]


# ----------------------------------------------------------------------------- jitted programs
@functools.partial(
    jax.jit, static_argnames=("graphdef", "n", "gen_len", "mode", "mesh", "record_routes")
)
def _decode(
    graphdef,
    state,
    cache,
    logits_BV,
    rows_R,
    live_rows,
    max_new_R,
    seed,
    temperature,
    top_p,
    eos_E,
    stop_S,
    pad_id,
    *,
    n: int,
    gen_len: int,
    mode: SamplingMode,
    mesh: Mesh | None,
    record_routes: bool = False,
):
    """Samples up to `max_new_R` (<= gen_len) tokens for each of the B*n rows in one while loop.

    Rows at or past `live_rows` are batch padding: they start finished and never hold the loop.

    Returns (tokens [R, gen_len], logprobs, logprobs_untempered, lengths [R], reasons [R], steps),
    and with `record_routes` the experts each generated token used when it was fed back
    ([R, gen_len, n_moe_layers, K]: column c is token c's; -1 where never fed back).
    """
    if n > 1:  # GRPO groups share the prompt prefill: repeat the prefilled cache per sample
        cache = jax.tree.map(lambda x: x if x.ndim == 0 else jnp.repeat(x, n, axis=0), cache)
        logits_BV = jnp.repeat(logits_BV, n, axis=0)
    cache = constrain_batch(cache, mesh)
    r = logits_BV.shape[0]
    keys_R = row_keys(seed, rows_R)
    sample = functools.partial(sample_step, mode=mode, temperature=temperature, top_p=top_p)

    def record(carry, tok_R, lp_R, lpr_R, step):
        toks, lps, lprs, lengths, reasons = carry
        active = reasons == RUNNING

        def col(buf, v, fill):
            return jax.lax.dynamic_update_index_in_dim(
                buf, jnp.where(active, v, fill).astype(buf.dtype), step, 1
            )

        toks, lps, lprs = col(toks, tok_R, pad_id), col(lps, lp_R, 0.0), col(lprs, lpr_R, 0.0)
        new = jnp.where(active, classify(tok_R, step, max_new_R, eos_E, stop_S), reasons)
        lengths = jnp.where(active & (new != RUNNING), step + 1, lengths)
        return toks, lps, lprs, lengths, new

    out0 = (
        jnp.full((r, gen_len), pad_id, jnp.int32),
        jnp.zeros((r, gen_len), jnp.float32),
        jnp.zeros((r, gen_len), jnp.float32),
        jnp.zeros((r,), jnp.int32),
        jnp.where(jnp.arange(r) < live_rows, RUNNING, LENGTH).astype(jnp.int32),
    )
    out0 = constrain_batch(out0, mesh)
    tok_R, lp_R, lpr_R = sample(logits_BV, keys_R, 0)
    out = record(out0, tok_R, lp_R, lpr_R, 0)

    def cond(carry):
        step, out = carry[0], carry[3]
        return (step < gen_len) & jnp.any(out[4] == RUNNING)

    def body(carry):
        step, tok_R, cache, out, routes = carry
        model = nnx.merge(graphdef, state)
        seg_R1 = jnp.ones((r, 1), jnp.int32)
        if record_routes:  # the experts of the token fed back: generated at step - 1
            logits_R1V, cache, aux = model(
                tok_R[:, None], segment_ids=seg_R1, cache=cache, return_aux=True
            )
            fed_RLK = jnp.moveaxis(aux["routes"][:, :, 0], 0, 1)  # [R, n_moe, K]
            routes = jax.lax.dynamic_update_index_in_dim(routes, fed_RLK, step - 1, 1)
        else:
            logits_R1V, cache = model(tok_R[:, None], segment_ids=seg_R1, cache=cache)
        tok_R, lp_R, lpr_R = sample(logits_R1V[:, 0], keys_R, step)
        return step + 1, tok_R, cache, record(out, tok_R, lp_R, lpr_R, step), routes

    routes = None
    if record_routes:  # [R, gen_len, n_moe, K]: row-major like every other row array
        routes = constrain_batch(empty_routes(nnx.merge(graphdef, state).cfg, r, gen_len), mesh)
    carry = (jnp.int32(1), tok_R, cache, out, routes)
    steps, _, _, out, routes = jax.lax.while_loop(cond, body, carry)
    return out + (steps,) + (() if routes is None else (routes,))


def compiled_program_counts() -> dict[str, int]:
    """How many prefill / decode programs this process has compiled (bucketing diagnostics);
    `prefill` and `decode` are the static engine's, `refill` and `decode_chunk` the continuous
    engine's."""
    return {"prefill": prefill._cache_size(), "decode": _decode._cache_size()} | (
        continuous.compiled_program_counts()
    )


# ----------------------------------------------------------------------------- host side
def _static_args(req: Request, bucket_batch: bool):
    """The static engine's (prefill args, prefill kwargs, decode args, decode kwargs)."""
    b, mesh = len(req.prompts), req.mesh
    mult = shd.batch_shards(mesh)
    rows = -(-(bucket(b, 1) if bucket_batch else b) // mult) * mult
    p_len, g_len = bucket(max(len(p) for p in req.prompts)), req.gen_bucket
    ids, seg = left_pad(req.prompts, rows, p_len, req.pad_id)
    row_ids = np.arange(rows * req.n, dtype=np.int32)
    prefill_args = (req.graphdef, req.state, req.put(ids), req.put(seg))
    prefill_kw = {"cache_len": p_len + g_len, "mesh": mesh, "chunk": req.prefill_chunk}
    budgets = req.put(req.row_budgets(row_ids))
    decode_rest = (req.put(row_ids), jnp.int32(req.rows), budgets, *req.sampling_args())
    decode_kw = {"n": req.n, "gen_len": g_len, "mode": req.mode, "mesh": mesh}
    if req.record_routes:
        prefill_kw["record_routes"] = decode_kw["record_routes"] = True
    return prefill_args, prefill_kw, decode_rest, decode_kw


def _compile(req: Request, bucket_batch: bool) -> dict[str, float]:
    """Ahead-of-time compiles the prefill and decode programs; returns their compile seconds."""
    prefill_args, prefill_kw, decode_rest, decode_kw = _static_args(req, bucket_batch)
    graphdef, state = prefill_args[:2]
    t0 = time.perf_counter()
    prefill.lower(*prefill_args, **prefill_kw).compile()
    t1 = time.perf_counter()
    logits, cache = jax.eval_shape(
        lambda st, i, s: prefill(graphdef, st, i, s, **prefill_kw), *prefill_args[1:]
    )[:2]
    _decode.lower(graphdef, state, cache, logits, *decode_rest, **decode_kw).compile()
    return {"prefill_compile_s": t1 - t0, "decode_compile_s": time.perf_counter() - t1}


def _run_static(req: Request, bucket_batch: bool) -> GenerateResult:
    """One prefill of every prompt, then one decode loop until the longest row has finished."""
    prefill_args, prefill_kw, decode_rest, decode_kw = _static_args(req, bucket_batch)
    t0 = time.perf_counter()
    logits, cache, *prompt_routes = prefill(*prefill_args, **prefill_kw)
    logits = jax.block_until_ready(logits)
    t1 = time.perf_counter()
    out = _decode(req.graphdef, req.state, cache, logits, *decode_rest, **decode_kw)
    toks, lps, lprs, lengths, reasons, steps, *token_routes = jax.device_get(
        jax.block_until_ready(out)
    )
    t2 = time.perf_counter()
    timings = {
        "prefill_s": t1 - t0,
        "decode_s": t2 - t1,
        "decode_steps": int(steps),
        "prompt_bucket": prefill_kw["cache_len"] - decode_kw["gen_len"],
        "gen_bucket": decode_kw["gen_len"],
    }
    routes = None
    if req.record_routes:  # the prefill's rows are prompts (before the n-fold repeat)
        per_prompt = jax.device_get(prompt_routes[0])
        p_len = per_prompt.shape[1]
        rows = [
            per_prompt[i, p_len - len(req.prompts[i]) :]
            for i in range(len(req.prompts))
            for _ in range(req.n)
        ]
        routes = (rows, token_routes[0])
    return finish(req, toks, lps, lprs, lengths, reasons, timings, routes)


def precompile(model, prompt_ids: Sequence[Sequence[int]], **kwargs) -> dict[str, float]:
    """Compiles (ahead of time) the programs `generate(model, prompt_ids, **kwargs)` would run,
    without running them; returns {"prefill_compile_s", "decode_compile_s"}. Useful to warm an
    RL loop's buckets and to measure compile time apart from run time. (Static engine only: the
    continuous engine's programs depend on how slots free up; they compile on first use.)"""
    if kwargs.get("slots") is not None:
        raise ValueError("precompile: only the static engine (slots=None) compiles ahead of time")
    return generate(model, prompt_ids, _compile_only=True, **kwargs)


def generate(
    model,
    prompt_ids: Sequence[Sequence[int]],
    *,
    max_new_tokens: int | Sequence[int],
    temperature: float = 0.0,
    top_p: float = 1.0,
    top_k: int = 0,
    seed: int = 0,
    eos_id: int | Sequence[int] | None = None,
    stop_ids: Sequence[int] = (),
    stop_strings: Sequence[str] = (),
    tokenizer=None,
    n: int = 1,
    pad_id: int = 0,
    mesh: Mesh | None = None,
    bucket_batch: bool = False,
    slots: int | None = None,
    chunk_steps: int = continuous.CHUNK_STEPS,
    refill_at: int | None = None,
    prefill_chunk: int = 0,
    record_routes: bool = False,
    _compile_only: bool = False,
) -> GenerateResult:
    """Continues each prompt `n` times; see the module docstring for the layout of the result.

    temperature 0 is greedy decoding (then `.logprobs` equals `.logprobs_untempered`, since the
    sampled distribution is a point mass); otherwise tokens are drawn from softmax(logits / T)
    restricted to the top-k (k > 0) and then to the top-p nucleus (p < 1). Row r (= prompt i,
    sample j, r = i*n + j) draws step t with key `fold_in(fold_in(key(seed), r), t)`, so a seed
    reproduces its tokens whatever the batch layout. `eos_id` (int or ints; None = no eos) ends a
    row with reason "eos", `stop_ids` with "stop". `stop_strings` (needs `tokenizer` with
    `.decode(ids)`) are found on the host after decoding: the row is cut after the first token
    whose text completes a stop string (reason "stop"); such rows are not stopped early on device.
    `max_new_tokens` is one budget for every row, or one per prompt (its n rows share it; a row
    at its budget ends with reason "length"; `.tokens` has max(max_new_tokens) columns).

    `mesh`: lay the rollout rows over its batch axes (the prompt batch is padded to a multiple of
    their size); the parameters are used with the shardings they have. `bucket_batch`: also round
    the number of prompts up to a power of two (for callers whose batch size varies), so batch
    sizes share programs too. `.timings` holds wall times of the two phases (a first call for a
    bucket includes its compilation).

    `slots`: continuous batching (`nemocascade.generate.continuous`): at most `slots` rows are
    resident (the decode batch, a multiple of the mesh's batch shards); a finished row's slot is
    refilled with the next waiting row while the others decode; a decode chunk returns to the host
    after `chunk_steps` steps, or once `refill_at` slots are free (default max(1, slots // 8)).
    Same rows, same keys: the same tokens as the static engine (log-probs equal up to fp32
    summation order). None: the static engine (all rows resident until the longest finishes).
    `.timings` of a continuous run: prefill_s (the first fill), decode_s (the rest, refills
    included), decode_steps, chunks, refills, slot_utilization (decoded tokens / slot-steps).

    `prefill_chunk` > 0: chunked prefill (`slots.prefill_rows`): prompts enter the cache in
    slices of that many positions, so a long prompt never needs a whole-prompt activation or a
    [T, T] score block; the same tokens and log-probs up to fp32 summation order. 0: one pass.

    `record_routes`: also record the experts every MoE layer used for each position a training
    forward on the row runs (prompt, then each generated token but the last, as it was fed
    back): `.routes`, per row [prompt length + length - 1, n_moe_layers, K] int16, for routing
    replay (R3: `NemotronH(..., routes=)`).
    """
    req = make_request(
        model,
        prompt_ids,
        max_new_tokens=max_new_tokens,
        temperature=temperature,
        top_p=top_p,
        top_k=top_k,
        seed=seed,
        eos_id=eos_id,
        stop_ids=stop_ids,
        stop_strings=stop_strings,
        tokenizer=tokenizer,
        n=n,
        pad_id=pad_id,
        mesh=mesh,
        prefill_chunk=prefill_chunk,
        record_routes=record_routes,
    )
    if slots is not None:
        if _compile_only:
            raise ValueError("precompile: only the static engine (slots=None) compiles ahead")
        return continuous.run(req, slots=slots, chunk_steps=chunk_steps, refill_at=refill_at)
    if _compile_only:
        return _compile(req, bucket_batch)
    return _run_static(req, bucket_batch)
