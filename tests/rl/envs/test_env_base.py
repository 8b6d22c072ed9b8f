"""The shared turn logic (limits, malformed calls, failures, registry) on a sandbox-free toy env."""

import pytest

from nemocascade.data.tools import ToolCall, ToolSpec, render_tool_calls
from nemocascade.rl.envs import ENVS, Environment, EnvLimits, make_env, register_env
from nemocascade.rl.envs.base import ToolError, truncate

OPEN = "<tool_call>\n<function=echo>\n"
ECHO = ToolSpec("echo", "", {"text": {"type": "string"}, "times": {"type": "integer"}}, ("text",))


class Echo(Environment):
    """Answers echo(text, times); 'boom' crashes the tool, 'fail' fails the call, 'end' submits."""

    name = "echo_test"

    @property
    def tools(self):
        return [ECHO]

    def initial_messages(self):
        return [{"role": "user", "content": "echo"}]

    def _execute(self, call: ToolCall) -> str:
        text = call.arguments["text"]
        if text == "boom":
            raise KeyError("internal")
        if text == "fail":
            raise ToolError("bad_thing", "that failed")
        if text == "end":
            self._end("submitted")
        return text * call.arguments.get("times", 1)

    def _score(self):
        if self.record.get("broken_scorer"):
            raise RuntimeError("scorer bug")
        return 1.0, {"scored": True}


def call(text, **kw):
    return {"name": "echo", "arguments": {"text": text, **kw}}


def test_calls_answered_in_order_and_truncated():
    env = Echo({}, EnvLimits(max_tool_output_chars=50))
    turn = env.step("Let me try.\n\n" + render_tool_calls([call("a"), call("xy", times=100)]))
    assert not turn.done and (turn.calls, turn.errors) == (2, 0)
    assert [m["role"] for m in turn.messages] == ["tool", "tool"]
    assert turn.messages[0]["content"] == "a"
    flood = turn.messages[1]["content"]
    assert len(flood) == 50 and "truncated 200 chars" in flood
    assert truncate("abc", 3) == "abc" and truncate("abcdef", 0) == ""


def test_turn_without_call_ends_and_scores():
    env = Echo({}, EnvLimits())
    turn = env.step("The answer is 4.")
    assert turn.done and turn.reason == "no_tool_call" and turn.messages == []
    assert env.reward() == (1.0, {**env.reward()[1], "scored": True})
    assert env.step(render_tool_calls([call("a")])).done  # stepping after the end: no-op


@pytest.mark.parametrize(
    "text, kind",
    [
        (f"{OPEN}<parameter=text>\nhi\n</parameter>\n</function>", "unclosed"),
        (render_tool_calls([{"name": "nope", "arguments": {}}]), "unknown_tool"),
        (render_tool_calls([{"name": "echo", "arguments": {}}]), "missing_parameter"),
        (render_tool_calls([call("a", times="many")]), "bad_value"),
        (f"{OPEN}<parameter=text>\nhi\n</function>\n</tool_call>", "unclosed"),
    ],
)
def test_malformed_calls_are_answered_and_counted(text, kind):
    env = Echo({}, EnvLimits())
    turn = env.step(text + "\n" + render_tool_calls([call("ok")]))
    assert not turn.done and (turn.calls, turn.errors) == (1, 1)
    assert turn.messages[0]["content"].startswith("error: ")
    assert turn.messages[1]["content"] == "ok"
    assert any(k.startswith(kind) for k in env.counters), env.counters


def test_thousand_calls_in_one_turn():
    env = Echo({}, EnvLimits(max_calls_per_turn=8, max_tool_calls=10_000))
    turn = env.step(render_tool_calls([call(str(i)) for i in range(1000)]))
    assert len(turn.messages) == 1000 and (turn.calls, turn.errors) == (8, 992)
    assert "max_calls_per_turn=8" in turn.messages[8]["content"]
    assert env.counters["max_calls_per_turn"] == 992 and not turn.done


def test_max_tool_calls_across_turns_ends_with_zero_reward():
    env = Echo({}, EnvLimits(max_turns=100, max_calls_per_turn=8, max_tool_calls=20))
    turns = [env.step(render_tool_calls([call("a")] * 8)) for _ in range(3)]
    assert [t.done for t in turns] == [False, False, True]
    assert turns[-1].reason == "max_tool_calls" and (turns[-1].calls, turns[-1].errors) == (4, 4)
    score, details = env.reward()
    assert score == 0.0 and details["reason"] == "max_tool_calls" and details["tool_calls"] == 20


def test_max_turns():
    env = Echo({}, EnvLimits(max_turns=2))
    assert not env.step(render_tool_calls([call("a")])).done
    turn = env.step(render_tool_calls([call("a")]))
    assert turn.done and turn.reason == "max_turns" and env.reward()[0] == 0.0


def test_tool_crash_and_failed_call():
    env = Echo({}, EnvLimits())
    turn = env.step(render_tool_calls([call("fail"), call("a")]))
    assert turn.messages[0]["content"] == "error: that failed" and turn.errors == 1
    assert env.counters["bad_thing"] == 1 and not turn.done
    turn = env.step(render_tool_calls([call("boom"), call("a")]))
    assert turn.done and turn.reason == "tool_crash"
    assert "echo crashed: KeyError" in turn.messages[0]["content"]
    assert "episode ended (tool_crash)" in turn.messages[1]["content"]
    assert env.reward() == (0.0, env.reward()[1]) and env.reward()[1]["reason"] == "tool_crash"


def test_submit_ends_and_later_calls_are_refused():
    env = Echo({}, EnvLimits())
    turn = env.step(render_tool_calls([call("end"), call("a")]))
    assert turn.done and turn.reason == "submitted" and turn.errors == 1
    assert env.reward()[0] == 1.0


def test_scorer_failure_is_a_named_zero():
    env = Echo({"broken_scorer": True}, EnvLimits())
    env.step("done")
    score, details = env.reward()
    assert score == 0.0 and details["score_error"] == "RuntimeError: scorer bug"


def test_unfinished_episode_scores_zero():
    env = Echo({}, EnvLimits())
    env.step(render_tool_calls([call("a")]))
    assert env.reward() == (0.0, env.reward()[1]) and env.reward()[1]["reason"] == "unfinished"


def test_registry():
    assert {"python", "code_repair", "swe"} <= set(ENVS)
    with pytest.raises(KeyError, match="unknown environment 'nope'; known: .*code_repair"):
        make_env("nope", {})
    register_env("echo_test")(Echo)
    try:
        assert isinstance(make_env("echo_test", {}), Echo)
    finally:
        ENVS.pop("echo_test")
