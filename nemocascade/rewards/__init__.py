"""Verifiable rewards for Cascade RL: math, multiple choice, code (sandboxed), instruction
following, structured output (JSON Schema).

Record schema (one dict per prompt; `prompt` and `domain` are optional for scoring):

    {"prompt": ..., "domain": "math",
     "verifier": {"type": "math", "answer": "42",          # "... #### 42" also accepted
                  "styles": ["boxed", "hash", "answer_is"]}} # optional extraction order
    {"verifier": {"type": "mcqa", "answer": "B"}}
    {"verifier": {"type": "code", "tests": "assert f(1) == 2",  # or defines check(candidate)
                  "entry_point": "f",                          # optional, for check()
                  "strict_compare": True,                      # optional, see harness.py
                  "timeout_s": 10.0}}                          # optional, whole run
    {"verifier": {"type": "code_io", "cases": [{"input": "1 2\\n", "output": "3\\n"}],
                  "time_limit_s": 2.0}}                        # optional, per case
    {"verifier": {"type": "instruction", "instruction_id_list": ["punctuation:no_comma"],
                  "kwargs": [{}], "partial": False}}           # partial: score = fraction met
    {"verifier": {"type": "structured_output",                 # alias json_schema
                  "schema": {"type": "object", "required": ["name"]}}}  # subset: structured.py

Without `verifier.type`, `domain` picks the verifier (aliases: math_rl, stem_mcqa, code_stdio,
if / ifeval / instruction_following, json_schema). Code responses are judged by their last
```python block.

Entry points:
  * `score_one(record, response, finished, *, thinking=False) -> (score, details)`; with
    `thinking=True` (the prompt ended with `<think>\\n`) a response that never closes its
    reasoning has no final answer and scores 0. Raises what the verifier raises.
  * `grade_batch(records, responses, finished, *, num_workers, timeout_s, thinking) ->
    ScoredBatch(scores, errors, details, metrics)`: `errors[i]` marks a grader failure (timeout,
    sandbox that did not start, verifier exception, bad record, unsupported instruction; the kind
    is in `details[i]["error_kind"]`, one of `ERROR_KINDS`), never to be read as a wrong answer.
    `score_batch(...)` is the same as a (scores, details, metrics) tuple.
  * `RewardCache().score(...) -> (scores, errors, metrics)`: memoised verdicts, errors never kept.
  * `get_verifier(name)`, `has_verifier(name)`, `register(name, fn)` for new reward functions
    `fn(record, response, finished) -> (score, details)`; a function that cannot judge raises a
    `VerifierError` subclass (`BadRecordError`, `UnsupportedError`, `SandboxError`).
  * `sandbox.sandbox_status()`: can code rewards run here, and if not, the fix.
"""

from nemocascade.rewards import hidden_rule as _hidden_rule  # noqa: F401  (registers it)
from nemocascade.rewards import verifiers as _builtin  # noqa: F401  (registers the built-ins)
from nemocascade.rewards.batch import ERROR_KINDS, ScoredBatch, grade_batch, score_batch
from nemocascade.rewards.registry import (
    BadRecordError,
    SandboxError,
    UnsupportedError,
    VerifierError,
    final_answer,
    get_verifier,
    has_verifier,
    register,
    score_one,
    verifier_name,
)

__all__ = [
    "ERROR_KINDS",
    "BadRecordError",
    "CachedScores",
    "RewardCache",
    "SandboxError",
    "ScoredBatch",
    "UnsupportedError",
    "VerifierError",
    "final_answer",
    "get_verifier",
    "grade_batch",
    "has_verifier",
    "register",
    "score_batch",
    "score_one",
    "verifier_name",
]


def __getattr__(name: str):
    """`RewardCache` / `CachedScores` are imported on first use: they need numpy, which the
    reward worker processes (which import this package) should not pay for at start-up."""
    if name in ("RewardCache", "CachedScores"):
        from nemocascade.rewards import cache

        return getattr(cache, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
