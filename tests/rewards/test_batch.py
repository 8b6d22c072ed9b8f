"""Registry, shared rules and the parallel batch scorer, with grader errors kept apart from wrong
answers."""

import os
import shutil

import pytest

from nemocascade import rewards
from nemocascade.rewards import (
    final_answer,
    get_verifier,
    grade_batch,
    has_verifier,
    register,
    score_batch,
    score_one,
)
from nemocascade.rewards import sandbox as sandbox_lib

needs_bwrap = pytest.mark.skipif(
    shutil.which("bwrap") is None, reason="bubblewrap (bwrap) not installed; .ci/run installs it"
)

MATH = {"prompt": "2+2?", "domain": "math", "verifier": {"type": "math", "answer": "4"}}
GSM = {"verifier": {"type": "math", "answer": "Half of 8 is 4.\n#### 4"}}
MCQA = {"verifier": {"type": "mcqa", "answer": "B"}}
CODE = {"verifier": {"type": "code", "tests": "assert f(1) == 2", "timeout_s": 10}}
CODE_IO = {"verifier": {"type": "code_io", "cases": [{"input": "1 2\n", "output": "3\n"}]}}
IF = {
    "verifier": {
        "type": "instruction",
        "instruction_id_list": ["punctuation:no_comma", "change_case:english_lowercase"],
        "kwargs": [{}, {}],
    }
}
IF_PARTIAL = {"verifier": {**IF["verifier"], "partial": True}}


def test_final_answer():
    assert final_answer("<think>the answer is 3</think>The answer is 4") == "The answer is 4"
    assert final_answer("reasoning</think>\n\\boxed{4}") == "\n\\boxed{4}"
    assert final_answer("<think>never closed \\boxed{4}") == ""
    assert final_answer("plain \\boxed{4}") == "plain \\boxed{4}"


def test_final_answer_thinking_mode():
    # The prompt opened the reasoning: without </think> there is no final answer.
    assert final_answer("let me think... \\boxed{4}", thinking=True) == ""
    assert final_answer("let me think... \\boxed{4}") == "let me think... \\boxed{4}"
    assert final_answer("hmm</think>\\boxed{4}", thinking=True) == "\\boxed{4}"


def test_score_one_thinking_mode():
    hack = "let me think... the answer is \\boxed{4}"
    assert score_one(MATH, hack, True)[0] == 1.0
    score, det = score_one(MATH, hack, True, thinking=True)
    assert score == 0.0 and det["no_final_answer"]
    closed = "2 and 2 make 4</think>\\boxed{4}"
    assert score_one(MATH, closed, True)[0] == 1.0
    assert score_one(MATH, closed, True, thinking=True)[0] == 1.0
    assert score_one(MCQA, "so B</think>Answer: B", True, thinking=True)[0] == 1.0
    assert score_one(MCQA, "Answer: B", True, thinking=True)[0] == 0.0
    # The flag reaches the batch scorer, as a verdict (status ok), not an error.
    res = grade_batch([MATH, MATH], [hack, closed], num_workers=0, thinking=True)
    assert res.scores == [0.0, 1.0] and res.errors == [False, False]
    assert score_batch([MATH], [hack], num_workers=0)[0] == [1.0]
    assert score_batch([MATH], [hack], num_workers=0, thinking=True)[0] == [0.0]


def test_score_one_rules():
    assert score_one(MATH, "<think>maybe 5</think>\\boxed{4}", True)[0] == 1.0
    assert score_one(MATH, "<think>\\boxed{4}</think>\\boxed{5}", True)[0] == 0.0
    assert score_one(MATH, "<think>\\boxed{4} ... cut", True)[0] == 0.0  # thinking never closed
    score, det = score_one(MATH, "\\boxed{4}", False)  # truncated: no EOS
    assert score == 0.0 and det["truncated"]
    assert score_one(GSM, "#### 4", True)[0] == 1.0
    assert score_one({"domain": "math", "verifier": {"answer": "4"}}, "\\boxed{4}", True)[0] == 1.0
    assert score_one(MCQA, "Answer: B", True)[0] == 1.0
    assert score_one(MCQA, "Answer: C", True)[0] == 0.0
    assert score_one(IF, "all fine here", True)[0] == 1.0
    assert score_one(IF, "Not, fine", True)[0] == 0.0
    assert score_one(IF_PARTIAL, "not, fine", True)[0] == 0.5


