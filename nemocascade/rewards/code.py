"""Code verifiers: unit tests and stdin/stdout tests of a Python program, run in the sandbox.

Two test styles, strict binary reward (every test must pass):
  * `run_tests(program, test_code)`: the program, then `test_code` (in a copy of the program's
    namespace), inside the sandbox. `test_code` may be bare asserts, or define `check(candidate)`
    (HumanEval style), called with the program's function `entry_point` (or the program's only
    top-level function) unless the tests already call `check` themselves, in which case they run
    exactly as written. Comparisons in the tests refuse non-builtin operands (`strict_compare`).
  * `run_io_tests(program, cases)`: each case runs the program in a fresh sandbox with the case's
    input on stdin; stdout is compared with the expected output on the host (whitespace-normalised:
    runs of blanks collapse, trailing blanks and blank lines at either end are ignored). A per-case
    time limit; stops at the first failing case. The expected outputs never enter the sandbox.

Passing is proven by a marker, never by an exit code (protocol in `harness.py`): in `run_tests`
the harness reads a per-run random nonce only after every test ran (from a stdin copy the user
code cannot see as stdin) and writes it to a result pipe only the host reads; in `run_io_tests`
the host compares each case's actual output. Statuses: passed, failed (an assertion / wrong answer
/ exited before the tests finished), timeout, error (exception, non-zero exit, output cap, bad
input), sandbox_error (bwrap missing or unable to start, or the sandbox did not start within the
time limit: a grader failure, not a verdict on the program).

Residual risk, by design of in-process unit tests: a program that deliberately introspects the
harness (frames, `gc`, its file descriptors) could forge the marker; the nonce, the private
namespaces and the seccomp ban on ptrace make that a targeted attack, not an accident.
"""

from __future__ import annotations

import dataclasses
import json
import re
import secrets

from nemocascade.rewards.harness import FUNC_HARNESS, IO_BOOT
from nemocascade.rewards.sandbox import RESULT_FD, SandboxConfig, limits_prelude, run_sandboxed

STATUSES = ("passed", "failed", "timeout", "error", "sandbox_error")
_TAIL = 2000


@dataclasses.dataclass
class CodeResult:
    """Outcome of running a program against tests. `passed` is the binary reward."""

    passed: bool
    status: str
    detail: str = ""
    cases_passed: int = 0
    cases_total: int = 0
    wall_s: float = 0.0
    stdout_tail: str = ""
    stderr_tail: str = ""

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


def _blob(text: str) -> bytes:
    data = text.encode("utf-8", errors="replace")
    return str(len(data)).encode() + b"\n" + data


def _tail(b: bytes) -> str:
    return b[-_TAIL:].decode("utf-8", errors="replace")


def _top_level_functions(program: str) -> list[str]:
    """Names of top-level `def`s in `program` (used when check() has no entry_point)."""
    return re.findall(r"^def\s+([A-Za-z_]\w*)\s*\(", program, flags=re.MULTILINE)


