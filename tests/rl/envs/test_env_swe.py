"""`swe` env: tools on a private working directory, confinement, hidden scoring, JSONL records."""

import json
import os
import shutil

import pytest

from nemocascade.data.sources import DataError
from nemocascade.data.tools import render_tool_calls
from nemocascade.rl.envs import EnvLimits, make_env, read_repo_jsonl
from nemocascade.rl.envs.repo import WorkDir, check_path

needs_bwrap = pytest.mark.skipif(
    shutil.which("bwrap") is None, reason="bubblewrap (bwrap) not installed; .ci/run installs it"
)
TEST = """import unittest
from calc.ops import add


class T(unittest.TestCase):
    def test_add(self):
        self.assertEqual(add(2, 3), 5)
"""
HIDDEN = TEST.replace("class T", "class H").replace("add(2, 3), 5", "add(-2, 3), 1")
RECORD = {
    "id": "calc-1",
    "prompt": "A test fails in this repository; find and fix the bug.",
    "files": {
        "calc/__init__.py": "",
        "calc/ops.py": "def add(a, b):\n    return a - b\n",
        "tests/test_ops.py": TEST,
    },
    "hidden_tests": {"tests/test_hidden.py": HIDDEN},
    "test_command": "python -m unittest discover -s tests",
}
FIX = "def add(a, b):\n    return a + b\n"


def calls(*items):
    return render_tool_calls([{"name": n, "arguments": a} for n, a in items])


@needs_bwrap
def test_good_episode_and_hidden_tests_stay_hidden():
    with make_env("swe", RECORD) as env:
        assert [m["role"] for m in env.initial_messages()] == ["system", "user"]
        turn = env.step(calls(("list_files", {}), ("read_file", {"path": "calc/ops.py"})))
        assert turn.messages[0]["content"] == "calc/__init__.py\ncalc/ops.py\ntests/test_ops.py"
        assert turn.messages[1]["content"] == RECORD["files"]["calc/ops.py"]
        report = env.step(calls(("run_tests", {}))).messages[0]["content"]
        assert report.startswith("exit status 1") and "AssertionError: -1 != 5" in report
        assert "test_hidden" not in report
        env.step(calls(("write_file", {"path": "calc/ops.py", "content": FIX})))
        assert env.step(calls(("run_tests", {}))).messages[0]["content"].startswith("exit status 0")
        turn = env.step(calls(("submit", {})))
        assert turn.done and turn.reason == "submitted"
        score, details = env.reward()
        assert score == 1.0 and details["status"] == "passed"
        root = env.workdir.root
        assert not os.path.exists(os.path.join(root, "tests", "test_hidden.py"))
    assert not os.path.exists(root)  # close() removed the working directory


@needs_bwrap
def test_bad_episodes():
    env = make_env("swe", RECORD)
    env.step(calls(("submit", {})))
    assert env.reward()[0] == 0.0 and env.reward()[1]["status"] == "failed"
    env.close()
    # passes the visible test only: the hidden one catches it
    env = make_env("swe", RECORD)
    cheat = "def add(a, b):\n    return 5\n"
    env.step(calls(("write_file", {"path": "calc/ops.py", "content": cheat})))
    env.step("Done.")  # a final answer ends the episode; the repository is scored as it is
    assert env.reason == "no_tool_call" and env.reward()[0] == 0.0
    env.close()


@needs_bwrap
def test_uncollectable_repository_scores_zero_with_reason():
    env = make_env("swe", RECORD)
    env.step(calls(("write_file", {"path": "calc/ops.py", "content": "def add(a, b)\n"})))
    assert "SyntaxError" in env.step(calls(("run_tests", {}))).messages[0]["content"]
    env.step(calls(("submit", {})))
    score, details = env.reward()
    assert score == 0.0 and details["status"] == "collection_error"
    assert "SyntaxError" in details["detail"]
    env.close()


