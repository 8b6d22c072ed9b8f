"""Learned rewards for RL: the scorer interface, a registry, the Bradley-Terry scorer ("bt") and
the generative pairwise judge ("genrm", Cascade 2's RLHF reward).

Interface (what an RL stage calls after sampling; rows prompt-major, group g = rows
g*G .. g*G+G-1, all answering `records[g*G]`):

    rewards_R, metrics = scorer.score_group_rows(records, responses, group_size,
                                                 finished=None, response_lengths=None)

`rewards_R` is fp32 [R]; `metrics` are "rm/..." scalars for the step's record. A scorer never
raises on what a model writes (an unparseable verdict is a tie, counted); it raises only on bad
arguments. Not imported by `nemocascade.rewards` (it needs JAX; the verifier workers do not).

Registry: `@register_reward_model(name)` registers `build(cfg: RewardModelConfig, *,
policy_config, policy_tokenizer, mesh) -> scorer`; `build_reward_model(cfg, ...)` calls it.

Length penalty (both scorers, off by default): reward -= coef * max(0, len - target) / target,
`len` the response's length in tokens (`response_lengths`, else the scorer's tokenizer count).

GenRM (`PairwiseJudgeScorer`, pieces in `genrm.py`). The judge (any NemotronH checkpoint with a
tokenizer) reads one user message, `template.format(question=..., response_a=...,
response_b=...)`, and writes a verdict (`genrm.parse_verdict`); the responses are shown without
their reasoning (`data.preferences.scored_response`). Every unordered pair of a group's responses
is judged in BOTH orders, which cancels a position bias; a response's reward is its win rate
(win 1, tie or unparseable 0.5, loss 0). All comparisons of a call go to the judge at once
(`genrm.GenerateJudge`: one `generate` call per `batch_size` prompts, all of them when 0).
"""

from __future__ import annotations

import dataclasses
import functools
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any, Literal, Protocol

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from nemocascade.data.preferences import (
    prompt_messages,
    render_scored,
    scored_response,
    sequence_batch,
)
from nemocascade.data.tokenizer import Tokenizer
from nemocascade.generate import bucket
from nemocascade.model.config import ModelConfig
from nemocascade.model.hf_io import load_hf_checkpoint
from nemocascade.model.reward_head import BACKBONE_DIR, RewardModel, load_reward_model
from nemocascade.rewards.genrm import (
    DEFAULT_JUDGE_TEMPLATE,
    GenerateJudge,
    check_template,
    comparison_plan,
    parse_verdict,
    win_rates,
)
from nemocascade.sharding import batch_shards, device_batch, state_shardings
from nemocascade.typed_config import from_mapping


class RewardScorer(Protocol):
    def score_group_rows(
        self,
        records: Sequence[Mapping],
        responses: Sequence[str],
        group_size: int,
        *,
        finished: Sequence[bool] | None = None,
        response_lengths: Sequence[int] | None = None,
    ) -> tuple[np.ndarray, dict[str, float]]: ...


# ----------------------------------------------------------------------------- config
@dataclasses.dataclass(frozen=True)
class RewardModelConfig:
    """How an RL stage builds its learned reward (`build_reward_model`)."""

    kind: str  # a registered reward model: "bt" or "genrm"
    path: str  # bt: an exported reward model; genrm: a NemotronH checkpoint with tokenizer.json
    batch_size: int = 32  # bt: rows per forward; genrm: judge prompts per generate call (0: all)
    thinking: bool = False  # the policy's responses were sampled in thinking mode
    strip_reasoning: bool = True  # judge final answers only (the paper's RLHF)
    length_penalty_coef: float = 0.0
    length_penalty_target: int = 0  # tokens
    dtype: str = "float32"  # parameter and compute dtype of the reward model / judge
    check_config: Literal["all", "vocab", "none"] = "all"  # bt: refuse a mismatching checkpoint
    max_len: int = 0  # bt: longer rows keep their last max_len tokens (0: never cut)
    judge_template: str = DEFAULT_JUDGE_TEMPLATE
    judge_max_new_tokens: int = 256
    judge_thinking: bool = False
    judge_temperature: float = 0.0
    judge_top_p: float = 1.0
    judge_seed: int = 0

    def __post_init__(self):
        if self.batch_size < 0 or self.max_len < 0 or self.judge_max_new_tokens < 1:
            raise ValueError("batch_size, max_len >= 0 and judge_max_new_tokens >= 1 required")
        LengthPenalty(self.length_penalty_coef, self.length_penalty_target)
        check_template(self.judge_template)

    @classmethod
    def from_mapping(cls, cfg: Mapping[str, Any], section: str = "reward_model"):
        return from_mapping(cls, cfg, section)