def test_registry():
    assert get_verifier("math") is get_verifier("math_rl")
    assert get_verifier("ifeval") is get_verifier("instruction")
    with pytest.raises(KeyError, match="no verifier named 'nope'"):
        get_verifier("nope")

    @register("test_length", aliases=("test_len",))
    def length_reward(record, response, finished):
        return len(response) / record["verifier"]["max"], {"n": len(response)}

    rec = {"verifier": {"type": "test_len", "max": 4}}
    assert score_one(rec, "ab", True) == (0.5, {"verifier": "test_len", "truncated": False, "n": 2})
    assert score_one(rec, "abcdefgh", True)[0] == 1.0  # clamped to [0, 1]
    assert rewards.get_verifier("test_length") is length_reward
    assert has_verifier("test_length") and has_verifier("test_len") and has_verifier("math_rl")
    assert has_verifier("structured_output") and has_verifier("json_schema")
    assert not has_verifier("nope")


@needs_bwrap
def test_score_batch_mixed_in_workers():
    recs = [
        MATH,
        MATH,
        GSM,
        MCQA,
        CODE,
        CODE,
        CODE_IO,
        IF,
        {"verifier": {"type": "nope"}},
        {"prompt": "no verifier"},
        {"verifier": {"type": "math"}},
        MATH,
    ]
    resps = [
        "\\boxed{4}",
        "\\boxed{5}",
        "So #### 4",
        "Answer: B",
        "```python\ndef f(x):\n    return x + 1\n```",
        "```python\nimport os\nos._exit(0)\n```",
        "```python\na, b = map(int, input().split())\nprint(a + b)\n```",
        "ok then",
        "x",
        "x",
        "\\boxed{4}",
        "\\boxed{4}",
    ]
    finished = [True] * 11 + [False]
    scores, details, metrics = score_batch(recs, resps, finished, num_workers=2, timeout_s=30)
    assert scores == [1, 0, 1, 1, 1, 0, 1, 1, 0, 0, 0, 0]
    assert details[5]["status"] == "failed"
    assert "KeyError" in details[8]["error"] and "ValueError" in details[9]["error"]
    assert "lacks key 'answer'" in details[10]["error"]
    assert [d["reward_status"] for d in details] == ["ok"] * 8 + ["error"] * 3 + ["ok"]
    assert [d.get("error_kind") for d in details[8:11]] == ["bad_record"] * 3
    assert metrics["rewards/count"] == 12 and metrics["rewards/errors"] == 3
    assert metrics["rewards/errors/kind/bad_record"] == 3
    assert metrics["rewards/mean_ok"] == pytest.approx(6 / 9)
    assert metrics["rewards/truncated"] == 1 and metrics["rewards/timeouts"] == 0
    assert metrics["rewards/mean"] == pytest.approx(6 / 12)
    assert metrics["rewards/mean/code"] == pytest.approx(0.5)
    inline = score_batch(recs, resps, finished, num_workers=0)
    assert inline[0] == scores and inline[2]["rewards/errors"] == 3


@needs_bwrap
def test_score_batch_timeout_kills_item_not_batch():
    slow = {"verifier": {"type": "code", "tests": "assert True", "timeout_s": 60}}
    recs = [slow, MATH, slow, MATH]
    resps = ["```python\nwhile True:\n    pass\n```", "\\boxed{4}"] * 2
    res = grade_batch(recs, resps, None, num_workers=2, timeout_s=1.5)
    assert res.scores == [0.0, 1.0, 0.0, 1.0]
    # The grader gave up: an error (no verdict), not a wrong answer.
    assert res.errors == [True, False, True, False]
    assert res.status == ["error", "ok", "error", "ok"]
    assert res.error_kinds == ["timeout", None, "timeout", None]
    assert res.details[0]["timeout"] and res.details[2]["timeout"]
    m = res.metrics
    assert m["rewards/timeouts"] == 2 and m["rewards/errors"] == 2
    assert m["rewards/errors/kind/timeout"] == 2 and m["rewards/errors/kind/exception"] == 0
    assert m["rewards/errors/verifier/code"] == 2 and m["rewards/errors/verifier/math"] == 0
    assert m["rewards/wall_s"] < 10


