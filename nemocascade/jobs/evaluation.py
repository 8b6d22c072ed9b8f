"""Held-out evaluation: sample k responses per prompt record, grade them with the records'
verifiers, report pass@1 (the mean score), pass@k and a 95% interval over problems.

One code path grades every evaluation: `sample_and_grade` (generation by
`rl.rollouts.generate_rollouts`, as `rl.rollouts.sample` does it, then `grade`:
`rewards.grade_batch` with the `thinking` rule and its error mask, through the run's
`rewards.RewardCache` when one is given). The cascade evaluates every domain after each stage (and
within RL stages every `eval_every` steps) through `evaluate_domains`; `python -m
nemocascade.evaluate` (task files, checkpoints, reports) through `sample_and_grade` (without a
cache: every verifier's details are kept) + `task_metrics`.

Task files (GSM8K, MATH, HumanEval, MBPP, IFEval, MCQA, prompt records) become prompt records
in `data.task_formats`.

Scores: a sample's score is its verifier's, in [0, 1]; it is *correct* when the score is 1.
A grader failure (see `rewards.ERROR_KINDS`) scores 0 and is counted as a verifier error.

Agentic domains (`episode_envs`: the domains an environment stage trains, and domains whose
records name an environment rather than a verifier, such as `swe`) are evaluated by episodes
instead (`rl.agentic.evaluate_episodes`): a single response cannot fix a repository, and the
`swe` record type is an environment, not a reward verifier. Their score is the episodes' mean
reward in percent; the episode metrics (success by number of turns, finish reasons, ...) come
with it.
"""

from __future__ import annotations

import collections
import dataclasses
import json
import math
import os
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import numpy as np
from flax import nnx

from nemocascade import rewards as rw
from nemocascade.rl import agentic
from nemocascade.rl import rollouts as ro
from nemocascade.rl.config import EnvStageConfig, RLStageConfig
from nemocascade.rl.envs import ENVS

Z95 = 1.959963984540054  # the standard normal's 97.5% quantile


@dataclasses.dataclass(frozen=True)
class EvalConfig:
    """The `eval` section: `n_samples` responses per prompt at `temperature` / `top_p` (pass@1
    estimated from k samples, the paper's avg@k protocol), up to `max_new_tokens` each."""

    n_samples: int
    temperature: float
    top_p: float
    max_new_tokens: int
    thinking: bool
    # continuous batching (`generate(..., slots=)`): at most this many rows decode at once;
    # 0: one static batch per evaluation batch
    slots: int = 0

    def __post_init__(self):
        if self.n_samples < 1 or self.max_new_tokens < 1:
            raise ValueError(
                f"n_samples and max_new_tokens must be >= 1, got {self.n_samples}, "
                f"{self.max_new_tokens}"
            )
        if self.slots < 0:
            raise ValueError(f"slots must be >= 0, got {self.slots}")
        if self.temperature < 0 or not 0 < self.top_p <= 1:
            raise ValueError(f"need temperature >= 0 and 0 < top_p <= 1, got {self}")


# ============================================================================ sampling + grading
@dataclasses.dataclass
class EvalSamples:
    """Every sample of one evaluation; rows problem-major (problem i, sample j -> i*n + j)."""

    records: list[dict]  # one per problem
    n: int
    responses: list[str]  # decoded, without the eos token
    response_tokens: np.ndarray  # [R] int32, generated tokens including eos
    finished: np.ndarray  # [R] bool: ended with eos / stop (not cut at max_new_tokens)
    scores: np.ndarray  # [R] float32 in [0, 1]; 0 where `errors`
    errors: np.ndarray  # [R] bool: the grader failed (no verdict)
    details: list[dict]  # [R] the verifier's details (`error_kind` / `error` for errors)

    @staticmethod
    def concat(parts: Sequence[EvalSamples]) -> EvalSamples:
        return EvalSamples(
            [r for p in parts for r in p.records],
            parts[0].n,
            [s for p in parts for s in p.responses],
            np.concatenate([p.response_tokens for p in parts]),
            np.concatenate([p.finished for p in parts]),
            np.concatenate([p.scores for p in parts]),
            np.concatenate([p.errors for p in parts]),
            [d for p in parts for d in p.details],
        )


