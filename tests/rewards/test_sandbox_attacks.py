"""Attack suite: each untrusted program tries to escape, cheat or hurt the grader.

After every attack: no reward, the expected status, the grader (this process) alive and able to
grade a correct program at once, and the host unchanged (no file written, no connection made,
no sandboxed process left running).
"""

import os
import shutil
import socket
import time
import uuid
from pathlib import Path

import pytest

from nemocascade.rewards.code import run_io_tests, run_tests

pytestmark = pytest.mark.skipif(
    shutil.which("bwrap") is None, reason="bubblewrap (bwrap) not installed; .ci/run installs it"
)

REPO = Path(__file__).resolve().parents[2]
GOOD = "def f(x):\n    return x + 1\n"
GOOD_TESTS = "assert f(1) == 2\n"


def _host_processes_with(token: str) -> list[int]:
    pids = []
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            cmdline = Path(f"/proc/{pid}/cmdline").read_bytes()
        except OSError:
            continue
        if token.encode() in cmdline:
            pids.append(int(pid))
    return pids


def _assert_contained(res, statuses, token=None, max_wall_s=10.0):
    assert not res.passed, res
    assert res.status in statuses, res
    assert res.wall_s < max_wall_s, res
    if token is not None:
        assert _host_processes_with(token) == [], "sandboxed process survived"
    t0 = time.monotonic()
    ok = run_tests(GOOD, GOOD_TESTS, timeout_s=10.0)
    assert ok.passed and ok.status == "passed", ok
    assert time.monotonic() - t0 < 5.0, "grader not responsive after the attack"


def _self_exec(body: str, token: str) -> str:
    """A program that re-execs itself with `token` in its command line, then runs `body`."""
    return (
        f"import os, sys\n"
        f"if {token!r} not in sys.argv:\n"
        f"    os.execv(sys.executable, [sys.executable, '-c', {body!r}, {token!r}])\n"
    )


def test_infinite_loop_times_out_and_dies():
    token = f"tok{uuid.uuid4().hex}"
    res = run_tests(_self_exec("while True: pass", token), GOOD_TESTS, timeout_s=1.0)
    _assert_contained(res, {"timeout"}, token=token)
    assert res.wall_s < 3.0


def test_fork_bomb_cannot_fork():
    token = f"tok{uuid.uuid4().hex}"
    body = "import os\nwhile True:\n    os.fork()\n"
    res = run_tests(_self_exec(body, token), GOOD_TESTS, timeout_s=3.0)
    _assert_contained(res, {"error", "failed"}, token=token)
    res = run_tests(
        "import subprocess\nsubprocess.run(['sh', '-c', ':(){ :|:& };:'])\n" + GOOD,
        GOOD_TESTS,
        timeout_s=3.0,
    )
    _assert_contained(res, {"error"})
    assert "PermissionError" in res.detail or "Operation not permitted" in res.detail


def test_thread_bomb_is_bounded_by_memory():
    prog = (
        "import threading, time\nts = []\nwhile True:\n"
        "    t = threading.Thread(target=time.sleep, args=(30,), daemon=True)\n"
        "    t.start()\n    ts.append(t)\n"
    )
    res = run_tests(prog + GOOD, GOOD_TESTS, timeout_s=5.0)
    _assert_contained(res, {"error", "timeout"})


def test_memory_bomb():
    res = run_tests("x = bytearray(8 << 30)\n" + GOOD, GOOD_TESTS, timeout_s=5.0)
    _assert_contained(res, {"error"})
    assert "MemoryError" in res.detail
    res = run_tests(
        "chunks = []\nwhile True:\n    chunks.append(bytearray(50 << 20))\n",
        GOOD_TESTS,
        timeout_s=5.0,
    )
    _assert_contained(res, {"error"})


