"""What the environments run in the bubblewrap sandbox (`rewards.sandbox.run_sandboxed`), and how
its outcome becomes the text the model reads.

Three boots (Python sources run as `python -c BOOT RESULT_FD` after the rlimit prelude; each reads
a length-prefixed JSON blob from stdin, see `rewards.harness.READ_BLOB`, so programs of any size
avoid the 128 KiB limit of one argv string):

  * `SNIPPET_BOOT`: runs a code snippet as `__main__` (the `run_python` tool).
  * `CASES_BOOT`: runs a program, then each top-level `assert` of a test source as one test case
    (other statements are setup), and reports per case on the result pipe: "K:i" passed,
    "F:i:detail" failed (for `assert a <op> b` the detail shows both values, never the source),
    "D:n" all n cases ran. Tests that only define `check(candidate)` (HumanEval style) are one
    case, `check(entry_point)`. Used by `code_repair`'s `run_tests`, whose tests may be hidden.
  * `REPO_BOOT`: writes a repository's files under `repo/` in its working directory (`/tmp`, the
    sandbox's private tmpfs; in the opted-in weak mode a fresh host directory). The episode's
    host working directory is copied in, not bound, so nothing the tests do reaches it. It then
    runs a test command `python -m MODULE ARGS` or `python SCRIPT ARGS` in-process (the
    sandbox forbids fork). The `-m` module is imported before the repository is on `sys.path`,
    so a repository file cannot shadow the test runner (e.g. its own `unittest.py`). On exit
    status 0 it writes "P:<nonce>", the nonce read from a private copy of stdin only after the
    run (the protocol of `rewards.code`): `os._exit(0)` in the code under test is no pass.
    Residual risk as in `rewards.code`: code that deliberately patches the runner in-process.
"""

from __future__ import annotations

import dataclasses
import json
import secrets
import shlex

from nemocascade.rewards.harness import READ_BLOB
from nemocascade.rewards.sandbox import RESULT_FD, SandboxConfig, limits_prelude, run_sandboxed

SNIPPET_BOOT = (
    READ_BLOB
    + r"""
_src = _read_blob()
del _read_blob, _res
exec(compile(_src, "<run_python>", "exec"), {"__name__": "__main__"})
"""
)

CASES_BOOT = (
    READ_BLOB
    + r"""
def _main(res, read_blob):
    import ast, contextlib, io, json, operator, os, sys
    spec = json.loads(read_blob())
    write, exit_ = os.write, os._exit
    ops = {ast.Eq: operator.eq, ast.NotEq: operator.ne, ast.Lt: operator.lt, ast.LtE: operator.le,
           ast.Gt: operator.gt, ast.GtE: operator.ge, ast.In: lambda a, b: a in b,
           ast.NotIn: lambda a, b: a not in b}
    def short(v):
        try:
            s = repr(v)
        except BaseException:
            s = "<unprintable>"
        return s if len(s) <= 80 else s[:77] + "..."
    def say(line):
        write(res, (line.replace("\n", " ")[:300] + "\n").encode("utf-8", "replace"))
    ns = {"__name__": "__main__"}
    try:
        exec(compile(spec["program"], "<program>", "exec"), ns)
    except BaseException as e:
        say("E:the program failed before any test: " + type(e).__name__ + ": " + str(e))
        exit_(0)
    tree = ast.parse(spec["tests"])
    n = 0
    for node in tree.body:
        code = compile(ast.Module([node], []), "<hidden test>", "exec")
        if not isinstance(node, ast.Assert):
            try:
                exec(code, ns)
            except BaseException as e:
                say("E:test setup failed: " + type(e).__name__)
                exit_(0)
            continue
        n += 1
        out = io.StringIO()
        t = node.test
        try:
            with contextlib.redirect_stdout(out):
                if (isinstance(t, ast.Compare) and len(t.ops) == 1
                        and type(t.ops[0]) in ops):
                    left = eval(compile(ast.Expression(t.left), "<test>", "eval"), ns)
                    right = eval(compile(ast.Expression(t.comparators[0]), "<test>", "eval"), ns)
                    ok = bool(ops[type(t.ops[0])](left, right))
                    detail = "got " + short(left) + ", compared (" + type(t.ops[0]).__name__ \
                        + ") with " + short(right)
                else:
                    exec(code, ns)
                    ok, detail = True, ""
        except AssertionError as e:
            ok, detail = False, "assertion failed" + ((": " + short(str(e))) if str(e) else "")
        except BaseException as e:
            ok, detail = False, "raised " + type(e).__name__ + ": " + short(str(e))
        if ok:
            say("K:" + str(n))
        else:
            printed = out.getvalue()[-120:]
            say("F:" + str(n) + ":" + detail + (("; printed " + repr(printed)) if printed else ""))
    check, candidate = ns.get("check"), ns.get(spec.get("entry_point") or "")
    if n == 0 and callable(check) and callable(candidate):  # HumanEval style: one case
        n = 1
        try:
            check(candidate)
            say("K:1")
        except BaseException as e:
            say("F:1:check(" + spec["entry_point"] + ") raised " + type(e).__name__)
    say("D:" + str(n))
    exit_(0)
_main(_res, _read_blob)
"""
)

