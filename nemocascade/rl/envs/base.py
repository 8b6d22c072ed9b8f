"""The environment interface of multi-turn tool use, its registry, and the turn logic every
environment shares.

An episode: the driver renders `initial_messages()` with `tools` (via `render_prompt`), samples an
assistant turn, hands its text to `step`, appends the assistant message and `ToolTurn.messages`
(`tool` role) to the conversation, and samples again until `ToolTurn.done`; then `reward()`.

`Environment.step` is written once here: it parses the turn's calls (`parse_tool_calls` with the
environment's `tools`), answers each `<tool_call>` block with exactly one `tool` message in call
order, and enforces `EnvLimits`. What it never does is raise on model output: a malformed call
(unclosed tag, unknown tool, missing / mistyped parameter) is answered with the parser's
`ToolCallError` message; a call over a limit with a message naming the limit. Subclasses supply
`tools`, `initial_messages`, `_execute(call) -> str` (one well-formed call; may `_end` the
episode, e.g. `submit`), `_final_answer(text)` (a turn without calls) and `_score()`.

Episode-ending reasons: "submitted" (the answer was handed in), "no_tool_call" (a turn without
calls: the final answer), and the failures "max_turns", "max_tool_calls", "tool_crash" (the
environment itself failed executing a call), "sandbox_error" (the sandbox could not run).
A failure scores 0 whatever the state (`FAILURE_REASONS`): an episode that loops until a limit
must not be rewarded for what it left behind.
"""

from __future__ import annotations

import abc
import collections
import dataclasses
from collections.abc import Callable
from typing import ClassVar

from nemocascade.data.tools import ToolCall, ToolCallError, ToolSpec, parse_tool_calls
from nemocascade.rewards.sandbox import SandboxConfig

FAILURE_REASONS = frozenset({"max_turns", "max_tool_calls", "tool_crash", "sandbox_error"})


@dataclasses.dataclass(frozen=True)
class EnvLimits:
    max_turns: int = 8  # assistant turns per episode
    max_calls_per_turn: int = 8  # tool calls executed per turn (the rest answered with an error)
    max_tool_calls: int = 32  # per episode
    tool_timeout_s: float = 10.0  # wall time of one tool execution
    max_tool_output_chars: int = 2000  # each tool message is truncated to this (with a marker)


@dataclasses.dataclass
class ToolTurn:
    messages: list[dict]  # {"role": "tool", "content": str} per call (errors included), in order
    done: bool  # the episode is over (answer submitted, or a limit / failure)
    reason: str = ""  # why it ended when done: "submitted", "no_tool_call", "max_tool_calls", ...
    calls: int = 0  # well-formed calls executed this turn
    errors: int = 0  # malformed / unknown / failed calls this turn


class ToolError(Exception):
    """Raised by `_execute` when a well-formed call failed (a bad path, a timeout, an output
    flood): `message` is answered to the model, `kind` counted; the episode goes on."""

    def __init__(self, kind: str, message: str):
        super().__init__(message)
        self.kind = kind


class SandboxUnavailable(RuntimeError):
    """Raised by `_execute` when the sandbox could not run at all (not the model's fault): the
    episode ends with reason "sandbox_error"."""


def truncate(text: str, limit: int) -> str:
    """`text` cut to `limit` characters, the cut marked (the marker counts within `limit`)."""
    if len(text) <= limit:
        return text
    marker = f"\n...[truncated {len(text)} chars to {limit}]"
    keep = max(0, limit - len(marker))
    return (text[:keep] + marker)[:limit] if limit > 0 else ""


def user_messages(record: dict) -> list[dict]:
    """The record's opening user turn(s): `record["prompt"]` (a string), else the `user` messages
    of `record["messages"]` (the RL prompt-record form). ValueError if it has neither."""
    if isinstance(record.get("prompt"), str):
        return [{"role": "user", "content": record["prompt"]}]
    messages = record.get("messages")
    if isinstance(messages, list) and messages:
        return [dict(m) for m in messages if isinstance(m, dict) and m.get("role") == "user"]
    raise ValueError("record needs a 'prompt' string or a 'messages' list")


