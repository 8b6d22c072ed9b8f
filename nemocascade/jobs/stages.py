"""The stage kinds of a cascade and their typed configs (`stages.<name>` sections).

`STAGE_CONFIGS` maps a stage's `type` to the dataclass its section is read into; a new stage
kind registers its config class here and its runner in `jobs.cascade.Cascade`.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any, Literal

from nemocascade.rl.config import RLStageConfig
from nemocascade.train.optim import OptimConfig
from nemocascade.typed_config import ConfigError, from_mapping


def check_buckets(seq_len: int, buckets) -> None:
    """Longer row shapes (seq_len, batch) beside `seq_len`: each longer, none repeated."""
    lens = [s for s, _ in buckets]
    if (
        any(s <= seq_len for s in lens)
        or len(set(lens)) != len(lens)
        or any(b < 1 for _, b in buckets)
    ):
        raise ValueError(
            f"buckets={[list(b) for b in buckets]}: each (seq_len, batch) needs a seq_len longer "
            f"than seq_len={seq_len}, not repeated, and a batch >= 1"
        )


@dataclasses.dataclass(frozen=True)
class SFTStageConfig:
    """An SFT stage of the cascade: `steps` updates on packed rows of `seq_len` tokens,
    `batch_size` rows per step, over the SFT records of `domains` (each capped at
    `records_per_domain[domain]` records if given).

    `eval_every` > 0 scores the held-out sets every that many steps (`eval/<domain>` in
    metrics.jsonl: the SFT's learning curve); with `stop_at` ({domain: held-out score in percent})
    only those domains are scored and the stage ends at the first evaluation where every one of
    them reaches its score: SFT sized by measured accuracy, not by a step count that lands on
    either side of a skill's cliff depending on the CPU and the seed (`steps` is the maximum; the
    learning-rate schedule keeps its `steps` horizon, as the paper's 40K-step cosine stopped at
    33K)."""

    type: Literal["sft"]
    domains: tuple[str, ...]
    steps: int
    seq_len: int
    batch_size: int
    thinking: bool
    optim: OptimConfig
    records_per_domain: dict[str, int] = dataclasses.field(default_factory=dict)
    # each record of domain d appears domain_repeats[d] times per pass (default 1): a domain's
    # share of the mixture raised without inventing records
    domain_repeats: dict[str, int] = dataclasses.field(default_factory=dict)
    loss_chunk_size: int = 0  # 0: full logits; N: chunked cross-entropy (large vocabularies)
    non_thinking_fraction: float = 0.0
    overlong: Literal["truncate", "split"] = "truncate"
    # longer row shapes [(seq_len, batch_size), ...]: each record trains in the shortest shape
    # that holds it, each step is one shape's batch (`PackingConfig.buckets`)
    buckets: tuple[tuple[int, int], ...] = ()
    checkpoint_every: int = 100
    start_from: str = ""  # "" continues the main chain; a stage name: a side branch from it
    eval_every: int = 0  # 0: held-out scores only after the stage
    eval_samples: int = 0  # samples per prompt of those checks; 0: the eval section's n_samples
    stop_at: dict[str, float] = dataclasses.field(default_factory=dict)

    def __post_init__(self):
        for key in ("steps", "seq_len", "batch_size", "checkpoint_every"):
            if getattr(self, key) < 1:
                raise ValueError(f"{key} must be >= 1, got {getattr(self, key)}")
        check_buckets(self.seq_len, self.buckets)
        if not self.domains:
            raise ValueError("domains is empty")
        unknown = sorted(set(self.records_per_domain) - set(self.domains))
        if unknown:
            raise ValueError(f"records_per_domain names domains {unknown} not in domains")
        unknown = sorted(set(self.domain_repeats) - set(self.domains))
        if unknown:
            raise ValueError(f"domain_repeats names domains {unknown} not in domains")
        bad = {d: n for d, n in self.domain_repeats.items() if int(n) != n or n < 1}
        if bad:
            raise ValueError(f"domain_repeats must be integers >= 1, got {bad}")
        if self.eval_every < 0 or self.eval_samples < 0:
            raise ValueError(
                f"eval_every and eval_samples must be >= 0, got {self.eval_every}, "
                f"{self.eval_samples}"
            )
        unknown = sorted(set(self.stop_at) - set(self.domains))
        if unknown:
            raise ValueError(f"stop_at names domains {unknown} not in domains {self.domains}")
        bad = {d: v for d, v in self.stop_at.items() if not 0.0 < float(v) <= 100.0}
        if bad:
            raise ValueError(f"stop_at scores are percentages in (0, 100], got {bad}")
        if self.stop_at and self.eval_every < 1:
            raise ValueError("stop_at needs eval_every >= 1 (the steps between its evaluations)")

    @classmethod
    def from_mapping(cls, cfg: Mapping[str, Any], section: str) -> SFTStageConfig:
        return from_mapping(cls, cfg, section)


@dataclasses.dataclass(frozen=True)
class RewardModelStageConfig:
    """A Bradley-Terry reward model trained on the preference pairs of `domains` (`batch_size`
    pairs per step, the last `eval_pairs` held out: accuracy and margin), its backbone started
    from the main chain's current weights (or `start_from`). A side stage: the policy chain
    goes on unchanged; an RL stage uses the model with `reward_model_path="stage:<name>"`."""

    type: Literal["reward_model"]
    domains: tuple[str, ...]
    steps: int
    seq_len: int
    batch_size: int
    eval_pairs: int
    thinking: bool
    optim: OptimConfig
    strip_reasoning: bool = True  # the model scores final answers only (the paper's RLHF)
    checkpoint_every: int = 100
    start_from: str = ""

    def __post_init__(self):
        for key in ("steps", "seq_len", "batch_size", "eval_pairs", "checkpoint_every"):
            if getattr(self, key) < 1:
                raise ValueError(f"{key} must be >= 1, got {getattr(self, key)}")
        if not self.domains:
            raise ValueError("domains is empty")

    @classmethod
    def from_mapping(cls, cfg: Mapping[str, Any], section: str) -> RewardModelStageConfig:
        return from_mapping(cls, cfg, section)


StageConfig = SFTStageConfig | RLStageConfig | RewardModelStageConfig
STAGE_CONFIGS: dict[str, Any] = {
    "sft": SFTStageConfig,
    "grpo": RLStageConfig,
    "mopd": RLStageConfig,
    "reward_model": RewardModelStageConfig,
}


def parse_stage(name: str, cfg: Mapping[str, Any]) -> StageConfig:
    """The typed config of stage `name` (errors name `stages.<name>.<key>`)."""
    section = f"stages.{name}"
    kind = dict(cfg.items()).get("type")
    if kind not in STAGE_CONFIGS:
        raise ConfigError(f"{section}.type={kind!r}: expected one of {sorted(STAGE_CONFIGS)}")
    return STAGE_CONFIGS[kind].from_mapping(cfg, section)
