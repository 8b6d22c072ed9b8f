"""Held-out evaluation per domain: sample k responses per prompt, score them with the records'
verifiers, report pass@1 (the mean reward, in percent). The cascade evaluates every domain after
each stage (and within RL stages every `eval_every` steps) with this code."""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence

from flax import nnx

from nemocascade.rl import rollouts as ro


@dataclasses.dataclass(frozen=True)
class EvalConfig:
    """The `eval` section: `n_samples` responses per prompt at `temperature` / `top_p` (pass@1
    estimated from k samples, the paper's avg@k protocol), up to `max_new_tokens` each."""

    n_samples: int
    temperature: float
    top_p: float
    max_new_tokens: int
    thinking: bool

    def __post_init__(self):
        if self.n_samples < 1 or self.max_new_tokens < 1:
            raise ValueError(
                f"n_samples and max_new_tokens must be >= 1, got {self.n_samples}, "
                f"{self.max_new_tokens}"
            )
        if self.temperature < 0 or not 0 < self.top_p <= 1:
            raise ValueError(f"need temperature >= 0 and 0 < top_p <= 1, got {self}")


def evaluate_domains(
    graphdef: nnx.GraphDef,
    state: nnx.State,
    tokenizer,
    eval_sets: Mapping[str, Sequence[dict]],
    cfg: EvalConfig,
    *,
    seed: int,
    reward_cache: ro.RewardCache | None = None,
    num_workers: int = 2,
    mesh=None,
) -> dict[str, float]:
    """{domain: score in percent} over each domain's held-out prompt records."""
    out = {}
    for domain, records in eval_sets.items():
        roll = ro.sample(
            graphdef,
            state,
            tokenizer,
            list(records),
            n=cfg.n_samples,
            max_new_tokens=cfg.max_new_tokens,
            temperature=cfg.temperature,
            top_p=cfg.top_p,
            seed=seed,
            thinking=cfg.thinking,
            reward_cache=reward_cache,
            num_workers=num_workers,
            mesh=mesh,
        )
        out[domain] = round(100.0 * float(roll.rewards.mean()), 2)
    return out
