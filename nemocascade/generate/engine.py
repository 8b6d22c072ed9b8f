"""The rollout engine: cached prefill of ragged prompts, then one jitted `lax.while_loop` decode.

    result = generate(model, [[5, 9, 2], [7]], max_new_tokens=32, temperature=0.8, top_p=0.95, n=4)
    result.tokens        # [B*n, max_new_tokens] int32, prompt-major rows, `pad_id` after the end
    result.logprobs      # log-prob of each token under the distribution sampled from
    result.logprobs_untempered  # plain log-softmax at temperature 1 (what the trainer computes)
    result.lengths       # [B*n] generated tokens including the eos / stop token
    result.finish_reason # "eos" | "stop" | "length" per row

Prefill: prompts are LEFT-padded to a length bucket with segment id 0 (real tokens: segment 1), so
attention never looks at padding and the Mamba conv/SSM states carry only the prompt's own
positions; the last position of every row is its last real token. The cache is prefilled once per
prompt and repeated `n` times for GRPO groups. Decode runs until every row has finished (eos, stop
token, or `max_new_tokens`). Prompt and generation lengths are rounded up to powers of two, so a run
compiles one prefill and one decode program per (batch, bucket, sampling mode); `max_new_tokens`,
the temperature, top-p, the seed and the eos / stop ids are runtime values.

`model` is an `nnx.Module` or a `(graphdef, state)` pair from `nnx.split(model)` (the full state,
not a filtered one): an RL loop that keeps its parameters split passes them straight in and pays no
split/merge cost per call; the jitted programs are keyed on the graphdef, the shapes and the static
sampling mode, so calling `generate` every RL step reuses them. With `mesh`,
the prompt batch is laid out over the batch axes of `nemocascade.sharding` (data, fsdp, expert) and
the parameters are used with whatever sharding they already have (e.g. the training
`state_shardings`), so nothing is re-laid out between an RL step and generation.
"""

from __future__ import annotations

import dataclasses
import functools
import time
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.sharding import Mesh

from nemocascade import sharding as shd
from nemocascade.generate.sampling import SamplingMode, row_keys, sample_step

RUNNING, EOS, STOP, LENGTH = 0, 1, 2, 3
REASONS = {EOS: "eos", STOP: "stop", LENGTH: "length"}
MIN_BUCKET = 16
ID_SLOTS = 8  # eos / stop ids are padded to a multiple of this (-1 = unused) to share programs


@dataclasses.dataclass
class GenerateResult:
    """Host (numpy) outputs of `generate`; rows are prompt-major (prompt i, sample j -> i*n+j)."""

    tokens: np.ndarray  # [R, max_new_tokens] int32, pad_id after each row's end
    logprobs: np.ndarray  # [R, max_new_tokens] fp32, 0 after the end
    logprobs_untempered: np.ndarray  # [R, max_new_tokens] fp32, 0 after the end
    lengths: np.ndarray  # [R] int32, generated tokens including eos / stop
    finish_reason: list[str]  # "eos" | "stop" | "length"
    prompt_index: np.ndarray  # [R] index of the prompt each row continues
    timings: dict[str, float]  # prefill_s, decode_s (wall, including any compile), steps


def bucket(length: int, minimum: int = MIN_BUCKET) -> int:
    """The smallest power of two >= max(length, minimum)."""
    return max(minimum, 1 << max(0, int(length) - 1).bit_length())


# ----------------------------------------------------------------------------- jitted programs
def _constrain_batch(tree: Any, mesh: Mesh | None) -> Any:
    """Shards the leading (batch) axis of every array leaf over the mesh's batch axes."""
    if mesh is None:
        return tree

    def f(x):
        if x.ndim == 0:
            return x
        return jax.lax.with_sharding_constraint(x, shd.batch_sharding(mesh, x.ndim))

    return jax.tree.map(f, tree)


@functools.partial(jax.jit, static_argnames=("graphdef", "cache_len", "mesh"))
def _prefill(graphdef, state, ids_BT, seg_BT, *, cache_len: int, mesh: Mesh | None):
    """Runs the prompts through a fresh cache; returns (last-position logits [B, V], cache)."""
    model = nnx.merge(graphdef, state)
    cache = _constrain_batch(model.init_cache(ids_BT.shape[0], cache_len), mesh)
    h_BTD, cache = model.hidden_states(ids_BT, seg_BT, cache)
    logits_BV = model.logits(h_BTD[:, -1:])[:, 0]
    return logits_BV, _constrain_batch(cache, mesh)