REPO_BOOT = (
    READ_BLOB
    + r"""
def _main(res, read_blob):
    import json, os, runpy, sys, traceback
    spec = json.loads(read_blob())
    nonce_fd = os.dup(0)
    null = os.open("/dev/null", os.O_RDONLY)
    os.dup2(null, 0)
    os.close(null)
    write, exit_, read = os.write, os._exit, os.read
    root = os.path.join(os.getcwd(), "repo")  # /tmp/repo; weak mode: a fresh host tmpdir
    for path, text in spec["files"].items():
        full = os.path.join(root, path)
        os.makedirs(os.path.dirname(full), exist_ok=True)
        with open(full, "w", encoding="utf-8") as f:
            f.write(text)
    os.makedirs(root, exist_ok=True)
    os.chdir(root)
    argv = spec["argv"]
    if argv[0] == "-m":
        __import__(argv[1])
    sys.path.insert(0, root)
    code = 1
    try:
        if argv[0] == "-m":
            sys.argv = [argv[1], *argv[2:]]
            runpy.run_module(argv[1], run_name="__main__", alter_sys=True)
        else:
            sys.argv = list(argv)
            runpy.run_path(argv[0], run_name="__main__")
        code = 0
    except SystemExit as e:
        code = e.code if isinstance(e.code, int) else (0 if e.code is None else 1)
    except BaseException:
        traceback.print_exc()
    sys.stdout.flush()
    sys.stderr.flush()
    write(res, ("X:" + str(int(code)) + "\n").encode())
    if code == 0:
        write(res, b"P:" + read(nonce_fd, 64) + b"\n")
    exit_(0)
_main(_res, _read_blob)
"""
)


def _raw_blob(text: str) -> bytes:
    """The READ_BLOB framing: "<n>\\n" then n bytes of UTF-8."""
    data = text.encode("utf-8", errors="replace")
    return str(len(data)).encode() + b"\n" + data


def _text(b: bytes) -> str:
    return b.decode("utf-8", errors="replace")


@dataclasses.dataclass
class Outcome:
    """One sandboxed run, read back. `status`: ok | failed | timeout | output_cap | sandbox_error.
    `report`: the text for the model; `passed`: the nonce came back (REPO_BOOT only)."""

    status: str
    report: str
    passed: bool = False
    stdout: str = ""
    stderr: str = ""


def _run(boot: str, payload: bytes, timeout_s: float, cfg: SandboxConfig, out_cap: int):
    """run_sandboxed with the rlimit prelude and the host-side output cap lowered to `out_cap`
    bytes (a flood is killed early instead of buffered: the model reads a truncated tail anyway)."""
    cfg = dataclasses.replace(cfg, output_bytes=min(cfg.output_bytes, out_cap))
    source = limits_prelude(cfg, timeout_s) + boot
    return run_sandboxed(["-c", source, RESULT_FD], stdin=payload, timeout_s=timeout_s, cfg=cfg)


def _common(run, timeout_s: float) -> str | None:
    """The status of a run that did not finish normally, else None."""
    if run.sandbox_error is not None:
        return "sandbox_error"
    if not run.result.startswith(b"S\n"):
        return "sandbox_error"  # the boot never started (bwrap failed, or not within the limit)
    if run.timed_out:
        return "timeout"
    if run.output_exceeded:
        return "output_cap"
    return None


def _streams(run) -> str:
    out, err = _text(run.stdout), _text(run.stderr)
    return f"stdout:\n{out}" + (f"\nstderr:\n{err}" if err else "")


