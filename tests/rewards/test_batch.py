"""Registry, shared rules and the parallel batch scorer."""

import shutil

import pytest

from nemocascade import rewards
from nemocascade.rewards import final_answer, get_verifier, register, score_batch, score_one

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
    assert metrics["rewards/count"] == 12 and metrics["rewards/errors"] == 3
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
    scores, details, metrics = score_batch(recs, resps, None, num_workers=2, timeout_s=1.5)
    assert scores == [0.0, 1.0, 0.0, 1.0]
    assert details[0]["timeout"] and details[2]["timeout"]
    assert metrics["rewards/timeouts"] == 2 and metrics["rewards/errors"] == 0
    assert metrics["rewards/wall_s"] < 10


def test_score_batch_bad_lengths_and_empty():
    with pytest.raises(ValueError, match="2 records, 1 responses"):
        score_batch([MATH, MATH], ["x"])
    scores, _, metrics = score_batch([], [], [], num_workers=2)
    assert scores == [] and metrics["rewards/count"] == 0
