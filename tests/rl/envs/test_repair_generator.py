"""Synthetic repair tasks (domain `swe`): deterministic, solvable, bug not named by the prompt."""

import random
import re
import shutil

import pytest

from nemocascade.data import synthetic
from nemocascade.data.sources import validate_chat_record
from nemocascade.data.synthetic import repair
from nemocascade.data.tools import render_tool_calls
from nemocascade.rl.envs import make_env, validate_repo_record
from nemocascade.rl.envs.base import EnvLimits

needs_bwrap = pytest.mark.skipif(
    shutil.which("bwrap") is None, reason="bubblewrap (bwrap) not installed; .ci/run installs it"
)


def test_pool_is_consistent():
    repair.check_pool()  # originals pass all cases; every mutation fails its visible case


def test_deterministic_and_well_formed():
    tasks = [repair.repair_task(random.Random(seed)) for seed in range(40)]
    again = [repair.repair_task(random.Random(seed)) for seed in range(40)]
    assert tasks == again
    assert len({t.record["id"] for t in tasks}) > 30
    for t in tasks:
        validate_repo_record(t.record)
        files, bug = t.record["files"], t.bug
        assert 3 <= len(files) <= 4 and set(files) == set(t.solution)
        assert [p for p in files if files[p] != t.solution[p]] == [bug["path"]]
        assert bug["function"] not in t.record["prompt"]  # found by testing, not by reading
        assert not set(t.record["hidden_tests"]) & set(files)


def test_domain_records():
    test = synthetic.problems("swe", "test", 5)
    assert [p.prompt for p in synthetic.problems("swe", "test", 5)] == [p.prompt for p in test]
    p = test[0]
    validate_chat_record(synthetic.sft_record(p))
    rec = synthetic.prompt_record(p)
    assert rec["verifier"]["type"] == "swe" and rec["tools"]
    env = make_env("swe", rec)  # the env reads the repository out of the prompt record
    assert {t.name for t in env.tools} == {t["name"] for t in rec["tools"]}
    env.close()


def _episode(task: repair.RepairTask, fixed: bool) -> float:
    path = task.bug["path"]
    content = task.solution[path] if fixed else task.record["files"][path]
    write = {"name": "write_file", "arguments": {"path": path, "content": content}}
    with make_env("swe", task.record) as env:
        env.step(render_tool_calls([write, {"name": "submit", "arguments": {}}]))
        return env.reward()[0]


@needs_bwrap
def test_original_passes_hidden_tests_and_buggy_fails():
    for seed in range(3):
        task = repair.repair_task(random.Random(seed))
        assert _episode(task, fixed=True) == 1.0, task.bug
        assert _episode(task, fixed=False) == 0.0, task.bug


@needs_bwrap
def test_visible_tests_expose_the_bug():
    task = repair.repair_task(random.Random(7))
    with make_env("swe", task.record) as env:
        report = env.step(render_tool_calls([{"name": "run_tests", "arguments": {}}]))
        text = report.messages[0]["content"]
    assert text.startswith("exit status 1") and f"test_{task.bug['function']}" in text


def _same_run(text: str) -> str:
    return re.sub(r"Ran (\d+) tests? in [0-9.]+s", r"Ran \1 tests", text)


@needs_bwrap
def test_demonstration_is_what_the_environment_answers():
    """The swe SFT target is a real episode: replaying its calls in the environment (sandbox)
    gives the same tool messages (up to the runner's timing) and a solved repository."""
    for seed in range(3):
        task = repair.repair_task(random.Random(seed))
        demo = repair.demonstration(task)
        assert [m["role"] for m in demo] == ["assistant", "tool"] * 5 + ["assistant"]
        limits = EnvLimits(max_tool_output_chars=1 << 20)
        with make_env("swe", task.record, limits) as env:
            assert env.initial_messages()[0]["content"] == repair.SWE_SYSTEM
            for call, answer in zip(demo[0:-1:2], demo[1::2], strict=True):
                report = env.step(render_tool_calls(call["tool_calls"]))
                assert _same_run(report.messages[0]["content"]) == _same_run(answer["content"])
            env.step(render_tool_calls(demo[-1]["tool_calls"]))
            assert env.reward()[0] == 1.0


def test_domain_sft_record_is_the_multi_turn_episode():
    p = synthetic.problems("swe", "train", 2)[1]
    rec = synthetic.sft_record(p)
    validate_chat_record(rec)
    roles = [m["role"] for m in rec["messages"]]
    assert roles == ["system", "user"] + ["assistant", "tool"] * 5 + ["assistant"]
    assert rec["messages"][0]["content"] == repair.SWE_SYSTEM
    calls = [m["tool_calls"][0]["name"] for m in rec["messages"] if m["role"] == "assistant"]
    assert calls == ["run_tests", "list_files", "read_file", "write_file", "run_tests", "submit"]
    assert rec["messages"][3]["content"].startswith("exit status 1")  # the failing run
    assert rec["messages"][11]["content"].startswith("exit status 0")  # after the fix
