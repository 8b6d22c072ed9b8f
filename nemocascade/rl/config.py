"""The typed config of an RL stage (`stages.<name>` with `type` grpo or mopd), and of its
optional environment (`stages.<name>.env`: a multi-turn, tool-executing GRPO stage)."""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any, Literal

from nemocascade.rl.envs.base import EnvLimits
from nemocascade.train.distill import DistillConfig
from nemocascade.train.grpo import GRPOConfig
from nemocascade.train.optim import OptimConfig
from nemocascade.typed_config import ConfigError, from_mapping

RL_TYPES = ("grpo", "mopd")
LOSS_CONFIGS = {"grpo": GRPOConfig, "mopd": DistillConfig}
ENV_LIMIT_KEYS = (
    "max_turns",
    "max_calls_per_turn",
    "max_tool_calls",
    "tool_timeout_s",
    "max_tool_output_chars",
    "max_episode_tokens",
)


@dataclasses.dataclass(frozen=True)
class EnvStageConfig:
    """The environment of an agentic GRPO stage (`stages.<name>.env`); `name` "" (the default)
    keeps the stage single-turn. With a name (an `rl.envs` environment, e.g. "swe"), every
    rollout is an episode: the environment is built from the prompt record, the model's tool
    calls are executed in the sandbox and answered, until the episode ends or a limit cuts it
    (the `EnvLimits` fields, plus `max_episode_tokens` for the whole conversation, which is
    also the stage's training sequence length). The paper's SWE RL (256K context, up to 200
    turns) is this with `name="swe"`.

    The limits are not checked here but by `problems` (called by `jobs.validate` before
    anything trains, and by `RLStage`), so every bad key of every stage is listed at once."""

    name: str = ""
    max_turns: int = 8
    max_calls_per_turn: int = 8
    max_tool_calls: int = 32
    tool_timeout_s: float = 10.0
    max_tool_output_chars: int = 2000
    max_episode_tokens: int = 4096

    def problems(self, where: str) -> list[str]:
        """Each count limit below 1 and a tool timeout not > 0, named `where.<key>` (`where` is
        the section, `stages.<name>.env`)."""
        out = [
            f"{where}.{k}={getattr(self, k)}: must be >= 1"
            for k in ENV_LIMIT_KEYS
            if k != "tool_timeout_s" and not getattr(self, k) >= 1
        ]
        if not self.tool_timeout_s > 0:
            out.append(f"{where}.tool_timeout_s={self.tool_timeout_s}: must be > 0 (seconds)")
        return out

    def limits(self) -> EnvLimits:
        """The per-episode limits every environment enforces."""
        return EnvLimits(
            max_turns=self.max_turns,
            max_calls_per_turn=self.max_calls_per_turn,
            max_tool_calls=self.max_tool_calls,
            tool_timeout_s=self.tool_timeout_s,
            max_tool_output_chars=self.max_tool_output_chars,
        )