class Environment(abc.ABC):
    """One episode of tool use over one record. Not reusable: build one per episode."""

    name: ClassVar[str]

    def __init__(self, record: dict, limits: EnvLimits, sandbox: SandboxConfig | None = None):
        if not isinstance(record, dict):
            raise TypeError(f"record must be a dict, got {type(record).__name__}")
        self.record, self.limits = record, limits
        self.sandbox = sandbox or SandboxConfig()
        self.turns = 0  # assistant turns stepped
        self.tool_calls = 0  # well-formed calls executed in the episode
        self.done, self.reason = False, ""
        self.counters: collections.Counter[str] = collections.Counter()  # errors by kind
        self._reward: tuple[float, dict] | None = None

    # ---------------------------------------------------------------- what a subclass supplies
    @property
    @abc.abstractmethod
    def tools(self) -> list[ToolSpec]:
        """The tools declared in the system turn."""

    @abc.abstractmethod
    def initial_messages(self) -> list[dict]:
        """System (+ user) messages; tools are passed separately to `render_prompt`."""

    @abc.abstractmethod
    def _execute(self, call: ToolCall) -> str:
        """Run one well-formed call and return its result text (before truncation). May call
        `_end`; raises `ToolError` when the call failed (answered, counted) and
        `SandboxUnavailable` when the sandbox cannot run (ends the episode)."""

    def _final_answer(self, text: str) -> None:  # noqa: B027  (optional hook)
        """A turn without tool calls ended the episode; `text` is that turn."""

    @abc.abstractmethod
    def _score(self) -> tuple[float, dict]:
        """(reward in [0, 1], details) of a finished episode that did not fail."""

    def close(self) -> None:  # noqa: B027  (nothing to remove by default)
        """Remove any working directory."""

    # ---------------------------------------------------------------- shared turn logic
    def _end(self, reason: str) -> None:
        if not self.done:
            self.done, self.reason = True, reason

    def step(self, assistant_text: str) -> ToolTurn:
        """Execute the turn's tool calls and answer each with one `tool` message, in order."""
        if self.done:
            return ToolTurn([], True, self.reason)
        self.turns += 1
        calls, errors = parse_tool_calls(str(assistant_text), self.tools)
        if not calls and not errors:
            self._final_answer(str(assistant_text))
            self._end("no_tool_call")
            return ToolTurn([], True, self.reason)
        by_index: dict[int, ToolCall | list[ToolCallError]] = {c.index: c for c in calls}
        for e in errors:
            by_index.setdefault(e.index, []).append(e)  # type: ignore[union-attr]
        turn = ToolTurn([], False)
        for index in sorted(by_index):
            item = by_index[index]
            text = self._answer(item, turn)
            turn.messages.append(
                {"role": "tool", "content": truncate(text, self.limits.max_tool_output_chars)}
            )
        if not self.done and self.turns >= self.limits.max_turns:
            self._end("max_turns")
        turn.done, turn.reason = self.done, self.reason
        return turn

    def _refuse(self, turn: ToolTurn, kind: str, message: str) -> str:
        turn.errors += 1
        self.counters[kind] += 1
        return f"error: {message}"

    def _answer(self, item: ToolCall | list[ToolCallError], turn: ToolTurn) -> str:
        """The tool message for one `<tool_call>` block: its result or why it was not run."""
        if self.done:
            return self._refuse(
                turn, "after_end", f"not executed: the episode ended ({self.reason})"
            )
        if isinstance(item, list):
            for e in item:
                self.counters[e.kind] += 1
            turn.errors += 1
            return "error: " + "; ".join(e.message for e in item)
        if turn.calls >= self.limits.max_calls_per_turn:
            msg = f"not executed: over max_calls_per_turn={self.limits.max_calls_per_turn}"
            return self._refuse(turn, "max_calls_per_turn", msg)
        if self.tool_calls >= self.limits.max_tool_calls:
            self._end("max_tool_calls")
            msg = f"not executed: max_tool_calls={self.limits.max_tool_calls} reached"
            return self._refuse(turn, "max_tool_calls", msg)
        turn.calls += 1
        self.tool_calls += 1
        try:
            return self._execute(item)
        except ToolError as e:
            return self._refuse(turn, e.kind, str(e))
        except SandboxUnavailable as e:
            self._end("sandbox_error")
            return self._refuse(turn, "sandbox_error", f"the sandbox could not run: {e}")
        except Exception as e:  # the environment's own failure: end the episode, never raise
            self._end("tool_crash")
            return self._refuse(turn, "tool_crash", f"{item.name} crashed: {type(e).__name__}")

    def reward(self) -> tuple[float, dict]:
        """(reward in [0, 1], details) after the episode; 0 for a failure (`FAILURE_REASONS`) or
        an episode that never ended (cut by the driver). Computed once (scoring may run the
        hidden tests) and kept; call it before `close`."""
        if self._reward is None or not self.done:
            self._reward = self._compute_reward()
        return self._reward[0], dict(self._reward[1])

    def _compute_reward(self) -> tuple[float, dict]:
        details = {
            "env": self.name,
            "reason": self.reason or "unfinished",
            "turns": self.turns,
            "tool_calls": self.tool_calls,
            "errors": dict(self.counters),
        }
        if not self.done or self.reason in FAILURE_REASONS:
            return 0.0, details
        try:
            score, extra = self._score()
        except Exception as e:  # the scorer's own failure: a zero, named, never a crash
            return 0.0, {**details, "score_error": f"{type(e).__name__}: {e}"[:300]}
        return min(1.0, max(0.0, float(score))), {**details, **extra}

    def __enter__(self) -> Environment:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


# ------------------------------------------------------------------ registry
ENVS: dict[str, type[Environment]] = {}


def register_env(name: str) -> Callable[[type[Environment]], type[Environment]]:
    """Class decorator: register an `Environment` subclass under `name` (also sets `cls.name`)."""

    def deco(cls: type[Environment]) -> type[Environment]:
        cls.name = name
        ENVS[name] = cls
        return cls

    return deco


def make_env(
    name: str, record: dict, limits: EnvLimits | None = None, sandbox: SandboxConfig | None = None
) -> Environment:
    """A fresh environment of kind `name` for one episode over `record`."""
    if name not in ENVS:
        raise KeyError(f"unknown environment {name!r}; known: {sorted(ENVS)}")
    return ENVS[name](record, limits or EnvLimits(), sandbox)
