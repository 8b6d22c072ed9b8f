"""Agentic GRPO: the rollouts of a stage with an environment (`RLStageConfig.env`) are whole
multi-turn episodes, not single responses (the paper's SWE RL, C2 §4.8, at any size).

Per step, `RLStage.next_batch` hands `episode_batch` a round function; each round:
  1. draws `prompts_per_step` prompt records and runs `samples_per_prompt` episodes of each
     (`sample_episodes`: `rl.episodes.run_episodes`, the environment built per episode from its
     record by `rl.envs.make_env`, so every episode has its own sandboxed working directory);
  2. groups the trajectories by record (prompt-major) and keeps whole groups: groups with an
     episode the environment could not run (`ERROR_REASONS`: not the model's doing, like a
     grader failure) are dropped, and with dynamic filtering groups whose rewards are all equal
     (nothing to learn from) are dropped and another round is sampled, up to `max_gen_batches`;
  3. `rl.trajectory.trajectories_to_batch` packs the kept trajectories into the batch the
     unchanged GRPO step consumes (loss on the model's own tokens only, advantages per
     trajectory from the configured estimator over its group).
The advantages are computed over the kept groups only; every registered estimator is
group-local, so they equal those of the whole round.

`episode_metrics` is what the stage logs per step and the held-out evaluation reports per
domain (`evaluate_episodes`): success rate, turns, tool calls and errors, tokens per episode,
finish reasons, and success by number of turns: an episode that succeeds after one turn
succeeded on its first try; one that succeeds later did so after reading tool output
(`success_first_turn` + `success_after_feedback` = `success_rate`).
"""

from __future__ import annotations

import collections
import time
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np

from nemocascade.data.chat import render_prompt
from nemocascade.rewards.sandbox import SandboxConfig
from nemocascade.rl import advantages
from nemocascade.rl.config import EnvStageConfig
from nemocascade.rl.envs import make_env
from nemocascade.rl.episodes import run_episodes
from nemocascade.rl.trajectory import Trajectory, trajectories_to_batch
from nemocascade.sharding import batch_shards
from nemocascade.train.grpo import GRPOConfig

# episodes the environment, not the model, ended: no verdict on the model (like grader errors)
ERROR_REASONS = ("env_error", "sandbox_error", "tool_crash")