@dataclasses.dataclass(frozen=True)
class RLStageConfig:
    """One GRPO or MOPD stage. Every step draws `prompts_per_step` prompts of `domains` (mixed by
    `domain_weights`, default uniform), samples `samples_per_prompt` responses each at
    `temperature` / `top_p` (thinking mode if `thinking`), scores them (GRPO: `reward`;
    MOPD: each domain's teacher), and makes one optimizer update (strictly on-policy unless
    `rollout_lag`)."""

    type: Literal["grpo", "mopd"]
    domains: tuple[str, ...]
    steps: int
    prompts_per_step: int
    samples_per_prompt: int
    max_new_tokens: int
    temperature: float
    top_p: float
    thinking: bool
    loss: GRPOConfig | DistillConfig
    optim: OptimConfig
    checkpoint_every: int = 10
    eval_every: int = 0  # held-out evaluation of every domain every k steps (0: never)
    domain_weights: dict[str, float] = dataclasses.field(default_factory=dict)
    max_gen_batches: int = 1  # GRPO dynamic filtering: rollout rounds to fill the batch
    # continuous batching of the rollouts: at most this many rows decode at once, a finished
    # row's slot taking the next (a multiple of the mesh's batch shards); 0: one static batch
    rollout_slots: int = 0
    # chunked prefill of the rollout prompts (long context): slices of this many positions
    # enter the cache in turn (`generate(..., prefill_chunk=)`); 0: the whole prompt at once
    rollout_prefill_chunk: int = 0
    # routing replay (R3): the sampler records every position's experts and the policy's
    # training forward uses them (gates recomputed by its router), so a token is trained
    # through the experts it was sampled with; `route_change_frac` logs how often the router
    # would now choose otherwise. Single-turn rollouts and multi-turn episodes alike.
    routing_replay: bool = False
    # 0: strictly on-policy (the paper): each step samples from the weights it trains. 1: one
    # step off-policy (`rl.ahead`): step n + 1's rollouts are sampled and scored in the
    # background from step n's weights while step n trains, so the rows are one update stale;
    # pair it with `loss.importance_correction` ("tis" or "icepop"). Records `rollout_lag`,
    # `rollout_wait_s`, `rollout_ahead_s` per step.
    rollout_lag: int = 0
    # GRPO reward: "verifier" (rule-based, per record) or a learned reward model kind of
    # `rewards.reward_models` ("bt": a Bradley-Terry scorer, "genrm": a pairwise judge) at
    # `reward_model_path` (a checkpoint directory, or "stage:<name>" for a reward_model stage of
    # this pipeline), with `reward_model` options (RewardModelConfig fields: length penalty,
    # batch size, judge template, ...)
    reward: str = "verifier"
    reward_model_path: str = ""
    reward_model: dict[str, Any] = dataclasses.field(default_factory=dict)
    moe_bias_rate: float = 1e-3  # MoE correction-bias rate (aux-loss-free balancing)
    freeze_router: bool = True  # router weights frozen (Nemotron-3 RL); the bias still moves
    max_consecutive_skips: int = 10  # NaN/Inf updates in a row before the stage aborts
    # a step whose responses the graders fail on (timeouts, sandbox errors, ...) more often than
    # this stops the stage with the cause: errored rows are never trained on, but a broken
    # grader would otherwise silently starve the stage
    max_reward_error_frac: float = 0.1
    # "" continues the main chain (the previous main-chain stage's weights); a stage name makes
    # this a side branch from that earlier stage (e.g. an RLHF teacher trained from SFT): the next
    # main-chain stage does not start from it
    start_from: str = ""
    # MOPD: {domain: stage name or Hugging Face checkpoint directory}; a domain not named here is
    # taught by its best evaluated checkpoint so far
    teachers: dict[str, str] = dataclasses.field(default_factory=dict)
    # GRPO: multi-turn episodes with tool execution instead of single responses (see
    # `EnvStageConfig`); `max_new_tokens` then bounds each assistant turn
    env: EnvStageConfig = dataclasses.field(default_factory=EnvStageConfig)

    def __post_init__(self):
        for key in (
            "steps",
            "prompts_per_step",
            "samples_per_prompt",
            "max_new_tokens",
            "checkpoint_every",
            "max_gen_batches",
            "max_consecutive_skips",
        ):
            if getattr(self, key) < 1:
                raise ValueError(f"{key} must be >= 1, got {getattr(self, key)}")
        if self.rollout_slots < 0:
            raise ValueError(f"rollout_slots must be >= 0, got {self.rollout_slots}")
        if self.rollout_lag not in (0, 1):
            raise ValueError(f"rollout_lag must be 0 or 1, got {self.rollout_lag}")
        if self.rollout_prefill_chunk < 0:
            raise ValueError(
                f"rollout_prefill_chunk must be >= 0, got {self.rollout_prefill_chunk}"
            )
        if not self.domains:
            raise ValueError("domains is empty")
        if not 0 <= self.max_reward_error_frac <= 1:
            raise ValueError(
                f"max_reward_error_frac must be in [0, 1], got {self.max_reward_error_frac}"
            )
        if self.eval_every < 0:
            raise ValueError(f"eval_every must be >= 0, got {self.eval_every}")
        if not self.temperature > 0 or not 0 < self.top_p <= 1:
            raise ValueError(
                f"need temperature > 0 and 0 < top_p <= 1 for RL sampling, got "
                f"temperature={self.temperature}, top_p={self.top_p}"
            )
        if not isinstance(self.loss, LOSS_CONFIGS[self.type]):
            raise ValueError(f"a {self.type} stage needs a {LOSS_CONFIGS[self.type].__name__} loss")
        for key in ("domain_weights", "teachers"):
            unknown = sorted(set(getattr(self, key)) - set(self.domains))
            if unknown:
                raise ValueError(f"{key} names domains {unknown} not in domains")
        if self.teachers and self.type != "mopd":
            raise ValueError("teachers is for mopd stages")
        if self.env.name and (self.type != "grpo" or self.reward != "verifier"):
            raise ValueError(
                "env is for grpo stages rewarded by the environment (reward='verifier')"
            )
        if self.reward_model and self.reward == "verifier":
            raise ValueError("reward_model options need a learned reward (reward != 'verifier')")

    def reward_model_config(self, path: str, section: str):
        """The `RewardModelConfig` of a learned reward (`path` resolved by the caller)."""
        from nemocascade.rewards.reward_models import RewardModelConfig

        values = {"thinking": self.thinking, **self.reward_model}
        values.update(kind=self.reward, path=path)
        return RewardModelConfig.from_mapping(values, f"{section}.reward_model")

    @property
    def rows(self) -> int:
        """Rows of every training batch: prompts_per_step x samples_per_prompt."""
        return self.prompts_per_step * self.samples_per_prompt

    @classmethod
    def from_mapping(cls, cfg: Mapping[str, Any], section: str) -> RLStageConfig:
        """From a stage's config section; the `loss` section is read as the stage type's loss
        config. Unknown or mistyped keys raise, naming `section.key`."""
        values = dict(cfg.items())
        kind = values.get("type")
        if kind not in LOSS_CONFIGS:
            raise ConfigError(f"{section}.type={kind!r}: an RL stage is one of {list(RL_TYPES)}")
        if "loss" in values:
            values["loss"] = from_mapping(LOSS_CONFIGS[kind], values["loss"], f"{section}.loss")
        cfg = from_mapping(cls, values, section)
        if cfg.reward != "verifier":  # the options are checked now, the model is loaded later
            cfg.reward_model_config(cfg.reward_model_path, section)
        return cfg
