"""Multi-turn rollouts with tool calls: episodes decode in S slots, each at its own turn.

    trajs = run_episodes(graphdef, state, tokenizer, envs, limits=EnvLimits(),
                         max_new_tokens=1024, max_episode_tokens=8192, temperature=1.0,
                         top_p=1.0, seed=0, thinking=False, slots=64)

An environment (`rl.envs`, duck-typed here: `tools`, `initial_messages()`, `step(text) ->
ToolTurn`, `reward()`, `close()`) holds one episode. Its prompt is `render_prompt(initial
messages, tools)`. Episodes live in the slots of a slot cache (`generate.slots`: KV rows for
attention layers, conv + SSM states for Mamba layers), one per slot, and every slot sits at its
own position. The host loop:

    admit     a free slot takes the next episode: its row is zeroed and the prompt is run on it
              (`slots.extend`: a prefill without padding, in power-of-two pieces);
    feed      an episode with new tokens (its prompt, or the model's last token + the template's
              continuation after a tool turn: `trajectory.continuation_ids`) runs only those
              tokens on top of its slot's cached state (`slots.extend`; never the whole
              conversation again) and samples the turn's first token (`turns.start_turn`);
    decode    `continuous.decode_loop` (hold_finished): one `lax.while_loop` over all slots,
              stopping after `chunk_steps` steps while tool calls are in flight (to collect
              them), or once `refill_at` turns have ended. A slot whose turn has ended keeps
              its cached state: its Mamba states and KV index are frozen while the others
              decode (the KV entry written at its index is masked and overwritten by its next
              tokens);
    tools     an ended turn's text (the assistant message: generation prefix body + sampled text)
              goes to `env.step` on a thread pool, so slow tools of one episode stall only that
              episode; results are collected after every chunk (and waited for when no slot has
              anything to decode).

Limits: `limits.max_turns` (reason "max_turns"), `max_episode_tokens` (the whole conversation:
"max_tokens", also when a tool result does not fit), the per-turn `max_new_tokens` (the cut text
still goes to the environment; the template's `<|im_end|>` then closes the turn, mask 0). The
environment ends an episode with its own reason (`ToolTurn.done`: "submitted", ...; no reason
given: "no_tool_call" if the turn made no call, else "done") and its `env.reward()`. A turn that
the environment answers with no tool message and does not end ends the episode as
"no_tool_call" with reward 0; an environment that raises ends its episode as "env_error"
(reward 0, the error in `reward_info`); an episode cut by a limit gets reward 0.

Sampling keys: the token at position p of episode e is drawn with `fold_in(fold_in(key(seed),
k), p)`, k = `episode_ids[e]` (default e; `step_S` of the slot state is the position), so a
seed reproduces an episode whatever slot it runs in and whatever runs beside it (up to the
rounding of batched matmuls, as in `generate.continuous`).
"""

from __future__ import annotations

import collections
import concurrent.futures as cf
import dataclasses
import time
from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh

from nemocascade import sharding as shd
from nemocascade.data.chat import render_prompt
from nemocascade.generate.continuous import CHUNK_STEPS, decode_loop
from nemocascade.generate.request import EOS, RUNNING, id_array
from nemocascade.generate.sampling import SamplingMode
from nemocascade.rl import turns as tr
from nemocascade.rl.trajectory import (
    Trajectory,
    TrajectoryBuilder,
    continuation_ids,
    generation_prefix_body,
)


# ============================================================================ host loop
@dataclasses.dataclass
class _Episode:
    index: int
    env: Any
    record: Any
    builder: TrajectoryBuilder
    messages: list[dict]
    slot: int = -1
    turn_start: int = 0  # position of the current turn's first sampled token
    last_tok: int = -1  # the model's last sampled token (not yet in the cache)
    closed: bool = True  # the last turn ended with the model's own <|im_end|>
    turns: int = 0
    calls: int = 0
    errors: int = 0


def _env_turn(env, text: str):
    """Worker: the environment's answer to one turn, and its reward if that ends the episode."""
    turn = env.step(text)
    return turn, (env.reward() if turn.done else None)


def _finish(ep: _Episode, reason: str, reward=None, routes=None) -> Trajectory:
    value, info = reward if reward is not None else (0.0, {})
    try:
        ep.env.close()
    except Exception as e:  # the trajectory stands; the failure is reported with it
        info = dict(info, close_error=f"{type(e).__name__}: {e}")
    ids, mask, lps, lprs = ep.builder.arrays()
    return Trajectory(
        episode=ep.index,
        record=ep.record,
        ids=ids,
        loss_mask=mask,
        logprobs=lps,
        logprobs_untempered=lprs,
        prompt_len=ep.builder.prompt_len,
        messages=ep.messages,
        finish_reason=reason,
        reward=float(value),
        reward_info=dict(info),
        turns=ep.turns,
        tool_calls=ep.calls,
        tool_errors=ep.errors,
        routes=None if routes is None else routes[: len(ids) - 1].astype(np.int16),
    )


