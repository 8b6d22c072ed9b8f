"""Multi-turn trajectories as token ids: the bookkeeping of `rl.episodes` and the GRPO batch.

One trajectory is the whole conversation of an episode as one token sequence, in the order the
model saw it:

    prompt        render_prompt(initial messages, tools): system + user turns + generation prefix
    turn 1        the model's sampled tokens, its `<|im_end|>` included
    continuation  the chat template's text between that `<|im_end|>` and the model's next token:
                  `\\n<|im_start|>user\\n<tool_response>\\n...\\n</tool_response>\\n<|im_end|>\\n`
                  `<|im_start|>assistant\\n<think></think>` (`<think>\\n` in thinking mode)
    turn 2        ...

`loss_mask` is 1 exactly on the model's own sampled tokens and 0 on the prompt, the tool outputs
and the template's role tokens; `logprobs` holds the sampler's log-prob of each sampled token
(0 elsewhere). The continuation text is cut out of `data.chat.render_text` (`continuation_text`),
so the trajectory is what `render_chat(conversation, train_history=True)` renders for the same
conversation, token for token, whenever each turn's sampled tokens are the tokenizer's own
encoding of a turn text in the template's canonical form (tests/rl/test_episodes.py). Two things
make a sampled trajectory differ from a re-rendering of its decoded text, and the trajectory is
the one to train on (it is what the sampler conditioned on): a model may sample a non-canonical
tokenization of its text (e.g. "a" "b" where the tokenizer merges "ab"), and the template trims
trailing whitespace of an assistant body. Every assistant turn of a tool episode follows the last
user message, so none has its reasoning stripped and the rendering is append-only.

A turn cut by the per-turn token budget has no `<|im_end|>` of the model's: the continuation
then starts with the template's `<|im_end|>` (mask 0), so the model is never trained to have
ended a turn it did not end.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from typing import Any

import numpy as np

from nemocascade.data.chat import render_text
from nemocascade.data.tokenizer import IM_END, IM_START
from nemocascade.rl import advantages
from nemocascade.train.grpo import GRPOConfig

CUT_REASONS = ("max_turns", "max_tokens")  # an episode cut by a limit: reward 0, truncated


@dataclasses.dataclass
class Trajectory:
    """One finished episode (see the module docstring). Arrays are [T] over the conversation."""

    episode: int  # index in the `run_episodes` call (its sampling key)
    record: Any  # the prompt record the environment was built from (or None)
    ids: np.ndarray  # [T] int32: the whole conversation
    loss_mask: np.ndarray  # [T] int32: 1 on the model's sampled tokens
    logprobs: np.ndarray  # [T] fp32: sampler log-prob (sampled distribution) of model tokens
    logprobs_untempered: np.ndarray  # [T] fp32: temperature-1 log-prob of model tokens
    prompt_len: int
    messages: list[dict]  # the conversation: initial messages, assistant turns, tool results
    finish_reason: str  # "submitted", "no_tool_call", "max_turns", "max_tokens", env reasons
    reward: float  # env.reward(); 0 when cut by a limit or on an environment error
    reward_info: dict
    turns: int
    tool_calls: int
    tool_errors: int
    # [T - 1, n_moe_layers, K] int16: the experts of each position but the last in sampling
    # (`run_episodes(record_routes=True)`, routing replay); None when not recorded
    routes: np.ndarray | None = None

    @property
    def tokens(self) -> int:
        return int(self.ids.shape[0])

    @property
    def truncated(self) -> bool:
        """Cut by a limit (overlong filtering drops such rows from the loss)."""
        return self.finish_reason in CUT_REASONS

    def metrics(self) -> dict[str, Any]:
        return {
            "turns": self.turns,
            "tool_calls": self.tool_calls,
            "tool_errors": self.tool_errors,
            "reward": self.reward,
            "finish_reason": self.finish_reason,
            "tokens": self.tokens,
            "model_tokens": int(self.loss_mask.sum()),
        }


class TrajectoryBuilder:
    """The growing token sequence of one episode: template tokens (mask 0) and model tokens."""

    def __init__(self, prompt_ids: Sequence[int]):
        self.ids = [int(t) for t in prompt_ids]
        self.mask = [0] * len(self.ids)
        self.lps = [0.0] * len(self.ids)
        self.lprs = [0.0] * len(self.ids)
        self.prompt_len = len(self.ids)

    def __len__(self) -> int:
        return len(self.ids)

    def add_model(self, ids: Sequence[int], lps: Sequence[float], lprs: Sequence[float]) -> None:
        self.ids += [int(t) for t in ids]
        self.mask += [1] * len(ids)
        self.lps += [float(x) for x in lps]
        self.lprs += [float(x) for x in lprs]

    def add_template(self, ids: Sequence[int]) -> None:
        self.ids += [int(t) for t in ids]
        self.mask += [0] * len(ids)
        self.lps += [0.0] * len(ids)
        self.lprs += [0.0] * len(ids)

    def arrays(self) -> tuple[np.ndarray, ...]:
        return (
            np.asarray(self.ids, np.int32),
            np.asarray(self.mask, np.int32),
            np.asarray(self.lps, np.float32),
            np.asarray(self.lprs, np.float32),
        )


def generation_prefix_body(thinking: bool) -> str:
    """The part of the assistant body the generation prefix writes (`<think>\\n` or
    `<think></think>`): prepended to the sampled text, it gives the assistant message's content,
    which `render_chat` renders back to the same body."""
    user = [{"role": "user", "content": ""}]
    head = render_text(user, thinking=thinking)
    gen = render_text(user, thinking=thinking, add_generation_prompt=True)
    return gen[len(head) :].removeprefix(f"{IM_START}assistant\n")


def continuation_text(tool_contents: Sequence[str], *, thinking: bool, closed: bool) -> str:
    """The template text after an assistant turn's `<|im_end|>` up to the next generation prefix
    (inclusive), for the tool results `tool_contents`; with `closed=False` (the turn was cut
    before the model wrote `<|im_end|>`) the template's `<|im_end|>` comes first.

    Cut out of one rendering of a stub conversation, so it is exactly the template's text: the
    tool block and the prefix do not depend on what came before (the rendering is append-only
    after the last user message)."""
    stub = [{"role": "user", "content": ""}, {"role": "assistant", "content": ""}]
    head = render_text(stub, thinking=thinking)  # ends with "<|im_end|>\n"
    tools = [{"role": "tool", "content": c} for c in tool_contents]
    full = render_text(stub + tools, thinking=thinking, add_generation_prompt=True)
    if not (full.startswith(head) and head.endswith(IM_END + "\n")):
        raise AssertionError("chat template: a tool turn does not append to the conversation")
    text = full[len(head) - 1 :]  # from the "\n" after the assistant's <|im_end|>
    return text if closed else IM_END + text


def continuation_ids(
    tokenizer, tool_contents: Sequence[str], *, thinking: bool, closed: bool
) -> list[int]:
    """`continuation_text` as token ids. It starts after a special token (`<|im_end|>`) and ends
    with one (`<think></think>`) or a newline, so encoding it alone gives the ids the whole
    conversation's encoding has there."""
    return tokenizer.encode(continuation_text(tool_contents, thinking=thinking, closed=closed))


