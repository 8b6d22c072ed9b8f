"""Rollouts for RL and evaluation: prompts -> generated responses -> verifier rewards -> batches.

Shared by the GRPO and MOPD stages and, for its generation half (`generate_rollouts`), by
evaluation (`jobs.evaluation`):

    roll = sample(graphdef, state, tokenizer, records, n=8, temperature=1.0, ...)
    roll.rewards      # [R] verifier scores, rows prompt-major (prompt i, sample j -> i*n + j)
    roll.errors       # [R] the grader failed on that row: no verdict, never a wrong answer
    batch = training_batch(roll, seq_bucket=64)   # arrays for grpo / distill steps

A training batch holds, for every rollout row, the sequence `prompt + response` (right-padded):
    input_ids [R, T]  = seq[:-1]         targets [R, T] = seq[1:]
    loss_mask [R, T]  1 where the target is a response token (eos included)
    segment_ids [R,T] 1 on real tokens, 0 on padding
    sampler_logprobs [R, T]  the sampler's log-prob of each response target (0 elsewhere)
    routes [R, T, n_moe_layers, K]  only when sampled with `record_routes`: the experts each
                     input position used in sampling (routing replay; -1 on padding)
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Sequence
from typing import Any

import numpy as np
from flax import nnx

from nemocascade import rewards as rw
from nemocascade.data.chat import render_prompt
from nemocascade.generate import bucket, generate


@dataclasses.dataclass
class Rollouts:
    records: list[dict]  # one per row (the prompt record, repeated n times)
    prompt_ids: list[list[int]]  # one per row
    response_ids: list[list[int]]  # one per row, eos included when finished
    responses: list[str]  # decoded text (without the eos token)
    finished: np.ndarray  # [R] bool: ended with eos / stop (not cut at the limit)
    sampler_logprobs: list[np.ndarray]  # per row, log-prob of each response token (sampled dist.)
    rewards: np.ndarray  # [R] fp32 (0 where `errors`)
    errors: np.ndarray  # [R] bool: the grader failed (no verdict): never read the reward
    n: int
    timings: dict[str, float]
    reward_metrics: dict[str, Any]
    # per row [len(prompt) + len(response) - 1, n_moe, K]: the experts of each input position in
    # sampling (`generate(record_routes=True)`), for routing replay; None when not recorded
    routes: list[np.ndarray] | None = None

    @property
    def domains(self) -> list[str]:
        return [r.get("domain", "") for r in self.records]

    def response_lengths(self) -> np.ndarray:
        return np.array([len(r) for r in self.response_ids], np.int32)


def render_prompts(tokenizer, records: Sequence[dict], *, thinking: bool) -> list[list[int]]:
    """The token ids of each prompt record's generation prompt (its `messages`, or `prompt`, and
    the `tools` it declares), rendered by the chat template in thinking or non-thinking mode."""
    return [
        render_prompt(
            tokenizer, r.get("messages") or r.get("prompt"), thinking=thinking, tools=r.get("tools")
        )
        for r in records
    ]


@dataclasses.dataclass
class Generations:
    """The generation half of `sample`: `n` responses per prompt record, rows prompt-major."""

    records: list[dict]  # one per row (the prompt record, repeated n times)
    prompt_ids: list[list[int]]  # one per row
    response_ids: list[list[int]]  # one per row, eos included when finished
    responses: list[str]  # decoded text (without the eos token)
    finished: np.ndarray  # [R] bool: ended with eos / stop (not cut at the limit)
    logprobs: list[np.ndarray]  # per row, log-prob of each response token (sampled dist.)
    timings: dict[str, float]  # the engine's (`generate`)
    routes: list[np.ndarray] | None = None  # with record_routes (see `Rollouts.routes`)


def generate_rollouts(
    graphdef,
    state: nnx.State,
    tokenizer,
    records: Sequence[dict],
    *,
    n: int,
    max_new_tokens: int,
    temperature: float,
    top_p: float = 1.0,
    top_k: int = 0,
    seed: int = 0,
    thinking: bool = False,
    mesh=None,
    slots: int = 0,
    prefill_chunk: int = 0,
    record_routes: bool = False,
) -> Generations:
    """Renders each prompt record (`render_prompts`), generates `n` responses per prompt (eos:
    the chat template's end of turn) and decodes them. `slots` > 0: continuous batching with at
    most that many rows resident (`generate(..., slots=)`: the same tokens, long-tailed lengths
    no longer hold the whole batch), used when the rows outnumber the slots; otherwise (and
    with 0) one static batch. `prefill_chunk` > 0: chunked prefill (`generate`).
    `record_routes`: keep each row's experts for routing replay (`Generations.routes`)."""
    prompts = render_prompts(tokenizer, records, thinking=thinking)
    eos = tokenizer.im_end_id
    if slots < 0:
        raise ValueError(f"slots must be >= 0, got {slots}")
    res = generate(
        (graphdef, state),
        prompts,
        max_new_tokens=max_new_tokens,
        temperature=temperature,
        top_p=top_p,
        top_k=top_k,
        seed=seed,
        eos_id=eos,
        n=n,
        pad_id=tokenizer.pad_id,
        mesh=mesh,
        slots=slots if 0 < slots < len(prompts) * n else None,
        prefill_chunk=prefill_chunk,
        record_routes=record_routes,
    )
    rows = len(prompts) * n
    recs = [records[i] for i in res.prompt_index]
    p_ids = [prompts[i] for i in res.prompt_index]
    r_ids = [res.tokens[r, : res.lengths[r]].tolist() for r in range(rows)]
    finished = np.array([f != "length" for f in res.finish_reason])
    texts = [
        tokenizer.decode(ids[:-1] if fin and ids and ids[-1] == eos else ids)
        for ids, fin in zip(r_ids, finished, strict=True)
    ]
    lps = [res.logprobs[r, : res.lengths[r]].astype(np.float32) for r in range(rows)]
    return Generations(recs, p_ids, r_ids, texts, finished, lps, dict(res.timings), res.routes)


def sample(
    graphdef,
    state: nnx.State,
    tokenizer,
    records: Sequence[dict],
    *,
    n: int,
    max_new_tokens: int,
    temperature: float,
    top_p: float = 1.0,
    top_k: int = 0,
    seed: int = 0,
    thinking: bool = False,
    reward_cache: rw.RewardCache | None = None,
    num_workers: int = 2,
    reward_timeout_s: float = 30.0,
    mesh=None,
    scorer=None,
    slots: int = 0,
    prefill_chunk: int = 0,
    record_routes: bool = False,
) -> Rollouts:
    """Generates `n` responses per prompt record (`generate_rollouts`) and scores them with the
    records' verifiers (in thinking mode a response is judged as if it began with `<think>`: an
    unclosed reasoning block has no final answer), or with `scorer`, a learned reward
    (`rewards.reward_models`: `score_group_rows` over groups of `n`); then records that have a
    verifier also get their ground-truth score in `reward_metrics["ground_truth"]` [R] (NaN
    where there is none), so reward hacking shows. `record_routes`: keep each row's experts
    (`Rollouts.routes`) for a training step that replays them."""
    g = generate_rollouts(
        graphdef,
        state,
        tokenizer,
        records,
        n=n,
        max_new_tokens=max_new_tokens,
        temperature=temperature,
        top_p=top_p,
        top_k=top_k,
        seed=seed,
        thinking=thinking,
        mesh=mesh,
        slots=slots,
        prefill_chunk=prefill_chunk,
        record_routes=record_routes,
    )
    cache = reward_cache or rw.RewardCache()
    t0 = time.perf_counter()
    truth = None
    if scorer is not None:
        scores, metrics = scorer.score_group_rows(
            g.records,
            g.responses,
            n,
            finished=g.finished,
            response_lengths=[len(r) for r in g.response_ids],
        )
        scores = np.asarray(scores, np.float32)
        errors = np.zeros(len(scores), bool)
        has = np.array([isinstance(r.get("verifier"), dict) for r in g.records])
        truth = np.full(len(scores), np.nan, np.float32)
        if has.any():
            rows = np.flatnonzero(has)
            gt, gt_err, _ = cache.score(
                [g.records[i] for i in rows],
                [g.responses[i] for i in rows],
                [g.finished[i] for i in rows],
                num_workers=num_workers,
                timeout_s=reward_timeout_s,
                thinking=thinking,
            )
            truth[rows] = np.where(gt_err, np.nan, gt)
        metrics = dict(metrics, ground_truth=truth)
    else:
        scores, errors, metrics = cache.score(
            g.records,
            g.responses,
            g.finished,
            num_workers=num_workers,
            timeout_s=reward_timeout_s,
            thinking=thinking,
        )
    timings = dict(g.timings, reward_s=time.perf_counter() - t0)
    return Rollouts(
        records=g.records,
        prompt_ids=g.prompt_ids,
        response_ids=g.response_ids,
        responses=g.responses,
        finished=g.finished,
        sampler_logprobs=g.logprobs,
        rewards=scores,
        errors=errors,
        n=n,
        timings=timings,
        reward_metrics=metrics,
        routes=g.routes,
    )


def training_batch(
    roll: Rollouts,
    *,
    rows: Sequence[int] | None = None,
    num_rows: int | None = None,
    seq_bucket: int = 16,
    seq_len: int | None = None,
    pad_id: int = 0,
) -> dict[str, np.ndarray]:
    """Packs the chosen rollout rows into fixed-shape arrays (see the module docstring).

    `sampler_logprobs` are the log-probs of the distribution each token was drawn from (after
    temperature / top-k / top-p): the behaviour policy of mismatch metrics, GRPO's off-policy
    correction and MOPD's importance weights.

    With recorded routes (`roll.routes`), `routes` [rows, T, n_moe, K] int32 holds each input
    position's experts (-1 on padding: the trainer's router chooses there).

    `num_rows` pads the batch with empty rows (loss_mask 0) to a fixed count, and the length is
    rounded up to a power of two >= `seq_bucket`, so the train step compiles once per bucket;
    `seq_len` instead fixes the length exactly (a row that does not fit raises).
    """
    rows = list(range(len(roll.records))) if rows is None else list(rows)
    num_rows = len(rows) if num_rows is None else num_rows
    if len(rows) > num_rows:
        raise ValueError(f"training_batch: {len(rows)} rows > num_rows={num_rows}")
    seqs = [roll.prompt_ids[r] + roll.response_ids[r] for r in rows]
    longest = max((len(s) - 1 for s in seqs), default=1)
    if seq_len is not None and longest > seq_len:
        raise ValueError(
            f"training_batch: a row of {longest} tokens does not fit seq_len={seq_len}"
        )
    t = seq_len if seq_len is not None else bucket(longest, seq_bucket)
    out = {
        "input_ids": np.full((num_rows, t), pad_id, np.int32),
        "targets": np.full((num_rows, t), pad_id, np.int32),
        "loss_mask": np.zeros((num_rows, t), np.float32),
        "segment_ids": np.zeros((num_rows, t), np.int32),
        "sampler_logprobs": np.zeros((num_rows, t), np.float32),
    }
    if roll.routes is not None and rows:
        out["routes"] = np.full((num_rows, t) + roll.routes[rows[0]].shape[1:], -1, np.int32)
    for i, (r, s) in enumerate(zip(rows, seqs, strict=True)):
        n_in = len(s) - 1
        p = len(roll.prompt_ids[r])
        out["input_ids"][i, :n_in] = s[:-1]
        out["targets"][i, :n_in] = s[1:]
        out["segment_ids"][i, :n_in] = 1
        out["loss_mask"][i, p - 1 : n_in] = 1.0  # targets that are response tokens
        out["sampler_logprobs"][i, p - 1 : n_in] = roll.sampler_logprobs[r]
        if "routes" in out:
            if len(roll.routes[r]) != n_in:
                raise ValueError(
                    f"training_batch: row {r} has routes for {len(roll.routes[r])} positions, "
                    f"its sequence {n_in}"
                )
            out["routes"][i, :n_in] = roll.routes[r]
    return out


def domain_means(values: np.ndarray, domains: Sequence[str]) -> dict[str, float]:
    out: dict[str, list[float]] = {}
    for v, d in zip(values, domains, strict=True):
        out.setdefault(d, []).append(float(v))
    return {d: float(np.mean(v)) for d, v in out.items()}