def _classify(tok_R, step, max_new, eos_E, stop_S):
    """Finish code of each row if it stopped at `step` (RUNNING if it goes on)."""
    is_eos = jnp.any(tok_R[:, None] == eos_E[None, :], axis=-1)
    is_stop = jnp.any(tok_R[:, None] == stop_S[None, :], axis=-1)
    at_len = step + 1 >= max_new
    return jnp.where(is_eos, EOS, jnp.where(is_stop, STOP, jnp.where(at_len, LENGTH, RUNNING)))


@functools.partial(jax.jit, static_argnames=("graphdef", "n", "gen_len", "mode", "mesh"))
def _decode(
    graphdef,
    state,
    cache,
    logits_BV,
    rows_R,
    live_rows,
    seed,
    temperature,
    top_p,
    max_new,
    eos_E,
    stop_S,
    pad_id,
    *,
    n: int,
    gen_len: int,
    mode: SamplingMode,
    mesh: Mesh | None,
):
    """Samples up to `max_new` (<= gen_len) tokens for each of the B*n rows in one while loop.

    Rows at or past `live_rows` are batch padding: they start finished and never hold the loop.

    Returns (tokens [R, gen_len], logprobs, logprobs_untempered, lengths [R], reasons [R], steps).
    """
    if n > 1:  # GRPO groups share the prompt prefill: repeat the prefilled cache per sample
        cache = jax.tree.map(lambda x: x if x.ndim == 0 else jnp.repeat(x, n, axis=0), cache)
        logits_BV = jnp.repeat(logits_BV, n, axis=0)
    cache = _constrain_batch(cache, mesh)
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
        new = jnp.where(active, _classify(tok_R, step, max_new, eos_E, stop_S), reasons)
        lengths = jnp.where(active & (new != RUNNING), step + 1, lengths)
        return toks, lps, lprs, lengths, new

    out0 = (
        jnp.full((r, gen_len), pad_id, jnp.int32),
        jnp.zeros((r, gen_len), jnp.float32),
        jnp.zeros((r, gen_len), jnp.float32),
        jnp.zeros((r,), jnp.int32),
        jnp.where(jnp.arange(r) < live_rows, RUNNING, LENGTH).astype(jnp.int32),
    )
    out0 = _constrain_batch(out0, mesh)
    tok_R, lp_R, lpr_R = sample(logits_BV, keys_R, 0)
    out = record(out0, tok_R, lp_R, lpr_R, 0)

    def cond(carry):
        step, _, _, out = carry
        return (step < max_new) & jnp.any(out[4] == RUNNING)

    def body(carry):
        step, tok_R, cache, out = carry
        model = nnx.merge(graphdef, state)
        seg_R1 = jnp.ones((r, 1), jnp.int32)
        logits_R1V, cache = model(tok_R[:, None], segment_ids=seg_R1, cache=cache)
        tok_R, lp_R, lpr_R = sample(logits_R1V[:, 0], keys_R, step)
        return step + 1, tok_R, cache, record(out, tok_R, lp_R, lpr_R, step)

    steps, _, _, out = jax.lax.while_loop(cond, body, (jnp.int32(1), tok_R, cache, out))
    return out + (steps,)


def compiled_program_counts() -> dict[str, int]:
    """How many prefill / decode programs this process has compiled (bucketing diagnostics)."""
    return {"prefill": _prefill._cache_size(), "decode": _decode._cache_size()}


# ----------------------------------------------------------------------------- host side
def _split_model(model) -> tuple[Any, Any]:
    if isinstance(model, nnx.Module):
        return nnx.split(model)
    if isinstance(model, tuple) and len(model) == 2 and isinstance(model[0], nnx.GraphDef):
        return model
    raise TypeError(
        f"generate: model must be an nnx.Module or a (graphdef, state) pair from nnx.split, "
        f"got {type(model).__name__}"
    )