# ============================================================================ the GRPO batch
def trajectories_to_batch(
    trajs: Sequence[Trajectory],
    *,
    group_size: int,
    cfg: GRPOConfig,
    seq_len: int | None = None,
    seq_multiple: int = 16,
    num_rows: int | None = None,
    pad_id: int = 0,
) -> tuple[dict[str, np.ndarray], dict[str, Any]]:
    """The batch `train.grpo.grpo_train_step` consumes, one row per trajectory (rows
    prompt-major: groups of `group_size` consecutive episodes of one record).

        input_ids [B, T] = ids[:-1]     targets [B, T] = ids[1:]     segment_ids 1 on real tokens
        loss_mask [B, T] = trajectory loss_mask[1:] (a target is a model token) x sample weight
        sampler_logprobs [B, T] = the sampler's log-prob of each model target (0 elsewhere)
        advantages [B]   GRPO advantages per trajectory (`cfg.advantage_estimator`)
        routes [B, T, n_moe, K]  with recorded routes: each input position's experts (-1 on
                                 padding), replayed by the policy's forward

    The advantages come from `rl.advantages.prepare_advantages` over each group's rewards;
    groups dynamic filtering drops and truncated episodes under overlong filtering (cut by a
    limit: they stay in their group's baseline) get loss_mask 0, keeping the batch's shape. The
    step is the single-turn one unchanged: a trajectory is a row whose response is interleaved
    with masked tool and template tokens, which the loss never sees (loss_mask 0) but the
    model's forward does (they are context). Length: `seq_len`, or the longest row rounded up
    to a multiple of `seq_multiple`; `num_rows` pads with empty rows (loss_mask 0).
    Returns (batch, info: advantages, keep, sample_weight, filtered_fraction)."""
    if not trajs or len(trajs) % group_size:
        raise ValueError(
            f"trajectories_to_batch: {len(trajs)} trajectories do not split into groups of "
            f"{group_size}"
        )
    rewards = np.asarray([t.reward for t in trajs], np.float32)
    truncated = np.asarray([t.truncated for t in trajs], bool)
    prep = advantages.prepare_advantages(rewards, group_size, cfg, truncated=truncated)
    weight = np.asarray(prep["sample_weight"], np.float32) * np.asarray(prep["keep"], np.float32)
    longest = max(t.tokens - 1 for t in trajs)
    if seq_len is None:
        seq_len = -(-longest // seq_multiple) * seq_multiple
    if longest > seq_len:
        raise ValueError(f"trajectories_to_batch: a row of {longest} does not fit {seq_len}")
    rows = len(trajs) if num_rows is None else int(num_rows)
    if rows < len(trajs):
        raise ValueError(f"trajectories_to_batch: {len(trajs)} trajectories > num_rows={rows}")
    batch = {
        "input_ids": np.full((rows, seq_len), pad_id, np.int32),
        "targets": np.full((rows, seq_len), pad_id, np.int32),
        "loss_mask": np.zeros((rows, seq_len), np.float32),
        "segment_ids": np.zeros((rows, seq_len), np.int32),
        "sampler_logprobs": np.zeros((rows, seq_len), np.float32),
        "advantages": np.zeros((rows,), np.float32),
    }
    for i, t in enumerate(trajs):
        n = t.tokens - 1
        batch["input_ids"][i, :n] = t.ids[:-1]
        batch["targets"][i, :n] = t.ids[1:]
        batch["segment_ids"][i, :n] = 1
        batch["loss_mask"][i, :n] = t.loss_mask[1:] * weight[i]
        batch["sampler_logprobs"][i, :n] = t.logprobs[1:]
    batch["advantages"][: len(trajs)] = np.asarray(prep["advantages"], np.float32)
    if all(t.routes is not None for t in trajs):
        batch["routes"] = np.full((rows, seq_len) + trajs[0].routes.shape[1:], -1, np.int32)
        for i, t in enumerate(trajs):
            batch["routes"][i, : t.tokens - 1] = t.routes
    return batch, prep
