"""What an RL step trains on: prompt draws, the dynamic-filtering refill, and batch assembly.

draw_prompts     `count` prompt records mixed over domains by weight, deterministic in the
                 stage's seed, name, step and round (`prompt_rng`), so a resumed stage draws
                 the same prompts
collect_groups   GRPO with dynamic filtering: sample rounds of prompts until the batch holds
                 `rows` rows of informative groups (rewards not all equal) or the round cap
                 is hit; whole groups only (a cut group would bias its own baseline); a
                 group with a grader error (a row without a verdict) is dropped, never
                 trained on with a made-up reward
assemble         the kept rows of every round as one fixed-shape batch of exactly `rows` rows
                 (empty rows with loss_mask 0 fill the rest) and one sequence length, so the
                 train step compiles once per stage
"""

from __future__ import annotations

import random
import zlib
from collections.abc import Callable, Mapping, Sequence
from typing import Any, NamedTuple

import numpy as np

from nemocascade.rl import advantages
from nemocascade.rl.rollouts import Rollouts, training_batch
from nemocascade.train.grpo import GRPOConfig


def stable_seed(*parts) -> int:
    """A stable 31-bit seed from `parts` (Python's hash() of strings varies between processes)."""
    return zlib.crc32("/".join(map(str, parts)).encode()) & 0x7FFFFFFF


def prompt_rng(seed: int, stage: str, step: int, round_: int) -> random.Random:
    """The random source of one prompt draw (stage `stage`, step `step`, refill round)."""
    return random.Random(f"{seed}/{stage}/{step}/{round_}")


def draw_prompts(
    pools: Mapping[str, list[dict]],
    count: int,
    rng: random.Random,
    weights: Mapping[str, float] | None = None,
) -> list[dict]:
    """`count` prompt records, domains mixed by `weights` (default uniform), without replacement
    within a domain for this draw (a domain with fewer records than its share gives them all)."""
    domains = sorted(pools)
    w = np.array([float((weights or {}).get(d, 1.0)) for d in domains])
    per = np.floor(count * w / w.sum()).astype(int)
    for i in range(count - per.sum()):
        per[i % len(domains)] += 1
    out = []
    for d, k in zip(domains, per, strict=True):
        out.extend(rng.sample(pools[d], min(int(k), len(pools[d]))))
    rng.shuffle(out)
    return out


class Part(NamedTuple):
    """Rows of one rollout round that go into the batch, with their GRPO extras (advantages and
    sample weights per rollout row; None for MOPD)."""

    rollouts: Rollouts
    rows: np.ndarray
    extra: dict[str, Any] | None


def collect_groups(
    sample_round: Callable[[int], Rollouts],
    *,
    rows: int,
    group_size: int,
    rounds: int,
    cfg: GRPOConfig,
) -> tuple[list[Part], list[Rollouts], dict[str, float]]:
    """Rollout rounds (`sample_round(round_index)`) until `rows` rows of kept groups or `rounds`.

    Advantages are computed per round over every group (`advantages.prepare_advantages`); groups
    with a grader error are dropped; with dynamic filtering only groups whose rewards are not all
    equal are kept; only as many whole groups as still fit. Returns (parts, every round's
    rollouts, metrics: the fractions of groups filtered out and dropped for errors, the number of
    rounds)."""
    parts: list[Part] = []
    rolls: list[Rollouts] = []
    total, seen, dropped, errored = 0, 0, 0.0, 0
    for round_ in range(rounds):
        roll = sample_round(round_)
        rolls.append(roll)
        prep = advantages.prepare_advantages(
            roll.rewards, group_size, cfg, truncated=~roll.finished
        )
        groups = len(roll.rewards) // group_size
        seen += groups
        dropped += prep["filtered_fraction"] * groups
        bad_G = np.asarray(roll.errors, bool).reshape(groups, group_size).any(axis=1)
        errored += int(bad_G.sum())
        keep = np.asarray(prep["keep"], bool) & ~np.repeat(bad_G, group_size)
        room = (rows - total) // group_size * group_size
        kept = np.flatnonzero(keep)[:room]
        if kept.size:
            parts.append(Part(roll, kept, prep))
            total += kept.size
        if rows - total < group_size:
            break
    metrics = {
        "groups_filtered_frac": dropped / max(seen, 1),
        "groups_error_frac": errored / max(seen, 1),
        "gen_rounds": len(rolls),
    }
    return parts, rolls, metrics


def assemble(
    parts: Sequence[Part], *, rows: int, seq_len: int, pad_id: int
) -> dict[str, np.ndarray] | None:
    """One batch of exactly `rows` rows and `seq_len` positions from the parts' rows (None if
    there are none). GRPO parts add `advantages` [rows] and scale each row's `loss_mask` by its
    sample weight (overlong filtering); padding rows are all zeros (loss_mask 0)."""
    if not parts:
        return None
    arrays: dict[str, list[np.ndarray]] = {}
    for part in parts:
        b = training_batch(part.rollouts, rows=part.rows, seq_len=seq_len, pad_id=pad_id)
        if part.extra is not None:
            b["advantages"] = np.asarray(part.extra["advantages"], np.float32)[part.rows]
            weight = np.asarray(part.extra["sample_weight"], np.float32)[part.rows]
            b["loss_mask"] *= weight[:, None]
        for k, v in b.items():
            arrays.setdefault(k, []).append(v)
    batch = {k: np.concatenate(v) for k, v in arrays.items()}
    short = rows - batch["input_ids"].shape[0]
    if short < 0:
        raise ValueError(f"assemble: {batch['input_ids'].shape[0]} rows > rows={rows}")
    if short:
        fill = {"routes": -1}  # a padding row's routes: none recorded (the router chooses)
        batch = {
            k: np.concatenate([v, np.full((short,) + v.shape[1:], fill.get(k, 0), v.dtype)])
            for k, v in batch.items()
        }
    return batch