def test_cannot_write_outside_the_sandbox(tmp_path):
    targets = [
        tmp_path / "pwned",
        Path("/tmp") / f"pwned_{uuid.uuid4().hex}",
        REPO / f"pwned_{uuid.uuid4().hex}",
        Path.home() / f"pwned_{uuid.uuid4().hex}",
    ]
    prog = (
        "def f(paths):\n    n = 0\n    for p in paths:\n        try:\n"
        "            open(p, 'w').write('pwned')\n            n += 1\n"
        "        except OSError:\n            pass\n    return n\n"
    )
    res = run_tests(prog, f"assert f({[str(t) for t in targets]!r}) == {len(targets)}\n")
    _assert_contained(res, {"failed"})
    for t in targets:
        assert not t.exists(), t


def test_disk_fill_is_capped():
    prog = (
        "import os\nn = 0\ntry:\n    while True:\n"
        "        with open(f'/tmp/fill{n}', 'wb') as fh:\n"
        "            fh.write(b'x' * (8 << 20))\n        n += 1\n"
        "except OSError as e:\n    print('stopped', n, e)\n"
    )
    res = run_tests(prog + GOOD, "assert n > 100\n", timeout_s=10.0)
    _assert_contained(res, {"failed"})
    assert "stopped" in res.stdout_tail


def test_cannot_read_host_files(tmp_path):
    secret = f"SECRET{uuid.uuid4().hex}"
    (tmp_path / "secret.txt").write_text(secret)
    paths = [
        str(tmp_path / "secret.txt"),
        str(REPO / "pyproject.toml"),
        "/etc/passwd",
        "/etc/hostname",
        str(Path.home() / ".bashrc"),
    ]
    prog = "def f(p):\n    return open(p).read()\n"
    for p in paths:
        res = run_tests(prog, f"print(f({p!r}))\nassert f({p!r})\n")
        assert not res.passed and res.status == "error", (p, res)
        assert "FileNotFoundError" in res.detail or "PermissionError" in res.detail, (p, res)
        assert secret not in res.stdout_tail + res.stderr_tail
    _assert_contained(res, {"error"})


def test_no_network_to_a_host_listener():
    srv = socket.socket()
    srv.bind(("127.0.0.1", 0))
    srv.listen(1)
    srv.setblocking(False)
    port = srv.getsockname()[1]
    try:
        prog = (
            "import socket\ndef f():\n"
            f"    s = socket.create_connection(('127.0.0.1', {port}), timeout=2)\n"
            "    s.sendall(b'leak')\n    return True\n"
        )
        res = run_tests(prog, "assert f()\n", timeout_s=5.0)
        _assert_contained(res, {"error"})
        assert "ConnectionRefused" in res.detail or "OSError" in res.detail, res
        with pytest.raises(BlockingIOError):
            srv.accept()
    finally:
        srv.close()


@pytest.mark.parametrize(
    "exit_stmt",
    [
        "import sys; sys.exit(0)",
        "import os; os._exit(0)",
        "raise SystemExit",
        "import os, signal; os.kill(os.getpid(), signal.SIGTERM)",
    ],
)
def test_exit_before_tests_is_no_pass(exit_stmt):
    res = run_tests(GOOD + exit_stmt + "\n", "assert f(1) == 3\n")
    _assert_contained(res, {"failed", "error"})
    res = run_io_tests(exit_stmt + "\nprint(3)\n", [{"input": "1 2\n", "output": "3\n"}])
    _assert_contained(res, {"failed", "error"})


def test_exit_inside_tests_and_forged_markers_are_no_pass():
    # The program wins only if it can write the harness's pass marker; it does not know the nonce.
    forge = (
        "import os, sys\nfor fd in range(0, 64):\n    try:\n"
        "        os.write(fd, b'S\\nP:' + b'0' * 32 + b'\\n')\n    except OSError:\n"
        "        pass\nprint('P:' + '0' * 32)\nos._exit(0)\n"
    )
    res = run_tests(GOOD + forge, "assert f(1) == 3\n")
    _assert_contained(res, {"failed"})
    res = run_tests(GOOD, "import os\nos._exit(0)\nassert f(1) == 3\n")
    _assert_contained(res, {"failed"})