def grade(
    records: Sequence[dict],
    responses: Sequence[str],
    finished: Sequence[bool],
    *,
    thinking: bool,
    num_workers: int,
    timeout_s: float = 30.0,
    reward_cache: rw.RewardCache | None = None,
) -> tuple[np.ndarray, np.ndarray, list[dict]]:
    """(scores float32, errors bool, details) of each response; each distinct (record, response,
    finished) is graded once by `rewards.grade_batch`. With `reward_cache` the verdicts go
    through it (memoised across calls; the details then hold only `reward_status`)."""
    if reward_cache is not None:
        res = reward_cache.score(
            records,
            responses,
            finished,
            num_workers=num_workers,
            timeout_s=timeout_s,
            thinking=thinking,
        )
        errors = np.asarray(res.errors, bool)
        details = [{"reward_status": "error" if e else "ok"} for e in errors]
        return np.asarray(res.scores, np.float32), errors, details
    keys = [
        rw.RewardCache.key(r, s, bool(f), thinking)
        for r, s, f in zip(records, responses, finished, strict=True)
    ]
    first: dict[str, int] = {}
    for i, k in enumerate(keys):
        first.setdefault(k, i)
    idx = list(first.values())
    res = rw.grade_batch(
        [records[i] for i in idx],
        [responses[i] for i in idx],
        [bool(finished[i]) for i in idx],
        num_workers=num_workers,
        timeout_s=timeout_s,
        thinking=thinking,
    )
    slot = {k: j for j, k in enumerate(first)}
    at = [slot[k] for k in keys]
    scores = np.array([res.scores[j] for j in at], np.float32)
    errors = np.array([res.errors[j] for j in at], bool)
    return scores, errors, [res.details[j] for j in at]


def _sample_batch(graphdef, state, tokenizer, records, cfg, *, seed, num_workers, mesh, cache):
    """Generate (as `rl.rollouts.sample` does) and grade one batch of prompt records."""
    g = ro.generate_rollouts(
        graphdef,
        state,
        tokenizer,
        records,
        n=cfg.n_samples,
        max_new_tokens=cfg.max_new_tokens,
        temperature=cfg.temperature,
        top_p=cfg.top_p,
        top_k=0,
        seed=seed,
        thinking=cfg.thinking,
        mesh=mesh,
        slots=cfg.slots,
    )
    scores, errors, details = grade(
        g.records,
        g.responses,
        g.finished,
        thinking=cfg.thinking,
        num_workers=num_workers,
        reward_cache=cache,
    )
    lengths = np.array([len(ids) for ids in g.response_ids], np.int32)
    return EvalSamples(
        list(records), cfg.n_samples, g.responses, lengths, g.finished, scores, errors, details
    )


def batch_seed(seed: int, index: int) -> int:
    """The sampling seed of the `index`-th prompt batch: `seed` for the first (so one batch is
    exactly `rl.rollouts.sample`), a distinct derived seed for the others."""
    if index == 0:
        return int(seed)
    return int(np.random.SeedSequence([int(seed), int(index)]).generate_state(1)[0] >> 1)


def sample_and_grade(
    graphdef: nnx.GraphDef,
    state: nnx.State,
    tokenizer,
    records: Sequence[dict],
    cfg: EvalConfig,
    *,
    seed: int,
    num_workers: int = 2,
    mesh=None,
    batch_size: int = 0,
    on_batch: Callable[[EvalSamples], None] | None = None,
    reward_cache: rw.RewardCache | None = None,
) -> EvalSamples:
    """`cfg.n_samples` responses per record, graded by `grade` (the `thinking` rule applies in
    thinking mode). `batch_size` > 0 generates that many prompts at a time (batch b samples with
    `batch_seed(seed, b)`); `on_batch` gets the samples so far after each batch."""
    records = list(records)
    step = batch_size if batch_size > 0 else max(1, len(records))
    parts: list[EvalSamples] = []
    for b, start in enumerate(range(0, len(records), step)):
        parts.append(
            _sample_batch(
                graphdef,
                state,
                tokenizer,
                records[start : start + step],
                cfg,
                seed=batch_seed(seed, b),
                num_workers=num_workers,
                mesh=mesh,
                cache=reward_cache,
            )
        )
        if on_batch is not None:
            on_batch(EvalSamples.concat(parts))
    if not parts:
        raise ValueError("sample_and_grade: no records to evaluate")
    return EvalSamples.concat(parts)