def run_snippet(code: str, timeout_s: float, cfg: SandboxConfig, out_cap: int) -> Outcome:
    """Run a Python snippet; the report has the exit status, stdout and stderr."""
    run = _run(SNIPPET_BOOT, _raw_blob(code), timeout_s, cfg, out_cap)
    status = _common(run, timeout_s)
    if status == "sandbox_error":
        why = run.sandbox_error or _text(run.stderr)[-300:] or "the sandbox did not start"
        return Outcome(status, why)
    head = {
        "timeout": f"timed out after {timeout_s:g}s (killed)",
        "output_cap": f"output over {out_cap} bytes (killed)",
        None: f"exit status {run.returncode}",
    }[status]
    ok = status is None and run.returncode == 0
    return Outcome("ok" if ok else (status or "failed"), f"{head}\n{_streams(run)}")


def run_cases(
    program: str,
    tests: str,
    timeout_s: float,
    cfg: SandboxConfig,
    out_cap: int,
    entry_point: str | None = None,
) -> Outcome:
    """Run `program` then each top-level assert of `tests`; the report names the failing cases
    by number with the compared values, never the test source."""
    spec = {"program": program, "tests": tests, "entry_point": entry_point}
    payload = _raw_blob(json.dumps(spec))
    run = _run(CASES_BOOT, payload, timeout_s, cfg, out_cap)
    status = _common(run, timeout_s)
    if status == "sandbox_error":
        return Outcome(status, run.sandbox_error or _text(run.stderr)[-300:])
    lines = _text(run.result).splitlines()[1:]
    passed = [ln for ln in lines if ln.startswith("K:")]
    failed = [ln[2:] for ln in lines if ln.startswith("F:")]
    done = [ln for ln in lines if ln.startswith("D:")]
    errors = [ln[2:] for ln in lines if ln.startswith("E:")]
    report = [f"{len(passed)} test(s) passed, {len(failed)} failed"]
    if done == ["D:0"]:
        report.append("no test cases found (top-level asserts, or check() with an entry_point)")
    report += [f"test {f.split(':', 1)[0]} failed: {f.split(':', 1)[1]}" for f in failed]
    report += errors
    if status == "timeout":
        report.append(f"timed out after {timeout_s:g}s (killed); later tests did not run")
    elif status == "output_cap":
        report.append(f"output over {out_cap} bytes (killed); later tests did not run")
    elif not done and not errors:
        tail = _text(run.stderr)[-300:]
        report.append(f"the run ended before all tests ran (exit status {run.returncode}) {tail}")
    ok = bool(done) and done != ["D:0"] and not failed and not errors and status is None
    return Outcome("ok" if ok else (status or "failed"), "\n".join(report), passed=ok)


def parse_test_command(command: str) -> list[str]:
    """The python arguments of a test command `python[3] -m MODULE ARGS` / `python SCRIPT ARGS`
    (standard library only: the sandbox has no site-packages). ValueError otherwise."""
    try:
        argv = shlex.split(command)
    except ValueError as e:
        raise ValueError(f"test_command {command!r}: {e}") from None
    if len(argv) < 2 or argv[0] not in ("python", "python3"):
        raise ValueError(f"test_command {command!r}: must start with 'python' and name a test")
    if argv[1] == "-m" and len(argv) < 3:
        raise ValueError(f"test_command {command!r}: -m needs a module")
    if argv[1].startswith("-") and argv[1] != "-m":
        raise ValueError(f"test_command {command!r}: only -m MODULE or a script is supported")
    return argv[1:]


def run_repo(
    files: dict[str, str], argv: list[str], timeout_s: float, cfg: SandboxConfig, out_cap: int
) -> Outcome:
    """Materialise `files` in the sandbox and run the test command `argv` there. `passed`: the
    command exited 0 (proven by the nonce)."""
    nonce = secrets.token_hex(16)
    payload = _raw_blob(json.dumps({"files": files, "argv": argv})) + nonce.encode()
    run = _run(REPO_BOOT, payload, timeout_s, cfg, out_cap)
    status = _common(run, timeout_s)
    if status == "sandbox_error":
        return Outcome(status, run.sandbox_error or _text(run.stderr)[-300:])
    lines = _text(run.result).splitlines()
    code = next((ln[2:] for ln in lines if ln.startswith("X:")), None)
    passed = status is None and f"P:{nonce}" in lines
    head = {
        "timeout": f"timed out after {timeout_s:g}s (killed)",
        "output_cap": f"output over {out_cap} bytes (killed)",
        None: f"exit status {code}"
        if code is not None
        else f"the test command did not finish (process exit status {run.returncode})",
    }[status]
    out, err = _text(run.stdout), _text(run.stderr)
    return Outcome(
        "ok" if passed else (status or "failed"),
        f"{head}\n{_streams(run)}",
        passed=passed,
        stdout=out,
        stderr=err,
    )