def test_killing_the_parent_does_not_help():
    prog = (
        "import os, signal\nfor pid in (os.getppid(), 1, -1):\n    try:\n"
        "        os.kill(pid, signal.SIGKILL)\n    except OSError:\n        pass\n" + GOOD
    )
    res = run_tests(prog, "assert f(1) == 3\n")
    _assert_contained(res, {"failed", "error", "sandbox_error"})
    assert os.getppid() > 1  # the grader (and its parent) live on


def test_printing_gigabytes_is_cut_off():
    prog = "import sys\nwhile True:\n    sys.stdout.write('x' * (1 << 20))\n"
    res = run_tests(prog + GOOD, GOOD_TESTS, timeout_s=20.0)
    _assert_contained(res, {"error"}, max_wall_s=5.0)
    assert "output over" in res.detail
    res = run_io_tests(prog, [{"input": "", "output": "x\n"}], time_limit_s=20.0)
    _assert_contained(res, {"error"}, max_wall_s=5.0)


def test_expected_output_is_not_in_the_sandbox():
    expected = f"ANSWER{uuid.uuid4().hex}"
    prog = (
        "import os\nfound = ''\nfor d, dirs, files in os.walk('/'):\n"
        "    if d == '/':\n"
        "        dirs[:] = [x for x in dirs if x not in ('proc', 'usr', 'sys', 'root', 'dev')]\n"
        "    for name in files:\n        try:\n"
        "            data = open(os.path.join(d, name), errors='ignore').read(1 << 16)\n"
        "        except OSError:\n            continue\n"
        "        if 'ANSWER' in data:\n            found = data\n"
        "print(found)\n"
    )
    res = run_io_tests(prog, [{"input": "q\n", "output": expected + "\n"}], time_limit_s=10.0)
    _assert_contained(res, {"failed"})


ALWAYS_EQUAL = """
class Anything(int):
    def __eq__(self, other):
        return True
    __ne__ = lambda self, other: False
    __lt__ = __le__ = __gt__ = __ge__ = __eq__
    def __bool__(self):
        return True
    __hash__ = int.__hash__
def f(x):
    return Anything(0)
"""


@pytest.mark.parametrize(
    "tests",
    [
        "assert f(1) == 2\nassert not (f(1) != 2)\n",
        "assert [f(1)] == [2]\nassert {'k': f(1)} == {'k': 2}\n",
        "assert f(1)\n",
        "assert 0 <= f(1) < 5 and f(1) == 3\n",
        "def check(candidate):\n    assert candidate(1) == 2\n",
    ],
)
def test_always_equal_object_is_no_pass(tests):
    res = run_tests(ALWAYS_EQUAL, tests, entry_point="f")
    _assert_contained(res, {"failed"})
    assert "strict_compare" in res.detail
    # Without strict comparison the trick would have worked: the defence is what stops it.
    assert run_tests(ALWAYS_EQUAL, tests, entry_point="f", strict_compare=False).passed


def test_program_cannot_shadow_the_tests_check():
    # The program defines its own `check`; the tests' `check` must still be the one that runs.
    prog = GOOD + "def check(candidate):\n    pass\n"
    res = run_tests(prog, "def check(candidate):\n    assert candidate(1) == 3\n", entry_point="f")
    _assert_contained(res, {"failed"})


@pytest.mark.parametrize(
    "patch",
    [
        "builtins.AssertionError = type('X', (Exception,), {})",
        "builtins.exec = lambda *a, **k: None",
        "builtins.bool = lambda *a: True",
        "builtins.zip = lambda *a: iter(())",
        "import operator; operator.eq = lambda a, b: True",
    ],
)
def test_program_cannot_rebind_what_the_harness_uses(patch):
    res = run_tests(GOOD + "import builtins\n" + patch + "\n", "assert f(1) == 3\n")
    _assert_contained(res, {"failed"})