def run_tests(
    program: str,
    test_code: str,
    *,
    timeout_s: float = 10.0,
    entry_point: str | None = None,
    strict_compare: bool = True,
    config: SandboxConfig | None = None,
) -> CodeResult:
    """Run `program` then `test_code` (asserts or a `check(candidate)` function) in the sandbox.

    Passed only if the harness wrote this run's nonce after every test ran. `strict_compare`
    makes the tests' comparisons refuse non-builtin operands (see `harness.py`).
    """
    cfg = config or SandboxConfig()
    nonce = secrets.token_hex(16)
    spec = {
        "program": program,
        "tests": test_code,
        "entry_point": entry_point,
        "program_functions": _top_level_functions(program),
        "strict_compare": bool(strict_compare),
    }
    stdin = _blob(json.dumps(spec)) + nonce.encode()
    harness = limits_prelude(cfg, timeout_s) + FUNC_HARNESS
    run = run_sandboxed(["-c", harness, RESULT_FD], stdin=stdin, timeout_s=timeout_s, cfg=cfg)
    res = CodeResult(
        False,
        "error",
        cases_total=1,
        wall_s=run.wall_s,
        stdout_tail=_tail(run.stdout),
        stderr_tail=_tail(run.stderr),
    )
    lines = run.result.decode("utf-8", errors="replace").splitlines()
    if run.sandbox_error is not None:
        res.status, res.detail = "sandbox_error", run.sandbox_error
    elif f"P:{nonce}" in lines and not run.timed_out and not run.output_exceeded:
        res.passed, res.status, res.cases_passed = True, "passed", 1
    elif run.timed_out and "S" not in lines:
        res.status, res.detail = "sandbox_error", f"sandbox did not start within {timeout_s}s"
    elif run.timed_out:
        res.status, res.detail = "timeout", f"wall-clock limit {timeout_s}s"
    elif run.output_exceeded:
        res.status, res.detail = "error", f"output over {cfg.output_bytes} bytes"
    elif "S" not in lines:
        res.status, res.detail = "sandbox_error", f"sandbox did not start: {_tail(run.stderr)}"
    else:
        fails = [ln for ln in lines if ln.startswith("F:")]
        if fails:
            kind, _, msg = fails[0][2:].partition(":")
            res.status, res.detail = ("failed" if kind == "failed" else "error"), msg.strip()
        elif run.returncode is not None and run.returncode < 0:
            res.status, res.detail = "error", f"killed by signal {-run.returncode}"
        else:
            res.status = "failed"
            res.detail = f"exited (code {run.returncode}) before the tests finished"
    return res


def normalize_output(text: str) -> list[str]:
    """Lines with blank runs collapsed, trailing blanks and leading/trailing empty lines dropped."""
    return [" ".join(line.split()) for line in text.strip().splitlines()]


def run_io_tests(
    program: str,
    cases: list[dict],
    *,
    time_limit_s: float = 2.0,
    config: SandboxConfig | None = None,
) -> CodeResult:
    """Run `program` on each case's `input`, compare stdout with `output`; stop at the first
    failure.

    Each case has a wall-clock limit of `time_limit_s` (CPU limit likewise) in its own sandbox.
    """
    cfg = config or SandboxConfig()
    res = CodeResult(False, "passed", cases_total=len(cases))
    if not cases:
        res.status, res.detail = "error", "no test cases"
        return res
    boot = limits_prelude(cfg, time_limit_s) + IO_BOOT
    prefix = _blob(program)
    for i, case in enumerate(cases):
        if not isinstance(case, dict) or "input" not in case or "output" not in case:
            res.status, res.detail = "error", f"case {i}: needs 'input' and 'output' keys"
            return res
        run = run_sandboxed(
            ["-c", boot, RESULT_FD],
            stdin=prefix + case["input"].encode(),
            timeout_s=time_limit_s,
            cfg=cfg,
        )
        res.wall_s += run.wall_s
        res.stdout_tail, res.stderr_tail = _tail(run.stdout), _tail(run.stderr)
        status, detail = _judge_case(run, case["output"], time_limit_s, cfg)
        if status != "passed":
            res.status, res.detail = status, f"case {i}: {detail}"
            return res
        res.cases_passed += 1
    res.passed = True
    return res


def _judge_case(run, expected: str, time_limit_s: float, cfg: SandboxConfig) -> tuple[str, str]:
    """(status, detail) of one stdin/stdout case."""
    if run.sandbox_error is not None:
        return "sandbox_error", run.sandbox_error
    if run.timed_out and not run.result.startswith(b"S"):
        return "sandbox_error", f"sandbox did not start within {time_limit_s}s"
    if run.timed_out:
        return "timeout", f"time limit {time_limit_s}s"
    if run.output_exceeded:
        return "error", f"output over {cfg.output_bytes} bytes"
    if not run.result.startswith(b"S"):
        return "sandbox_error", f"sandbox did not start: {_tail(run.stderr)}"
    if run.returncode != 0:
        return "error", f"exit code {run.returncode}: {_tail(run.stderr)[-300:]}"
    got = normalize_output(run.stdout.decode("utf-8", errors="replace"))
    if got != normalize_output(expected):
        return "failed", "wrong answer"
    return "passed", ""