# ============================================================================ metrics
def pass_at_k(n: int, c: int, k: int) -> float:
    """The unbiased pass@k of a problem with `c` correct of `n` samples: 1 - C(n-c, k) / C(n, k)
    (the probability that k of the n samples, drawn without replacement, hold a correct one)."""
    if not (0 <= c <= n and 1 <= k <= n):
        raise ValueError(f"pass_at_k: need 0 <= c <= n and 1 <= k <= n, got n={n} c={c} k={k}")
    if n - c < k:
        return 1.0
    return 1.0 - math.comb(n - c, k) / math.comb(n, k)


def mean_ci95(values: Sequence[float]) -> tuple[float, float | None, float | None]:
    """(mean, low, high): the normal 95% interval mean +- 1.96 * s / sqrt(P) over the P values
    (s the sample standard deviation), clipped to [0, 1]; no interval (None) when P < 2."""
    v = np.asarray(values, np.float64)
    if v.size == 0:
        raise ValueError("mean_ci95: no values")
    m = float(v.mean())
    if v.size < 2:
        return m, None, None
    half = Z95 * float(v.std(ddof=1)) / math.sqrt(v.size)
    return m, max(0.0, m - half), min(1.0, m + half)


def _pct(x: float | None) -> float | None:
    return None if x is None else round(100.0 * x, 2)


PROBLEM_SCORES = "eval_problems.json"  # a stage's per-problem held-out scores, in its directory


def paired_ci95(current: Sequence[float], reference: Sequence[float]) -> list[float | None]:
    """[delta, low, high] in percent: the mean over problems of current - reference (per-problem
    scores of two checkpoints on the same problems, in the same order) and its normal 95%
    interval. Pairing removes the problems' own difficulty from the noise: the interval of a
    difference is much narrower than the two scores' intervals suggest. No interval for one
    problem."""
    a, b = np.asarray(current, np.float64), np.asarray(reference, np.float64)
    if a.shape != b.shape or a.ndim != 1 or a.size == 0:
        raise ValueError(f"paired_ci95: {a.shape} vs {b.shape} problems; need the same, >= 1")
    d = a - b
    m = float(d.mean())
    if d.size < 2:
        return [_pct(m), None, None]
    half = Z95 * float(d.std(ddof=1)) / math.sqrt(d.size)
    return [_pct(m), _pct(m - half), _pct(m + half)]


def paired_deltas(
    problems: Mapping[str, Sequence[float]], stage_dir: str, references: Mapping[str, str]
) -> dict[str, dict[str, list[float | None]]]:
    """Saves a stage's per-problem held-out scores (`problems`, from `evaluate_domains`) in
    `stage_dir` (`PROBLEM_SCORES`) and returns {reference: {domain: paired_ci95(...)}}: their
    paired differences against each reference stage's, read from its directory
    (`references[name]`). A reference without the file (a checkpoint from elsewhere, a run from
    before it existed) or a domain with other problems is left out, never compared unpaired."""
    with open(os.path.join(stage_dir, PROBLEM_SCORES), "w") as f:
        json.dump(problems, f)
    out: dict[str, dict[str, list[float | None]]] = {}
    for name, ref_dir in references.items():
        try:
            with open(os.path.join(ref_dir, PROBLEM_SCORES)) as f:
                ref = json.load(f)
        except (FileNotFoundError, json.JSONDecodeError):
            continue
        out[name] = {
            d: paired_ci95(v, ref[d])
            for d, v in problems.items()
            if v and len(ref.get(d, ())) == len(v)
        }
    return out


def task_metrics(s: EvalSamples) -> dict[str, Any]:
    """Per-task summary, scores in percent: pass@1 (the mean score, errors as 0) with its 95%
    interval over problems (`mean_ci95` of the per-problem mean scores), pass@k for k in {1, n}
    (`pass_at_k`, a sample is correct when it scores 1), pass@1 over the graded samples only,
    verifier errors (total and by kind), mean response length (tokens), truncation rate."""
    p, n = len(s.records), s.n
    scores = s.scores.astype(np.float64).reshape(p, n)
    correct = ((scores >= 1.0) & ~s.errors.reshape(p, n)).sum(axis=1)
    mean, low, high = mean_ci95(scores.mean(axis=1))
    kinds = collections.Counter(
        d.get("error_kind", "unknown") for d, e in zip(s.details, s.errors, strict=True) if e
    )
    graded = s.scores[~s.errors]
    return {
        "n_problems": p,
        "n_samples": n,
        "pass@1": _pct(mean),
        "ci95": {"low": _pct(low), "high": _pct(high), "method": "normal, over problems"},
        "pass@k": {
            str(k): _pct(float(np.mean([pass_at_k(n, int(c), k) for c in correct])))
            for k in sorted({1, n})
        },
        "pass@1_graded_only": _pct(float(graded.mean())) if graded.size else None,
        "verifier_errors": int(s.errors.sum()),
        "verifier_errors_by_kind": dict(sorted(kinds.items())),
        "mean_response_tokens": round(float(s.response_tokens.mean()), 2),
        "truncation_rate": _pct(float((~s.finished).mean())),
    }