def run_episodes(
    graphdef,
    state,
    tokenizer,
    envs: Sequence[Any],
    *,
    limits,
    max_new_tokens: int,
    max_episode_tokens: int,
    temperature: float,
    top_p: float = 1.0,
    seed: int = 0,
    thinking: bool = False,
    slots: int = 8,
    mesh: Mesh | None = None,
    make_env: Callable[[Any], Any] | None = None,
    chunk_steps: int = CHUNK_STEPS,
    refill_at: int | None = None,
    tool_workers: int = 8,
    episode_ids: Sequence[int] | None = None,
    max_piece: int | None = None,
    timings: dict | None = None,
    record_routes: bool = False,
) -> list[Trajectory]:
    """Runs one episode per environment (see the module docstring); returns the trajectories in
    the order of `envs`. `envs` are environments, or records when `make_env(record) -> env` is
    given (an environment is then built when its episode enters a slot). `limits.max_turns`
    bounds the assistant turns; the environments apply their own limits. `episode_ids`: each
    episode's sampling key (default its index; e.g. unique over a stage's rounds); `max_piece`:
    see `feed`; `timings`, if given, receives the loop's counters. `record_routes`: each
    trajectory keeps the experts of every position but its last (`Trajectory.routes`, for
    routing replay)."""
    s = int(slots)
    if s < 1 or s % shd.batch_shards(mesh):
        raise ValueError(f"run_episodes: slots={slots} must be a positive multiple of the shards")
    keys = list(range(len(envs))) if episode_ids is None else [int(k) for k in episode_ids]
    if len(keys) != len(envs):
        raise ValueError(f"run_episodes: {len(keys)} episode_ids for {len(envs)} episodes")
    if max_new_tokens < 1 or max_episode_tokens < 2:
        raise ValueError("run_episodes: need max_new_tokens >= 1 and max_episode_tokens >= 2")
    refill_at = max(1, s // 8) if refill_at is None else int(refill_at)
    # a fed slot runs as one row per batch shard: an expert-parallel MoE splits the tokens over
    # the shards (1 on one device, so nothing changes there)
    feed_rows = shd.batch_shards(mesh)
    greedy = temperature == 0.0
    mode = SamplingMode(greedy=greedy, top_k=0, top_p=(not greedy) and top_p < 1.0)
    args = (
        jnp.int32(seed),
        jnp.float32(max(temperature, 1e-6)),
        jnp.float32(top_p),
        jnp.asarray(id_array([tokenizer.im_end_id])),
        jnp.asarray(id_array([])),
    )
    body_prefix = generation_prefix_body(thinking)
    parts = (graphdef, state)
    t0 = time.perf_counter()
    st = tr.empty_state(
        graphdef,
        state,
        slots=s,
        length=int(max_episode_tokens),
        mesh=mesh,
        record_routes=record_routes,
    )
    waiting = collections.deque(range(len(envs)))
    free = list(range(s))
    ready: collections.deque[tuple[_Episode, list[int]]] = collections.deque()
    decoding: dict[int, _Episode] = {}  # slot -> episode whose turn is decoding
    inflight: dict[cf.Future, _Episode] = {}
    out: list[Trajectory | None] = [None] * len(envs)
    counts = collections.Counter()

    live: dict[int, _Episode] = {}  # started, not finished: closed here if the loop raises

    def end(ep: _Episode, reason: str, reward=None):
        routes = None
        if record_routes:  # the slot still holds the episode's positions (refilled later)
            # the whole row (one program for every slot and length), cut on the host
            row = jax.lax.dynamic_index_in_dim(st.routes_SG, jnp.int32(ep.slot), 0, False)
            routes = jax.device_get(row)[: len(ep.builder)]
        out[ep.index] = _finish(ep, reason, reward, routes)
        free.append(ep.slot)
        live.pop(ep.index)

    def after_tools(ep: _Episode, fut: cf.Future):
        try:
            turn, reward = fut.result()
        except Exception as e:  # a broken environment ends its own episode, not the run
            end(ep, "env_error", (0.0, {"error": f"{type(e).__name__}: {e}"}))
            return
        ep.calls += int(turn.calls)
        ep.errors += int(turn.errors)
        ep.messages += list(turn.messages)
        if turn.done:
            end(ep, turn.reason or ("no_tool_call" if not turn.calls else "done"), reward)
        elif ep.turns >= limits.max_turns:
            end(ep, "max_turns")
        elif not turn.messages:
            end(ep, "no_tool_call", (0.0, {}))
        else:
            cont = continuation_ids(
                tokenizer,
                [m["content"] for m in turn.messages],
                thinking=thinking,
                closed=ep.closed,
            )
            if len(ep.builder) + len(cont) >= max_episode_tokens:
                end(ep, "max_tokens")
            else:
                ep.builder.add_template(cont)
                ready.append((ep, [ep.last_tok] + cont))

    pool = cf.ThreadPoolExecutor(max(1, int(tool_workers)))
    try:
        while waiting or ready or inflight or decoding:
            while waiting and free:  # admit
                i = waiting.popleft()
                env = make_env(envs[i]) if make_env is not None else envs[i]
                record = envs[i] if make_env is not None else getattr(env, "record", None)
                messages = list(env.initial_messages())
                prompt = render_prompt(tokenizer, messages, thinking=thinking, tools=env.tools)
                if len(prompt) >= max_episode_tokens:
                    env.close()
                    raise ValueError(
                        f"run_episodes: episode {i}'s prompt has {len(prompt)} tokens >= "
                        f"max_episode_tokens={max_episode_tokens}"
                    )
                ep = _Episode(i, env, record, TrajectoryBuilder(prompt), messages)
                live[i] = ep
                ep.slot = free.pop(0)
                st = st.replace(cache=tr.reset_rows(st.cache, jnp.asarray([ep.slot], jnp.int32)))
                ready.append((ep, prompt))
            while ready:  # feed new tokens, sample each turn's first token
                ep, ids = ready.popleft()
                pos = len(ep.builder)  # the fed ids end at pos - 1
                logits, st = tr.feed(parts, st, ep.slot, ids, max_piece, feed_rows, pos - len(ids))
                budget = min(pos + max_new_tokens, max_episode_tokens)
                st = tr.start_turn(
                    st,
                    logits,
                    *(jnp.asarray([v], jnp.int32) for v in (ep.slot, keys[ep.index], pos, budget)),
                    *args,
                    mode=mode,
                    mesh=mesh,
                )
                ep.turn_start = pos
                decoding[ep.slot] = ep
                counts["feeds"] += 1
                counts["fed_tokens"] += len(ids)
            if decoding:
                busy = bool(inflight or waiting)
                st, k = decode_loop(
                    graphdef,
                    state,
                    st,
                    *args,
                    jnp.int32(chunk_steps if busy else max_episode_tokens),
                    jnp.int32(s - len(decoding) + min(refill_at, len(decoding))),
                    mode=mode,
                    mesh=mesh,
                    hold_finished=True,  # a finished turn's slot waits for its tools
                )
                reason, k = jax.device_get((st.reason_S, k))  # the one sync per chunk
                counts["chunks"] += 1
                counts["decode_steps"] += int(k)
                ended = [slot for slot in decoding if reason[slot] != RUNNING]
                if ended:
                    idx = jnp.asarray(ended, jnp.int32)
                    toks, lps, lprs, lengths = jax.device_get(
                        tuple(
                            jnp.take(a, idx, axis=0)
                            for a in (st.toks_SG, st.lps_SG, st.lprs_SG, st.length_S)
                        )
                    )
                for j, slot in enumerate(ended):
                    ep = decoding.pop(slot)
                    a, b = ep.turn_start, int(lengths[j])
                    gen = toks[j, a:b].tolist()
                    ep.builder.add_model(gen, lps[j, a:b], lprs[j, a:b])
                    ep.turns += 1
                    ep.last_tok = gen[-1]
                    ep.closed = int(reason[slot]) == EOS
                    if not ep.closed and b >= max_episode_tokens:
                        end(ep, "max_tokens")
                        continue
                    text = tokenizer.decode(gen[:-1] if ep.closed else gen)
                    content = body_prefix + text
                    ep.messages.append({"role": "assistant", "content": content})
                    inflight[pool.submit(_env_turn, ep.env, content)] = ep
            if inflight:  # collect finished tool turns; wait when nothing else can run
                block = not decoding and not ready and not (waiting and free)
                done, _ = cf.wait(
                    list(inflight),
                    timeout=None if block else 0,
                    return_when=cf.FIRST_COMPLETED,
                )
                for fut in sorted(done, key=lambda f: inflight[f].index):
                    after_tools(inflight.pop(fut), fut)
    finally:
        pool.shutdown(wait=True)
        for ep in list(live.values()):  # only when the loop raised
            ep.env.close()
    if timings is not None:
        timings.update(counts, seconds=time.perf_counter() - t0, slots=s)
    return out