def sample_episodes(
    graphdef,
    state,
    tokenizer,
    records: Sequence[dict],
    *,
    env: EnvStageConfig,
    n: int,
    max_new_tokens: int,
    temperature: float,
    top_p: float,
    seed: int,
    thinking: bool,
    slots: int = 0,
    mesh=None,
    sandbox: SandboxConfig | None = None,
    record_routes: bool = False,
) -> list[Trajectory]:
    """`n` episodes of each record (prompt-major: record i's episodes are rows i*n .. i*n+n-1)
    in environment `env.name` with `env`'s limits; `max_new_tokens` bounds each assistant turn.
    `slots` episodes decode at once (0: all of them), rounded up to the mesh's batch shards.
    `record_routes`: keep each position's experts for routing replay (`Trajectory.routes`)."""
    limits = env.limits()
    episodes = [r for r in records for _ in range(n)]
    shards = batch_shards(mesh)
    s = slots if slots > 0 else len(episodes)
    s = -(-s // shards) * shards
    return run_episodes(
        graphdef,
        state,
        tokenizer,
        episodes,
        limits=limits,
        max_new_tokens=max_new_tokens,
        max_episode_tokens=env.max_episode_tokens,
        temperature=temperature,
        top_p=top_p,
        seed=seed,
        thinking=thinking,
        slots=s,
        mesh=mesh,
        make_env=lambda record: make_env(env.name, record, limits, sandbox),
        record_routes=record_routes,
    )


def longest_prompt(tokenizer, records: Sequence[dict], env: EnvStageConfig, thinking: bool) -> int:
    """Tokens of the longest opening prompt (system turn with the tool declarations + the
    user turn) of environment `env.name` over `records`: an episode must fit it and more in
    `env.max_episode_tokens`."""
    longest = 0
    for r in records:
        e = make_env(env.name, r, env.limits())
        try:
            ids = render_prompt(tokenizer, e.initial_messages(), thinking=thinking, tools=e.tools)
        finally:
            e.close()
        longest = max(longest, len(ids))
    return longest


def is_error(t: Trajectory) -> bool:
    """The environment failed to run or score the episode (no verdict on the model): an
    ending in `ERROR_REASONS`, a scorer that raised, or a sandbox that could not run the hidden
    tests."""
    info = t.reward_info
    return (
        t.finish_reason in ERROR_REASONS
        or "score_error" in info
        or info.get("status") == "sandbox_error"
    )


def _error_kind(t: Trajectory) -> str:
    if t.finish_reason in ERROR_REASONS:
        return t.finish_reason
    return "sandbox_error" if t.reward_info.get("status") == "sandbox_error" else "score_error"


def episode_batch(
    sample_round: Callable[[int], list[Trajectory]],
    *,
    rows: int,
    group_size: int,
    rounds: int,
    cfg: GRPOConfig,
    seq_len: int,
    pad_id: int,
) -> tuple[dict | None, dict[str, Any]]:
    """(GRPO batch of `rows` rows or None if no group was kept, metrics) from up to `rounds`
    calls of `sample_round(round_index) -> trajectories` (see the module docstring)."""
    kept: list[Trajectory] = []
    every: list[Trajectory] = []
    seen = filtered = errored = rounds_run = 0
    t0 = time.perf_counter()
    for round_ in range(rounds):
        trajs = sample_round(round_)
        rounds_run += 1
        every += trajs
        rewards = np.asarray([t.reward for t in trajs], np.float32)
        truncated = np.asarray([t.truncated for t in trajs], bool)
        prep = advantages.prepare_advantages(rewards, group_size, cfg, truncated=truncated)
        groups = len(trajs) // group_size
        keep_G = np.asarray(prep["keep"], bool).reshape(groups, group_size).all(axis=1)
        bad_G = np.asarray([is_error(t) for t in trajs]).reshape(groups, group_size).any(axis=1)
        seen += groups
        filtered += int((~keep_G).sum())
        errored += int(bad_G.sum())
        for g in np.flatnonzero(keep_G & ~bad_G):
            if len(kept) + group_size > rows:
                break
            kept += trajs[g * group_size : (g + 1) * group_size]
        if rows - len(kept) < group_size:
            break
    metrics = {
        **episode_metrics(every),
        "groups_filtered_frac": filtered / max(seen, 1),
        "groups_error_frac": errored / max(seen, 1),
        "gen_rounds": rounds_run,
        "rollout_s": time.perf_counter() - t0,
    }
    if not kept:
        return None, metrics
    batch, _ = trajectories_to_batch(
        kept, group_size=group_size, cfg=cfg, seq_len=seq_len, num_rows=rows, pad_id=pad_id
    )
    return batch, metrics


def episode_metrics(trajs: Sequence[Trajectory]) -> dict[str, float]:
    """Per-episode statistics (means over episodes unless named otherwise): `reward_mean` over
    the episodes with a verdict, `reward/<domain>`, `reward_error_frac` and
    `reward_errors/<reason>` counts (environment failures), `success_rate` (reward 1),
    `turns`, `tool_calls`, `tool_errors`, `episode_tokens` (the whole conversation),
    `model_tokens` (the model's own), `truncated_frac` (cut by a limit), `finish/<reason>`
    counts, `success_turns/<k>` (fraction of episodes that succeeded after exactly k turns),
    `success_first_turn` and `success_after_feedback`."""
    if not trajs:
        raise ValueError("episode_metrics: no trajectories")
    rewards = np.asarray([t.reward for t in trajs], np.float64)
    errors = np.asarray([is_error(t) for t in trajs], bool)
    success = (rewards >= 1.0) & ~errors
    turns = np.asarray([t.turns for t in trajs])
    ok = ~errors
    out: dict[str, float] = {
        "reward_mean": float(rewards[ok].mean()) if ok.any() else 0.0,
        "reward_error_frac": float(errors.mean()),
        "success_rate": float(success.mean()),
        "turns": float(turns.mean()),
        "tool_calls": float(np.mean([t.tool_calls for t in trajs])),
        "tool_errors": float(np.mean([t.tool_errors for t in trajs])),
        "episode_tokens": float(np.mean([t.tokens for t in trajs])),
        "model_tokens": float(np.mean([int(t.loss_mask.sum()) for t in trajs])),
        "truncated_frac": float(np.mean([t.truncated for t in trajs])),
        "success_first_turn": float((success & (turns <= 1)).mean()),
        "success_after_feedback": float((success & (turns > 1)).mean()),
    }
    domains = collections.defaultdict(list)
    for t, r, e in zip(trajs, rewards, errors, strict=True):
        if not e:
            domains[(t.record or {}).get("domain", "unknown")].append(r)
    for d, v in sorted(domains.items()):
        out[f"reward/{d}"] = float(np.mean(v))
    for reason, c in sorted(collections.Counter(t.finish_reason for t in trajs).items()):
        out[f"finish/{reason}"] = float(c)
    kinds = collections.Counter(_error_kind(t) for t, e in zip(trajs, errors, strict=True) if e)
    for kind, c in sorted(kinds.items()):
        out[f"reward_errors/{kind}"] = float(c)
    for k in sorted(set(turns[success].tolist())):
        out[f"success_turns/{k}"] = float((success & (turns == k)).mean())
    return out


def evaluate_episodes(
    graphdef,
    state,
    tokenizer,
    records: Sequence[dict],
    env: EnvStageConfig,
    *,
    n: int,
    max_new_tokens: int,
    temperature: float,
    top_p: float,
    seed: int,
    thinking: bool,
    slots: int = 0,
    mesh=None,
) -> dict[str, float]:
    """Held-out evaluation of an agentic domain: `n` episodes per record at `temperature`
    (0: greedy), `episode_metrics` of them plus `score`, the mean reward in percent (an
    environment failure counts 0, as a grader failure does in single-turn evaluation)."""
    trajs = sample_episodes(
        graphdef,
        state,
        tokenizer,
        records,
        env=env,
        n=n,
        max_new_tokens=max_new_tokens,
        temperature=temperature,
        top_p=top_p,
        seed=seed,
        thinking=thinking,
        slots=slots,
        mesh=mesh,
    )
    out = episode_metrics(trajs)
    scores = [0.0 if is_error(t) else t.reward for t in trajs]
    out["score"] = round(100.0 * float(np.mean(scores)), 2)
    return out
