"""Verifiable rewards for Cascade RL: math, multiple choice, code (sandboxed), instruction
following.

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

Without `verifier.type`, `domain` picks the verifier (aliases: math_rl, stem_mcqa, code_stdio,
if / ifeval / instruction_following). Code responses are judged by their last ```python block.

Entry points: `score_batch(records, responses, finished, *, num_workers, timeout_s)` ->
(scores, details, metrics); `score_one(record, response, finished)`; `get_verifier(name)`;
`register(name, fn)` for new reward functions `fn(record, response, finished) -> (score, details)`.
"""

from nemocascade.rewards import verifiers as _builtin  # noqa: F401  (registers the built-ins)
from nemocascade.rewards.batch import score_batch
from nemocascade.rewards.registry import (
    final_answer,
    get_verifier,
    register,
    score_one,
    verifier_name,
)

__all__ = ["final_answer", "get_verifier", "register", "score_batch", "score_one", "verifier_name"]