def _id_array(ids: Sequence[int]) -> np.ndarray:
    slots = max(ID_SLOTS, -(-len(ids) // ID_SLOTS) * ID_SLOTS)
    out = np.full((slots,), -1, np.int32)
    out[: len(ids)] = ids
    return out


def _as_ids(value, name: str) -> tuple[int, ...]:
    if value is None:
        return ()
    if isinstance(value, (int, np.integer)):
        return (int(value),)
    try:
        return tuple(int(v) for v in value)
    except TypeError as e:
        raise TypeError(
            f"generate: {name} must be an int or a sequence of ints, got {value!r}"
        ) from e


def _check_prompts(prompt_ids, vocab_size: int) -> list[list[int]]:
    if isinstance(prompt_ids, np.ndarray):
        prompt_ids = prompt_ids.tolist()
    if not isinstance(prompt_ids, (list, tuple)) or not prompt_ids:
        raise ValueError("generate: prompt_ids must be a non-empty list of token-id lists")
    out = []
    for i, p in enumerate(prompt_ids):
        p = [int(t) for t in (p.tolist() if isinstance(p, np.ndarray) else p)]
        if not p:
            raise ValueError(
                f"generate: prompt_ids[{i}] is empty (a prompt needs at least one token)"
            )
        bad = [t for t in p if not 0 <= t < vocab_size]
        if bad:
            raise ValueError(
                f"generate: prompt_ids[{i}] has ids {bad[:5]} outside [0, {vocab_size})"
            )
        out.append(p)
    return out


def _left_pad(prompts: list[list[int]], rows: int, length: int, pad_id: int):
    """[rows, length] ids and segment ids (1 = prompt, 0 = padding); extra rows repeat prompt 0."""
    ids = np.full((rows, length), pad_id, np.int32)
    seg = np.zeros((rows, length), np.int32)
    for i in range(rows):
        p = prompts[i] if i < len(prompts) else prompts[0]
        ids[i, length - len(p) :] = p
        seg[i, length - len(p) :] = 1
    return ids, seg


def _first_stop(tokens: list[int], stop_strings: Sequence[str], tokenizer) -> int | None:
    """The fewest leading tokens whose decoded text contains a stop string (None if none does)."""

    def hit(k):
        return any(s in tokenizer.decode(tokens[:k]) for s in stop_strings)

    if not tokens or not hit(len(tokens)):
        return None
    lo, hi = 1, len(tokens)  # hit(hi) holds; find the smallest such k
    while lo < hi:
        mid = (lo + hi) // 2
        if hit(mid):
            hi = mid
        else:
            lo = mid + 1
    return lo


def _compile(prefill_args, prefill_kw, decode_rest, decode_kw) -> dict[str, float]:
    """Ahead-of-time compiles the prefill and decode programs; returns their compile seconds."""
    graphdef, state = prefill_args[:2]
    t0 = time.perf_counter()
    _prefill.lower(*prefill_args, **prefill_kw).compile()
    t1 = time.perf_counter()
    logits, cache = jax.eval_shape(
        lambda st, i, s: _prefill(graphdef, st, i, s, **prefill_kw), *prefill_args[1:]
    )
    _decode.lower(graphdef, state, cache, logits, *decode_rest, **decode_kw).compile()
    return {"prefill_compile_s": t1 - t0, "decode_compile_s": time.perf_counter() - t1}


def precompile(model, prompt_ids: Sequence[Sequence[int]], **kwargs) -> dict[str, float]:
    """Compiles (ahead of time) the programs `generate(model, prompt_ids, **kwargs)` would run,
    without running them; returns {"prefill_compile_s", "decode_compile_s"}. Useful to warm an
    RL loop's buckets and to measure compile time apart from run time."""
    return generate(model, prompt_ids, _compile_only=True, **kwargs)


def generate(
    model,
    prompt_ids: Sequence[Sequence[int]],
    *,
    max_new_tokens: int,
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

    `mesh`: lay the rollout rows over its batch axes (the prompt batch is padded to a multiple of
    their size); the parameters are used with the shardings they have. `bucket_batch`: also round
    the number of prompts up to a power of two (for callers whose batch size varies), so batch
    sizes share programs too. `.timings` holds wall times of the two phases (a first call for a
    bucket includes its compilation).
    """
    graphdef, state = _split_model(model)
    try:
        vocab_size = int(state["embed_VD"][...].shape[0])
    except (KeyError, TypeError) as e:
        raise TypeError("generate: the model state has no `embed_VD` (expected a NemotronH)") from e
    prompts = _check_prompts(prompt_ids, vocab_size)
    if int(max_new_tokens) < 1:
        raise ValueError(f"generate: max_new_tokens must be >= 1, got {max_new_tokens}")
    if not temperature >= 0.0:
        raise ValueError(f"generate: temperature must be >= 0, got {temperature}")
    if not 0.0 < top_p <= 1.0:
        raise ValueError(f"generate: top_p must be in (0, 1], got {top_p}")
    if int(top_k) < 0 or int(n) < 1:
        raise ValueError(f"generate: need top_k >= 0 and n >= 1, got top_k={top_k}, n={n}")
    if stop_strings and tokenizer is None:
        raise ValueError("generate: stop_strings need a tokenizer (with .decode) to be recognised")
    eos, stops = _as_ids(eos_id, "eos_id"), _as_ids(stop_ids, "stop_ids")
    greedy = temperature == 0.0
    mode = SamplingMode(
        greedy=greedy, top_k=0 if greedy else int(top_k), top_p=(not greedy) and top_p < 1.0
    )

    b, n, max_new = len(prompts), int(n), int(max_new_tokens)
    mult = shd.batch_shards(mesh)
    rows = -(-(bucket(b, 1) if bucket_batch else b) // mult) * mult
    p_len, g_len = bucket(max(len(p) for p in prompts)), bucket(max_new)
    ids, seg = _left_pad(prompts, rows, p_len, pad_id)

    def put(x):  # every process holds the same prompts: the whole batch, laid out over the mesh
        return shd.device_batch({"x": x}, mesh, process_local=False)["x"]

    row_ids = np.arange(rows * n, dtype=np.int32)

    prefill_args = (graphdef, state, put(ids), put(seg))
    prefill_kw = {"cache_len": p_len + g_len, "mesh": mesh}
    decode_rest = (
        put(row_ids),
        jnp.int32(b * n),
        jnp.int32(seed),
        jnp.float32(max(temperature, 1e-6)),
        jnp.float32(top_p),
        jnp.int32(max_new),
        jnp.asarray(_id_array(eos)),
        jnp.asarray(_id_array(stops)),
        jnp.int32(pad_id),
    )
    decode_kw = {"n": n, "gen_len": g_len, "mode": mode, "mesh": mesh}
    if _compile_only:
        return _compile(prefill_args, prefill_kw, decode_rest, decode_kw)

    t0 = time.perf_counter()
    logits, cache = _prefill(*prefill_args, **prefill_kw)
    logits = jax.block_until_ready(logits)
    t1 = time.perf_counter()
    out = _decode(graphdef, state, cache, logits, *decode_rest, **decode_kw)
    toks, lps, lprs, lengths, reasons, steps = jax.device_get(jax.block_until_ready(out))
    t2 = time.perf_counter()

    keep = b * n
    toks, lps, lprs = (np.array(a[:keep, :max_new]) for a in (toks, lps, lprs))
    lengths, reasons = np.array(lengths[:keep]), np.array(reasons[:keep])
    if stop_strings:
        for r in range(keep):
            k = _first_stop(toks[r, : lengths[r]].tolist(), stop_strings, tokenizer)
            if k is not None and (k < lengths[r] or reasons[r] == LENGTH):
                toks[r, k:], lps[r, k:], lprs[r, k:] = pad_id, 0.0, 0.0
                lengths[r], reasons[r] = k, STOP
    return GenerateResult(
        tokens=toks,
        logprobs=lps,
        logprobs_untempered=lprs,
        lengths=lengths.astype(np.int32),
        finish_reason=[REASONS[int(c)] for c in reasons],
        prompt_index=np.repeat(np.arange(b), n).astype(np.int32),
        timings={
            "prefill_s": t1 - t0,
            "decode_s": t2 - t1,
            "decode_steps": int(steps),
            "prompt_bucket": p_len,
            "gen_bucket": g_len,
        },
    )