@dataclasses.dataclass(frozen=True)
class LengthPenalty:
    """reward -= coef * max(0, length - target) / target (off when coef == 0)."""

    coef: float = 0.0
    target: int = 0

    def __post_init__(self):
        if self.coef < 0 or (self.coef > 0 and self.target < 1):
            raise ValueError(
                f"length penalty: need coef >= 0 and, with coef > 0, target >= 1 tokens; got "
                f"coef={self.coef}, target={self.target}"
            )

    def __call__(self, rewards_R: np.ndarray, lengths_R: np.ndarray) -> np.ndarray:
        if not self.coef:
            return np.zeros_like(rewards_R)
        over = np.maximum(0.0, np.asarray(lengths_R, np.float32) - self.target)
        return (self.coef * over / self.target).astype(np.float32)


# ----------------------------------------------------------------------------- registry
_BUILDERS: dict[str, Callable[..., RewardScorer]] = {}


def register_reward_model(name: str):
    """Decorator: `build(cfg, *, policy_config, policy_tokenizer, mesh) -> scorer` as `name`."""

    def deco(fn):
        _BUILDERS[name] = fn
        return fn

    return deco


def reward_model_names() -> tuple[str, ...]:
    return tuple(sorted(_BUILDERS))


def build_reward_model(
    cfg: RewardModelConfig,
    *,
    policy_config: ModelConfig | None = None,
    policy_tokenizer: Tokenizer | None = None,
    mesh=None,
) -> RewardScorer:
    """The scorer `cfg.kind` builds (KeyError naming the registered kinds)."""
    if cfg.kind not in _BUILDERS:
        raise KeyError(f"no reward model {cfg.kind!r}; registered: {list(reward_model_names())}")
    return _BUILDERS[cfg.kind](
        cfg, policy_config=policy_config, policy_tokenizer=policy_tokenizer, mesh=mesh
    )


# ----------------------------------------------------------------------------- shared pieces
def record_prompt(record: Mapping) -> str | list:
    """A prompt record's prompt: its `messages`, else its `prompt` string."""
    return record.get("messages") or record["prompt"]


def question_text(record: Mapping) -> str:
    """The question a judge reads: the prompt string, a lone user message's text, or the
    conversation as `role: content` paragraphs."""
    messages = prompt_messages(record_prompt(record))
    if len(messages) == 1:
        return messages[0].get("content") or ""
    return "\n\n".join(f"{m['role']}: {m.get('content') or ''}" for m in messages)


def _check_rows(records, responses, group_size, finished, lengths) -> None:
    n = len(responses)
    if len(records) != n or group_size < 1 or n % group_size:
        raise ValueError(
            f"score_group_rows: {len(records)} records and {n} responses must be equal and a "
            f"multiple of group_size={group_size}"
        )
    for name, v in (("finished", finished), ("response_lengths", lengths)):
        if v is not None and len(v) != n:
            raise ValueError(f"score_group_rows: {len(v)} {name} for {n} responses")


def _finish(raw_R, responses, lengths, penalty: LengthPenalty, tokenizer, finished, metrics):
    """Applies the length penalty; adds the shared metrics."""
    raw_R = np.asarray(raw_R, np.float32)
    if lengths is None and penalty.coef:
        if tokenizer is None:
            raise ValueError("a length penalty needs response_lengths or the scorer's tokenizer")
        lengths = [len(tokenizer.encode(r)) for r in responses]
    elif lengths is None:
        lengths = [0] * len(raw_R)
    pen_R = penalty(raw_R, np.asarray(lengths))
    rewards = (raw_R - pen_R).astype(np.float32)
    metrics = dict(metrics)
    metrics |= {
        "rm/reward_mean": float(rewards.mean()) if len(rewards) else 0.0,
        "rm/reward_std": float(rewards.std()) if len(rewards) else 0.0,
        "rm/length_penalty_mean": float(pen_R.mean()) if len(pen_R) else 0.0,
        "rm/unfinished": int(sum(not f for f in finished)) if finished is not None else 0,
    }
    return rewards, metrics


