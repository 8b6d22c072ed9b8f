"""Code verifiers on tasks of our own, in both test styles, and the sandbox's refusal modes."""

import logging
import shutil
import struct

import pytest

from nemocascade.rewards import code as code_lib
from nemocascade.rewards import sandbox, seccomp
from nemocascade.rewards.code import normalize_output, run_io_tests, run_tests
from nemocascade.rewards.verifiers import extract_code

needs_bwrap = pytest.mark.skipif(
    shutil.which("bwrap") is None, reason="bubblewrap (bwrap) not installed; .ci/run installs it"
)

FIB = """
def fib(n):
    a, b = 0, 1
    for _ in range(n):
        a, b = b, a + b
    return a
"""
FIB_WRONG = FIB.replace("a, b = b, a + b", "a, b = b, a + b + 1")
FIB_ASSERTS = "assert fib(0) == 0\nassert fib(1) == 1\nassert fib(10) == 55\n"
FIB_CHECK = (
    "def check(candidate):\n    assert [candidate(i) for i in range(7)] == [0, 1, 1, 2, 3, 5, 8]\n"
)

SUM_PAIRS = """
import sys
data = sys.stdin.read().split()
t = int(data[0])
for i in range(t):
    a, b = int(data[1 + 2 * i]), int(data[2 + 2 * i])
    print(a + b)
"""
SUM_CASES = [
    {"input": "2\n1 2\n10 20\n", "output": "3\n30\n"},
    {"input": "1\n-5 5\n", "output": "0"},
    {"input": "3\n1 1\n2 2\n3 3\n", "output": "2\n4\n6\n\n"},
]


@needs_bwrap
@pytest.mark.parametrize(
    "program,tests,entry,passed,status",
    [
        (FIB, FIB_ASSERTS, None, True, "passed"),
        (FIB_WRONG, FIB_ASSERTS, None, False, "failed"),
        (FIB, FIB_CHECK, "fib", True, "passed"),
        (FIB, FIB_CHECK, None, True, "passed"),  # the only top-level def is the candidate
        (FIB_WRONG, FIB_CHECK, "fib", False, "failed"),
        (FIB, FIB_CHECK, "fibonacci", False, "error"),  # entry point missing
        (FIB + "def g():\n    pass\n", FIB_CHECK, None, False, "error"),  # ambiguous candidate
        (FIB + "def g():\n    pass\n", FIB_CHECK, "fib", True, "passed"),
        # HumanEval style that calls check itself: runs as written, no candidate to pick.
        (FIB + "def g():\n    pass\n", FIB_CHECK + "check(fib)\n", None, True, "passed"),
        (FIB_WRONG + "def g():\n    pass\n", FIB_CHECK + "check(fib)\n", None, False, "failed"),
        ("def fib(n) return n", FIB_ASSERTS, None, False, "error"),  # syntax error
        ("raise ValueError('boom')", FIB_ASSERTS, None, False, "error"),
        (FIB, "assert fib(3) == 2\nraise KeyError('x')\n", None, False, "error"),
    ],
)
def test_run_tests_styles(program, tests, entry, passed, status):
    res = run_tests(program, tests, timeout_s=10.0, entry_point=entry)
    assert (res.passed, res.status) == (passed, status), res


@needs_bwrap
def test_tests_that_call_check_are_not_called_again():
    tests = (
        "calls = []\n"
        "def check(candidate):\n"
        "    calls.append(candidate)\n"
        "    assert len(calls) == 1, 'check ran twice'\n"
        "    assert candidate(10) == 55\n"
        "if __name__ == '__main__':\n"
        "    check(fib)\n"
    )
    program = "def helper():\n    return 0\n" + FIB
    for entry in (None, "fib"):
        res = run_tests(program, tests, entry_point=entry)
        assert res.passed, res
    res = run_tests(program, tests, entry_point="helper")  # still not called a second time
    assert res.passed, res


def _fake_bwrap(tmp_path, body: str) -> sandbox.SandboxConfig:
    path = tmp_path / "bwrap"
    path.write_text("#!/bin/sh\n" + body + "\n")
    path.chmod(0o755)
    return sandbox.SandboxConfig(bwrap_path=str(path), allow_weak=False)