@needs_bwrap
def test_hanging_and_flooding_tests_and_runner_shadowing():
    env = make_env("swe", RECORD, EnvLimits(tool_timeout_s=1.5))
    hang = "import time\n\ndef add(a, b):\n    while True:\n        time.sleep(0.1)\n"
    env.step(calls(("write_file", {"path": "calc/ops.py", "content": hang})))
    report = env.step(calls(("run_tests", {}))).messages[0]["content"]
    assert report.startswith("error: timed out after 1.5s") and env.counters["timeout"] == 1
    flood = "def add(a, b):\n    while True:\n        print('x' * 4096)\n"
    env.step(calls(("write_file", {"path": "calc/ops.py", "content": flood})))
    turn = env.step(calls(("run_tests", {})))
    assert turn.messages[0]["content"].startswith("error: output over") and turn.errors == 1
    assert len(turn.messages[0]["content"]) <= EnvLimits().max_tool_output_chars
    # a repository file cannot replace the test runner, nor exit early to fake a pass
    env.step(calls(("write_file", {"path": "unittest.py", "content": "raise SystemExit(0)\n"})))
    env.step(calls(("write_file", {"path": "calc/ops.py", "content": "import os\nos._exit(0)\n"})))
    env.step(calls(("submit", {})))
    assert env.reward()[0] == 0.0
    env.close()


def test_path_confinement(tmp_path):
    env = make_env("swe", RECORD)
    outside = tmp_path / "secret.txt"
    outside.write_text("secret")
    os.symlink(tmp_path, os.path.join(env.workdir.root, "link"))
    os.symlink(outside, os.path.join(env.workdir.root, "calc", "leak.py"))
    bad = ["../x", "/etc/passwd", "calc/../../x", "link/secret.txt", "calc/leak.py", "", "a//b"]
    turn = env.step(calls(*[("read_file", {"path": p}) for p in bad]))
    assert all(m["content"].startswith("error: ") for m in turn.messages), turn.messages
    assert turn.errors == len(bad) and not any("secret" == m["content"] for m in turn.messages)
    turn = env.step(calls(("write_file", {"path": "link/new.py", "content": "x"})))
    assert "leaves the repository" in turn.messages[0]["content"]
    assert not (tmp_path / "new.py").exists()
    assert "leak.py" not in env.step(calls(("list_files", {}))).messages[0]["content"]
    assert "link/" not in env.step(calls(("list_files", {}))).messages[0]["content"]
    env.close()
    for p in ("a/./b", "a\\b", "/a"):
        with pytest.raises(ValueError):
            check_path(p)
    wd = WorkDir({"a/b.py": "x"})
    with pytest.raises(ValueError, match="over"):
        wd.write("big.py", "x" * 300_000)
    wd.remove()


def test_bad_records():
    for key, value in [("files", {}), ("files", {"../x": ""}), ("test_command", "pytest -q")]:
        with pytest.raises(ValueError, match=key):
            make_env("swe", {**RECORD, key: value})


def test_jsonl_file_line_errors(tmp_path):
    path = tmp_path / "repos.jsonl"
    good = json.dumps(RECORD)
    path.write_text(good + "\n\n" + good + "\n")
    records, skipped = read_repo_jsonl(path)
    assert len(records) == 2 and skipped == 0
    bad = {**RECORD, "hidden_tests": {"/abs.py": ""}}
    path.write_text(good + "\n" + json.dumps(bad) + "\n")
    with pytest.raises(DataError, match=r"repos.jsonl:2: field 'hidden_tests': .*absolute"):
        read_repo_jsonl(path)
    path.write_text(good + "\n{not json\n")
    with pytest.raises(DataError, match=r"repos.jsonl:2:2: invalid JSON"):
        read_repo_jsonl(path)
    path.write_text(json.dumps({**RECORD, "files": {"a.py": 3}}) + "\n" + good + "\n")
    with pytest.raises(DataError, match=r"repos.jsonl:1: field \"files\['a.py'\]\""):
        read_repo_jsonl(path)
    records, skipped = read_repo_jsonl(path, skip_bad=True)
    assert len(records) == 1 and skipped.bad == 1
