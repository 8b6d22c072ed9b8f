"""`code_repair` env: per-case reports that never show hidden tests, submit, reward."""

import shutil

import pytest

from nemocascade.data.tools import render_tool_calls
from nemocascade.rl.envs import EnvLimits, make_env

needs_bwrap = pytest.mark.skipif(
    shutil.which("bwrap") is None, reason="bubblewrap (bwrap) not installed; .ci/run installs it"
)
BUGGY = "def middle(xs):\n    return sorted(xs)[len(xs) // 2 - 1]\n"
FIXED = "def middle(xs):\n    return sorted(xs)[len(xs) // 2]\n"
SECRET = (
    "assert middle([9, 1, 5]) == 5\nassert middle([4]) == 4\nassert middle([3, 1, 2, 8, 7]) == 3\n"
)
RECORD = {"prompt": "Fix middle(xs): return the median.", "program": BUGGY, "tests": SECRET}


def tool(name, program):
    return render_tool_calls([{"name": name, "arguments": {"program": program}}])


def test_prompt_shows_the_program_not_the_hidden_tests():
    env = make_env("code_repair", RECORD)
    text = "\n".join(m["content"] for m in env.initial_messages())
    assert BUGGY in text and "[9, 1, 5]" not in text
    assert [t.name for t in env.tools] == ["run_tests", "submit"]


@needs_bwrap
def test_good_episode():
    env = make_env("code_repair", RECORD)
    report = env.step(tool("run_tests", BUGGY)).messages[0]["content"]
    assert report.startswith("1 test(s) passed, 2 failed") and "test 1 failed: got 1" in report
    assert "test 3 failed: got 2, compared (Eq) with 3" in report
    assert "middle(" not in report  # the hidden source is never shown
    assert env.step(tool("run_tests", FIXED)).messages[0]["content"] == "3 test(s) passed, 0 failed"
    turn = env.step(tool("submit", FIXED))
    assert turn.done and turn.reason == "submitted"
    score, details = env.reward()
    assert score == 1.0 and details["status"] == "passed"


@needs_bwrap
def test_bad_episodes():
    env = make_env("code_repair", RECORD)
    env.step(tool("submit", BUGGY))
    assert env.reward()[0] == 0.0 and env.reward()[1]["status"] in ("failed", "error")
    # a final answer without a call: its code block is the submission
    env = make_env("code_repair", RECORD)
    env.step(f"Here it is:\n```python\n{FIXED}```")
    assert env.reward()[0] == 1.0
    env = make_env("code_repair", RECORD)
    env.step("I give up.")
    assert env.reward() == (0.0, {**env.reward()[1], "status": "no_submission"})


@needs_bwrap
def test_visible_tests_are_used_by_the_tool_and_hang_is_a_timeout():
    record = {**RECORD, "visible": "assert middle([2, 1, 3]) == 2\n"}
    env = make_env("code_repair", record, EnvLimits(tool_timeout_s=1.0))
    assert "[2, 1, 3]" in env.initial_messages()[-1]["content"]
    assert env.step(tool("run_tests", FIXED)).messages[0]["content"].startswith("1 test(s) passed")
    turn = env.step(tool("run_tests", "while True:\n    pass\n"))
    assert turn.messages[0]["content"].startswith("error: 0 test(s) passed, 0 failed")
    assert "timed out after 1s" in turn.messages[0]["content"] and turn.errors == 1


@needs_bwrap
def test_program_that_fails_to_load():
    env = make_env("code_repair", RECORD)
    report = env.step(tool("run_tests", "def middle(xs)\n")).messages[0]["content"]
    assert "the program failed before any test: SyntaxError" in report
    report = env.step(tool("run_tests", "def middle(xs):\n    return xs[9]\n")).messages[0]
    assert "test 1 failed: raised IndexError: 'list index out of range'" in report["content"]


@needs_bwrap
def test_humaneval_style_tests_are_one_case():
    check = "def check(candidate):\n    assert candidate([3, 1, 2]) == 2\n"
    record = {**RECORD, "tests": check, "entry_point": "middle"}
    env = make_env("code_repair", record)
    report = env.step(tool("run_tests", BUGGY)).messages[0]["content"]
    assert report.splitlines() == [
        "0 test(s) passed, 1 failed",
        "test 1 failed: check(middle) raised AssertionError",
    ]
    assert env.step(tool("run_tests", FIXED)).messages[0]["content"] == "1 test(s) passed, 0 failed"
    env.step(tool("submit", FIXED))
    assert env.reward()[0] == 1.0
    env = make_env("code_repair", {**RECORD, "tests": "x = 1\n"})
    assert "no test cases found" in env.step(tool("run_tests", FIXED)).messages[0]["content"]