# ============================================================================ the cascade's hook
def _record_kind(record: dict) -> str | None:
    """The verifier (or environment) name of a held-out record; None if it has none (the
    validation names that record)."""
    try:
        return rw.verifier_name(record)
    except (TypeError, ValueError):
        return None


def episode_envs(
    order: Sequence[str], stages: Mapping[str, Any], eval_sets: Mapping[str, Sequence[dict]]
) -> dict[str, EnvStageConfig]:
    """{domain: environment} of the domains evaluated by episodes: each domain of a stage with
    an environment gets the first such stage's (its limits too); a domain no such stage trains
    whose held-out records all name a registered environment and no verifier (`swe`) gets that
    environment with the default limits. The other domains are graded by their verifiers."""
    out: dict[str, EnvStageConfig] = {}
    for name in order:
        cfg = stages[name]
        if isinstance(cfg, RLStageConfig) and cfg.env.name:
            for d in cfg.domains:
                out.setdefault(d, cfg.env)
    for d, records in eval_sets.items():
        kinds = {_record_kind(r) for r in records}
        if d not in out and len(kinds) == 1:
            (kind,) = kinds
            if kind in ENVS and not rw.has_verifier(kind):
                out[d] = EnvStageConfig(name=kind)
    return out


def evaluate_domains(
    graphdef: nnx.GraphDef,
    state: nnx.State,
    tokenizer,
    eval_sets: Mapping[str, Sequence[dict]],
    cfg: EvalConfig,
    *,
    seed: int,
    reward_cache: rw.RewardCache | None = None,
    num_workers: int = 2,
    mesh=None,
    envs: Mapping[str, EnvStageConfig] | None = None,
    episodes: dict[str, dict[str, float]] | None = None,
    intervals: dict[str, list[float | None]] | None = None,
    problems: dict[str, list[float]] | None = None,
) -> dict[str, float]:
    """{domain: score in percent} over each domain's held-out prompt records: the mean score of
    every sample (a grader failure counts 0), one generation batch per domain: the numbers
    `rl.rollouts.sample` gives for the same arguments. A domain in `envs` (`episode_envs`) is
    scored by `cfg.n_samples` episodes per record in its environment (at `cfg.temperature`,
    `cfg.max_new_tokens` per turn); their metrics go to `episodes[domain]` when given. With
    `intervals`, each verifier-graded domain's 95% interval over problems (`mean_ci95`, percent)
    goes to `intervals[domain]` as [low, high]; with `problems`, its per-problem mean scores (in
    record order: `paired_ci95` compares two checkpoints on them) to `problems[domain]`."""
    out = {}
    for domain, records in eval_sets.items():
        if envs and domain in envs:
            m = agentic.evaluate_episodes(
                graphdef,
                state,
                tokenizer,
                records,
                envs[domain],
                n=cfg.n_samples,
                max_new_tokens=cfg.max_new_tokens,
                temperature=cfg.temperature,
                top_p=cfg.top_p,
                seed=seed,
                thinking=cfg.thinking,
                slots=cfg.slots,
                mesh=mesh,
            )
            out[domain] = m.pop("score")
            if episodes is not None:
                episodes[domain] = m
            continue
        s = sample_and_grade(
            graphdef,
            state,
            tokenizer,
            records,
            cfg,
            seed=seed,
            num_workers=num_workers,
            mesh=mesh,
            reward_cache=reward_cache,
        )
        out[domain] = round(100.0 * float(s.scores.mean()), 2)
        if intervals is not None:
            ci = task_metrics(s)["ci95"]
            intervals[domain] = [ci["low"], ci["high"]]
        if problems is not None:
            per = s.scores.astype(np.float64).reshape(len(records), s.n).mean(axis=1)
            problems[domain] = [round(float(x), 4) for x in per]
    return out