def test_sandbox_that_never_starts_is_a_sandbox_error_not_a_timeout(tmp_path):
    cfg = _fake_bwrap(tmp_path, "exec sleep 30")
    res = run_tests(FIB, FIB_ASSERTS, timeout_s=0.5, config=cfg)
    assert (res.passed, res.status) == (False, "sandbox_error"), res
    assert "did not start within" in res.detail
    res = run_io_tests(SUM_PAIRS, SUM_CASES, time_limit_s=0.5, config=cfg)
    assert (res.passed, res.status) == (False, "sandbox_error"), res


@needs_bwrap
def test_strict_compare_accepts_builtin_results():
    prog = (
        "from collections import Counter, deque, OrderedDict\nfrom fractions import Fraction\n"
        "def f():\n    return [1, (2.5, 'a'), {3: b'x'}, {4}, None, True, Counter('ab'),\n"
        "            deque([1]), OrderedDict(a=1), Fraction(1, 3), range(2)]\n"
    )
    tests = (
        "from collections import Counter, deque, OrderedDict\nfrom fractions import Fraction\n"
        "r = f()\nassert r == [1, (2.5, 'a'), {3: b'x'}, {4}, None, True, Counter('ab'),\n"
        "             deque([1]), OrderedDict(a=1), Fraction(1, 3), range(2)]\n"
        "assert 1 in r and 7 not in r and r[4] is None\nassert 0 < len(r) <= 11\n"
        "assert [x for x in range(3) if x != 1] == [0, 2]\n"
        "class T:\n    ok = (lambda: 1 == 1)()\nassert T.ok\n"
    )
    res = run_tests(prog, tests)
    assert res.passed, res
    # Comparing instances of the program's own classes needs strict_compare=False.
    prog = "class P:\n    def __init__(self, v):\n        self.v = v\n    def __eq__(self, o):\n"
    prog += "        return self.v == o.v\n"
    res = run_tests(prog, "assert P(1) == P(1)\n")
    assert res.status == "failed" and "strict_compare" in res.detail
    assert run_tests(
        prog, "assert P(1) == P(1)\nassert P(1) != P(2)\n", strict_compare=False
    ).passed


@needs_bwrap
def test_run_tests_timeout_and_stdout():
    res = run_tests("import time\ntime.sleep(30)\n", "assert True\n", timeout_s=1.0)
    assert (res.passed, res.status) == (False, "timeout")
    assert res.wall_s < 3.0
    res = run_tests("print('hello from the program')\n" + FIB, FIB_ASSERTS)
    assert res.passed and "hello from the program" in res.stdout_tail
    res = run_tests("x = input()\n", "assert True\n")  # stdin is empty for function tests
    assert res.status == "error" and "EOFError" in res.detail


@needs_bwrap
def test_run_io_tests():
    res = run_io_tests(SUM_PAIRS, SUM_CASES)
    assert (res.passed, res.status, res.cases_passed, res.cases_total) == (True, "passed", 3, 3)
    wrong = SUM_PAIRS.replace("print(a + b)", "print(a + b if a != 2 else 0)")
    res = run_io_tests(wrong, SUM_CASES)
    assert (res.passed, res.status, res.cases_passed) == (False, "failed", 2)
    assert res.detail.startswith("case 2")  # stopped at the first failing case, not before
    res = run_io_tests("import sys\nsys.stdin.read()\nraise RuntimeError('x')\n", SUM_CASES)
    assert (res.status, res.cases_passed) == ("error", 0)
    slow = "import time\ntime.sleep(5)\n" + SUM_PAIRS
    res = run_io_tests(slow, SUM_CASES, time_limit_s=0.5)
    assert (res.status, res.cases_passed) == ("timeout", 0) and res.wall_s < 2.0
    res = run_io_tests(SUM_PAIRS, [{"input": "1\n1 2\n"}])
    assert res.status == "error" and "output" in res.detail
    assert run_io_tests(SUM_PAIRS, []).status == "error"