# ----------------------------------------------------------------------------- Bradley-Terry
class BTScorer:
    """Scores (prompt, response) rows with a `RewardModel` on device, `batch_size` rows per
    forward (rounded up to the mesh's batch shards), sequences padded to a power-of-two bucket
    of at least `seq_bucket` tokens (one program per bucket)."""

    def __init__(
        self,
        model: RewardModel,
        tokenizer: Tokenizer,
        *,
        batch_size: int = 32,
        thinking: bool = False,
        strip_reasoning: bool = True,
        seq_bucket: int = 64,
        max_len: int = 0,
        length_penalty: LengthPenalty = LengthPenalty(),
        mesh=None,
    ):
        self.tokenizer, self.mesh = tokenizer, mesh
        self.thinking, self.strip_reasoning = thinking, strip_reasoning
        self.seq_bucket, self.max_len, self.length_penalty = seq_bucket, max_len, length_penalty
        self.rows = -(-max(batch_size, 1) // batch_shards(mesh)) * batch_shards(mesh)
        graphdef, state = nnx.split(model)
        if mesh is not None:
            state = jax.device_put(state, state_shardings(state, mesh))
        self.state = state
        self._forward = jax.jit(functools.partial(_bt_forward, graphdef))

    def rewards(
        self,
        prompts: Sequence[str | list],
        responses: Sequence[str],
        tools: Sequence[list | None] | None = None,
    ) -> tuple[np.ndarray, int]:
        """(raw rewards [R] fp32, rows cut to `max_len`)."""
        tools = tools or [None] * len(prompts)
        seqs = [
            render_scored(
                self.tokenizer,
                p,
                r,
                thinking=self.thinking,
                strip_reasoning=self.strip_reasoning,
                tools=t,
            )
            for p, r, t in zip(prompts, responses, tools, strict=True)
        ]
        cut = 0
        if self.max_len:
            cut = sum(len(s) > self.max_len for s in seqs)
            seqs = [s[-self.max_len :] for s in seqs]
        if not seqs:
            return np.zeros((0,), np.float32), 0
        t = bucket(max(len(s) for s in seqs), self.seq_bucket)
        out = []
        for i in range(0, len(seqs), self.rows):
            chunk = seqs[i : i + self.rows]
            host = sequence_batch(
                chunk, seq_len=t, num_rows=self.rows, pad_id=self.tokenizer.pad_id
            )
            dev = device_batch(host, self.mesh, process_local=False)
            r = self._forward(self.state, dev["input_ids"], dev["last"])
            out.append(np.asarray(jax.device_get(r), np.float32)[: len(chunk)])
        return np.concatenate(out), cut

    def score_group_rows(
        self, records, responses, group_size, *, finished=None, response_lengths=None
    ):
        _check_rows(records, responses, group_size, finished, response_lengths)
        t0 = time.perf_counter()
        raw, cut = self.rewards(
            [record_prompt(r) for r in records], responses, [r.get("tools") for r in records]
        )
        metrics = {
            "rm/raw_mean": float(raw.mean()) if len(raw) else 0.0,
            "rm/rows_cut": cut,
            "rm/score_s": time.perf_counter() - t0,
        }
        return _finish(
            raw,
            responses,
            response_lengths,
            self.length_penalty,
            self.tokenizer,
            finished,
            metrics,
        )


def _bt_forward(graphdef, state, input_ids_BT, last_B):
    return nnx.merge(graphdef, state)(input_ids_BT, last_B).astype(jnp.float32)


@register_reward_model("bt")
def build_bt(cfg: RewardModelConfig, *, policy_config=None, policy_tokenizer=None, mesh=None):
    """A `BTScorer` of the reward model exported at `cfg.path`, refused if it does not match the
    policy (`check_config`); it reads text with its own tokenizer (saved with it), else the
    policy's."""
    check = cfg.check_config != "none"
    model = load_reward_model(
        cfg.path,
        expect_config=policy_config if check else None,
        expect_tokenizer=policy_tokenizer if check else None,
        check="vocab" if cfg.check_config == "vocab" else "all",
        dtype=jnp.dtype(cfg.dtype),
        mesh=mesh,
    )
    tok_file = Path(cfg.path) / BACKBONE_DIR / "tokenizer.json"
    tokenizer = Tokenizer.from_file(tok_file) if tok_file.exists() else policy_tokenizer
    if tokenizer is None:
        raise FileNotFoundError(f"{tok_file}: missing and no policy tokenizer given")
    return BTScorer(
        model,
        tokenizer,
        batch_size=cfg.batch_size or 32,
        thinking=cfg.thinking,
        strip_reasoning=cfg.strip_reasoning,
        max_len=cfg.max_len,
        length_penalty=LengthPenalty(cfg.length_penalty_coef, cfg.length_penalty_target),
        mesh=mesh,
    )


# ----------------------------------------------------------------------------- GenRM
class PairwiseJudgeScorer:
    """Group rewards from a pairwise judge (see the module docstring). `judge(texts) ->
    verdict texts` is called once per `score_groups` with every comparison of the groups."""

    def __init__(
        self,
        judge: Callable[[list[str]], list[str]],
        *,
        template: str = DEFAULT_JUDGE_TEMPLATE,
        thinking: bool = False,
        strip_reasoning: bool = True,
        length_penalty: LengthPenalty = LengthPenalty(),
        tokenizer: Tokenizer | None = None,
    ):
        check_template(template)
        self.judge, self.template = judge, template
        self.thinking, self.strip_reasoning = thinking, strip_reasoning
        self.length_penalty, self.tokenizer = length_penalty, tokenizer

    def judge_prompt(self, question: str, response_a: str, response_b: str) -> str:
        return self.template.format(question=question, response_a=response_a, response_b=response_b)

    def score_groups(
        self, questions: Sequence[str], responses: Sequence[str], group_size: int
    ) -> tuple[np.ndarray, dict[str, float]]:
        """(win rates [R] fp32, judge metrics) of `len(questions)` groups of `group_size`
        responses (prompt-major)."""
        if len(responses) != len(questions) * group_size:
            raise ValueError(
                f"score_groups: {len(responses)} responses for {len(questions)} questions x "
                f"group_size={group_size}"
            )
        shown = [
            scored_response(r, thinking=self.thinking, strip_reasoning=self.strip_reasoning)
            for r in responses
        ]
        plan = comparison_plan(len(questions), group_size)
        texts = [self.judge_prompt(questions[a // group_size], shown[a], shown[b]) for a, b in plan]
        t0 = time.perf_counter()
        outputs = self.judge(texts) if texts else []
        if len(outputs) != len(texts):
            raise ValueError(f"judge returned {len(outputs)} verdicts for {len(texts)} prompts")
        verdicts = [parse_verdict(o) for o in outputs]
        decided = [v for v in verdicts if v in ("A", "B")]
        n = max(len(verdicts), 1)
        metrics = {
            "rm/comparisons": len(verdicts),
            "rm/unparseable": sum(v is None for v in verdicts),
            "rm/unparseable_frac": sum(v is None for v in verdicts) / n,
            "rm/ties_frac": sum(v == "tie" for v in verdicts) / n,
            "rm/first_wins_frac": sum(v == "A" for v in decided) / max(len(decided), 1),
            "rm/judge_s": time.perf_counter() - t0,
        }
        return win_rates(plan, verdicts, len(responses)), metrics

    def score_group_rows(
        self, records, responses, group_size, *, finished=None, response_lengths=None
    ):
        _check_rows(records, responses, group_size, finished, response_lengths)
        questions = [question_text(records[g]) for g in range(0, len(records), group_size)]
        raw, metrics = self.score_groups(questions, responses, group_size)
        return _finish(
            raw,
            responses,
            response_lengths,
            self.length_penalty,
            self.tokenizer,
            finished,
            metrics,
        )


@register_reward_model("genrm")
def build_genrm(cfg: RewardModelConfig, *, policy_config=None, policy_tokenizer=None, mesh=None):
    """A `PairwiseJudgeScorer` whose judge is the NemotronH checkpoint at `cfg.path` with its
    own tokenizer.json (the judge may differ from the policy in size and vocabulary)."""
    del policy_config, policy_tokenizer
    tok_file = Path(cfg.path) / "tokenizer.json"
    if not tok_file.exists():
        raise FileNotFoundError(f"{tok_file}: a GenRM judge checkpoint needs its tokenizer.json")
    tokenizer = Tokenizer.from_file(tok_file)
    model = load_hf_checkpoint(cfg.path, dtype=jnp.dtype(cfg.dtype), mesh=mesh)
    judge = GenerateJudge(
        model,
        tokenizer,
        max_new_tokens=cfg.judge_max_new_tokens,
        thinking=cfg.judge_thinking,
        temperature=cfg.judge_temperature,
        top_p=cfg.judge_top_p,
        seed=cfg.judge_seed,
        batch_size=cfg.batch_size,
        mesh=mesh,
    )
    return PairwiseJudgeScorer(
        judge,
        template=cfg.judge_template,
        thinking=cfg.thinking,
        strip_reasoning=cfg.strip_reasoning,
        length_penalty=LengthPenalty(cfg.length_penalty_coef, cfg.length_penalty_target),
        tokenizer=tokenizer,
    )