@needs_bwrap
def test_program_past_its_own_time_limit_is_a_wrong_answer():
    slow = {"verifier": {"type": "code", "tests": "assert True", "timeout_s": 1.0}}
    res = grade_batch([slow], ["```python\nwhile True:\n    pass\n```"], timeout_s=30)
    assert res.scores == [0.0] and res.errors == [False]
    assert res.details[0]["status"] == "timeout" and res.details[0]["reward_status"] == "ok"


class _ExitOnUnpickle:
    """Unpickling this in a worker ends the worker process (a stand-in for a crash)."""

    def __reduce__(self):
        return (os._exit, (3,))


@register("test_raises")
def _raising_reward(record, response, finished):
    raise RuntimeError("verifier bug")


def test_grader_errors_are_not_wrong_answers(monkeypatch):
    monkeypatch.setattr(sandbox_lib.shutil, "which", lambda name: None)  # no bwrap here
    monkeypatch.delenv(sandbox_lib.WEAK_SANDBOX_ENV, raising=False)
    unsupported = {
        "verifier": {"type": "instruction", "instruction_id_list": ["made:up"], "kwargs": [{}]}
    }
    bad_kwargs = {
        "verifier": {
            "type": "instruction",
            "instruction_id_list": ["length_constraints:number_words"],
            "kwargs": [{"num_words": "three", "relation": "at least"}],
        }
    }
    recs = [MATH, MATH, {"verifier": {"type": "test_raises"}}, CODE, unsupported, bad_kwargs]
    recs += [{"verifier": {"type": "math"}}, {"prompt": "no verifier"}, MATH]
    code_ok = "```python\ndef f(x):\n    return x + 1\n```"
    resps = ["\\boxed{4}", "\\boxed{5}", "x", code_ok, "x", "x", "\\boxed{4}", "x", "cut"]
    finished = [True] * 8 + [False]
    res = grade_batch(recs, resps, finished, num_workers=0)
    assert res.scores == [1.0] + [0.0] * 8
    assert res.errors == [False, False, True, True, True, True, True, True, False]
    kinds = ["exception", "sandbox_error", "unsupported", "bad_record", "bad_record", "bad_record"]
    assert res.error_kinds == [None, None, *kinds, None]
    assert "RuntimeError: verifier bug" in res.details[2]["error"]
    assert "bwrap" in res.details[3]["error"]
    assert "'length_constraints:number_words'" in res.details[5]["error"]
    assert "num_words" in res.details[5]["error"]
    m = res.metrics
    assert m["rewards/errors"] == 6 and m["rewards/timeouts"] == 0
    assert m["rewards/errors/kind/exception"] == 1 and m["rewards/errors/kind/sandbox_error"] == 1
    assert m["rewards/errors/kind/unsupported"] == 1 and m["rewards/errors/kind/bad_record"] == 3
    assert m["rewards/errors/kind/worker_died"] == 0
    assert m["rewards/errors/verifier/math"] == 1 and m["rewards/errors/verifier/code"] == 1
    assert m["rewards/errors/verifier/instruction"] == 2
    assert m["rewards/errors/verifier/invalid"] == 1
    assert m["rewards/mean_ok"] == pytest.approx(1 / 3)
    # The older 3-tuple carries the same status in the details.
    _, details, metrics = score_batch(recs, resps, finished, num_workers=0)
    assert [d["reward_status"] for d in details] == res.status
    assert metrics["rewards/errors"] == 6


def test_dead_worker_and_unpicklable_record_are_errors():
    dies = {"verifier": {"type": "math", "answer": _ExitOnUnpickle()}}
    unpicklable = {"verifier": {"type": "math", "answer": lambda: 4}}
    recs = [dies, MATH, unpicklable, MATH]
    res = grade_batch(recs, ["\\boxed{4}"] * 4, num_workers=1, timeout_s=30)
    assert res.scores == [0.0, 1.0, 0.0, 1.0]
    assert res.error_kinds == ["worker_died", None, "bad_record", None]
    assert res.metrics["rewards/errors/kind/worker_died"] == 1


def test_score_batch_bad_lengths_and_empty():
    with pytest.raises(ValueError, match="2 records, 1 responses"):
        score_batch([MATH, MATH], ["x"])
    scores, _, metrics = score_batch([], [], [], num_workers=2)
    assert scores == [] and metrics["rewards/count"] == 0
