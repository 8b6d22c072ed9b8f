"""`python` env: sandboxed snippets (hang, flood, crash), reward through the real verifiers."""

import shutil

import pytest

from nemocascade.data.tools import render_tool_calls
from nemocascade.rewards.sandbox import SandboxConfig
from nemocascade.rl.envs import EnvLimits, make_env

needs_bwrap = pytest.mark.skipif(
    shutil.which("bwrap") is None, reason="bubblewrap (bwrap) not installed; .ci/run installs it"
)
RECORD = {"prompt": "What is 123 * 457?", "answer": "56211"}


def run(code):
    return render_tool_calls([{"name": "run_python", "arguments": {"code": code}}])


def test_initial_messages_and_tools():
    env = make_env("python", RECORD)
    msgs = env.initial_messages()
    assert [m["role"] for m in msgs] == ["system", "user"] and "run_python" in msgs[0]["content"]
    assert [t.name for t in env.tools] == ["run_python"]
    with pytest.raises(ValueError, match="answer"):
        make_env("python", {"prompt": "x"})


@needs_bwrap
def test_good_and_bad_episodes():
    env = make_env("python", RECORD)
    turn = env.step("I will compute it.\n\n" + run("print(123 * 457)"))
    assert not turn.done and turn.messages[0]["content"] == "exit status 0\nstdout:\n56211\n"
    turn = env.step("So the answer is \\boxed{56211}.")
    assert turn.done and turn.reason == "no_tool_call"
    score, details = env.reward()
    assert score == 1.0 and details["tool_calls"] == 1 and details["verifier"] == "math"

    bad = make_env("python", RECORD)
    bad.step(run("print(123 + 457)"))
    bad.step("\\boxed{580}")
    assert bad.reward()[0] == 0.0


@needs_bwrap
def test_hang_flood_and_crash_are_answered():
    limits = EnvLimits(tool_timeout_s=1.0, max_tool_output_chars=300)
    env = make_env("python", RECORD, limits)
    turn = env.step(
        render_tool_calls(
            [
                {"name": "run_python", "arguments": {"code": "while True: pass"}},
                {"name": "run_python", "arguments": {"code": "while True: print('x' * 999)"}},
                {"name": "run_python", "arguments": {"code": "raise ValueError('boom')"}},
            ]
        )
    )
    hang, flood, crash = (m["content"] for m in turn.messages)
    assert hang.startswith("error: timed out after 1s")
    assert flood.startswith("error: output over") and len(flood) == 300 and "truncated" in flood
    assert crash.startswith("exit status 1") and "ValueError: boom" in crash
    assert env.counters["timeout"] == 1 and env.counters["output_cap"] == 1
    assert (turn.calls, turn.errors, turn.done) == (3, 2, False)


def test_sandbox_unavailable_ends_the_episode(tmp_path):
    cfg = SandboxConfig(bwrap_path=str(tmp_path / "no-bwrap"), allow_weak=False)
    env = make_env("python", RECORD, EnvLimits(), cfg)
    turn = env.step(run("print(1)"))
    assert turn.done and turn.reason == "sandbox_error"
    assert turn.messages[0]["content"].startswith("error: the sandbox could not run")
    assert env.reward()[0] == 0.0


def test_other_verifiers_from_the_record():
    record = {"prompt": "Pick one.", "verifier": {"type": "mcqa", "answer": "C"}}
    env = make_env("python", record)
    env.step("The answer is (C).")
    assert env.reward()[0] == 1.0