@needs_bwrap
def test_io_large_input_and_program():
    n = 200_000
    cases = [{"input": f"{n}\n" + "1 2\n" * n, "output": "3\n" * n}]
    program = "# " + "x" * 300_000 + "\n" + SUM_PAIRS  # larger than one argv string may be
    res = run_io_tests(program, cases, time_limit_s=10.0)
    assert res.passed, res


def test_normalize_output():
    assert normalize_output("1  2 \n3\t4\n\n") == normalize_output("\n1 2\n3 4")
    assert normalize_output("1 2\n3 4") != normalize_output("1 2 3 4")
    assert normalize_output("12") != normalize_output("1 2")


def test_refuses_without_bwrap(monkeypatch, caplog, capsys):
    monkeypatch.delenv(sandbox.WEAK_SANDBOX_ENV, raising=False)  # conftest sets it without bwrap
    monkeypatch.setattr(sandbox.shutil, "which", lambda name: None)
    monkeypatch.setattr(sandbox, "_SHOUTED", set())
    with caplog.at_level(logging.ERROR):
        res = run_tests(FIB, FIB_ASSERTS)
        res2 = run_io_tests(SUM_PAIRS, SUM_CASES)
    assert (res.passed, res.status) == (False, "sandbox_error")
    assert (res2.passed, res2.status) == (False, "sandbox_error")
    assert "bwrap" in res.detail
    assert capsys.readouterr().err.count("refusing") == 1  # said once, loudly


def test_weak_mode_only_when_allowed(monkeypatch, capsys):
    monkeypatch.setattr(sandbox.shutil, "which", lambda name: None)
    monkeypatch.setattr(sandbox, "_SHOUTED", set())
    cfg = sandbox.SandboxConfig(allow_weak=True)
    res = run_tests(FIB, FIB_ASSERTS, config=cfg)
    assert res.passed, res
    res = run_tests(FIB_WRONG, FIB_ASSERTS, config=cfg)
    assert (res.passed, res.status) == (False, "failed")
    res = run_tests("x = bytearray(8 << 30)\n", "assert True\n", config=cfg)
    assert res.status == "error" and "MemoryError" in res.detail  # rlimits still apply
    assert run_io_tests(SUM_PAIRS, SUM_CASES, config=cfg).passed
    assert capsys.readouterr().err.count("rlimits ONLY") == 1


def test_missing_bwrap_binary_is_a_sandbox_error():
    cfg = sandbox.SandboxConfig(bwrap_path="/nonexistent/bwrap", allow_weak=False)
    res = run_tests(FIB, FIB_ASSERTS, config=cfg)
    assert (res.passed, res.status) == (False, "sandbox_error")


def test_seccomp_filter_shape():
    for machine in ("x86_64", "aarch64"):
        bpf = seccomp.build_filter(machine)
        assert bpf is not None and len(bpf) % 8 == 0 and len(bpf) // 8 < 64
        insns = [struct.unpack("=HBBI", bpf[i : i + 8]) for i in range(0, len(bpf), 8)]
        assert insns[-1] == (0x06, 0, 0, 0x80000000)  # default for a foreign arch: kill
        for k, (op, jt, jf, _) in enumerate(insns):  # every jump lands inside
            if op & 0x07 == 0x05:
                assert k + 1 + max(jt, jf) < len(insns)
    assert seccomp.build_filter("sparc") is None


def test_statuses_are_documented():
    assert set(code_lib.STATUSES) == {"passed", "failed", "timeout", "error", "sandbox_error"}


def test_extract_code_blocks_in_linear_time():
    text = "```python\na = 1\n```\nthen ```js\nb()\n``` and ```py3x\nc\n```\n```\nd = 4\n```"
    assert extract_code(text) == "d = 4\n"
    assert extract_code("```Python3 extra words\nx\n```") == "x\n"
    assert extract_code("```python\nnever closed") is None and extract_code("no code") is None
    # A long line of backticks rescanned the line from every position before (minutes here).
    assert extract_code("`" * 200_000) is None
    assert extract_code("```\n" + "`" * 200_000) == ""  # opened, closed at once, then no newline
    assert extract_code("```python\n" + "x = 1\n" * 40_000) is None
