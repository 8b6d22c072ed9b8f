"""The reward cache keeps verdicts (right or wrong) and never a grader error."""

import numpy as np

from nemocascade.rewards import RewardCache, register
from nemocascade.rewards import sandbox as sandbox_lib

MATH = {"verifier": {"type": "math", "answer": "4"}}
CODE = {"verifier": {"type": "code", "tests": "assert f(1) == 2"}}
FLAKY = {"verifier": {"type": "test_flaky"}}
_CALLS = []


@register("test_flaky")
def _flaky_reward(record, response, finished):
    """Raises on its first call (a grader failure), answers 1 afterwards."""
    _CALLS.append(response)
    if len(_CALLS) == 1:
        raise RuntimeError("transient grader failure")
    return 1.0, {}


def _score(cache, recs, resps, **kw):
    return cache.score(recs, resps, [True] * len(recs), num_workers=0, timeout_s=30, **kw)


def test_errors_are_reported_and_rescored_wrong_answers_are_cached():
    _CALLS.clear()
    cache = RewardCache()
    scores, errors, m = _score(cache, [FLAKY, MATH, MATH], ["x", "\\boxed{5}", "\\boxed{5}"])
    np.testing.assert_array_equal(scores, [0.0, 0.0, 0.0])
    np.testing.assert_array_equal(errors, [True, False, False])
    assert m["scored"] == 2 and m["reused"] == 1 and m["errors"] == 1
    assert m["rewards/errors/kind/exception"] == 1 and len(cache) == 1  # the wrong answer only
    scores, errors, m = _score(cache, [FLAKY, MATH], ["x", "\\boxed{5}"])
    np.testing.assert_array_equal(scores, [1.0, 0.0])  # the errored item was scored again
    np.testing.assert_array_equal(errors, [False, False])
    assert m["scored"] == 1 and m["reused"] == 1 and len(_CALLS) == 2
    res = _score(cache, [FLAKY], ["x"])  # a verdict now: cached
    assert res.scores[0] == 1.0 and res.metrics["reused"] == 1 and len(_CALLS) == 2


def test_sandbox_that_cannot_start_is_never_cached(monkeypatch):
    monkeypatch.setattr(sandbox_lib.shutil, "which", lambda name: None)  # no bwrap
    monkeypatch.delenv(sandbox_lib.WEAK_SANDBOX_ENV, raising=False)
    cache = RewardCache()
    program = "```python\ndef f(x):\n    return x + 1\n```"
    for _ in range(2):
        scores, errors, m = _score(cache, [CODE], [program])
        assert scores[0] == 0.0 and errors[0] and m["scored"] == 1
        assert m["rewards/errors/kind/sandbox_error"] == 1
    assert len(cache) == 0


def test_thinking_flag_is_part_of_the_key():
    cache = RewardCache()
    hack = "let me think... \\boxed{4}"
    assert _score(cache, [MATH], [hack]).scores[0] == 1.0
    res = _score(cache, [MATH], [hack], thinking=True)
    assert res.scores[0] == 0.0 and res.metrics["scored"] == 1
    assert _score(cache, [MATH], [hack]).metrics["reused"] == 1
    assert RewardCache.key(MATH, hack, True) != RewardCache.key(MATH, hack, True, True)


def test_reused_scores_survive_a_full_cache():
    cache = RewardCache(max_items=1)
    _score(cache, [MATH, MATH], ["\\boxed{4}", "\\boxed{3}"])
    scores, errors, m = _score(cache, [MATH, MATH], ["\\boxed{4}", "\\boxed{2}"])
    np.testing.assert_array_equal(scores, [1.0, 0.0])
    assert m["reused"] == 1 and not errors.any()
