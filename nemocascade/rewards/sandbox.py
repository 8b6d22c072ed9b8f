"""Run untrusted Python in a bubblewrap sandbox and collect its output under hard limits.

Containment, outermost first:
  * bubblewrap (`bwrap`): new user, PID, network, IPC, UTS and cgroup namespaces
    (`--unshare-all --unshare-user --disable-userns`), all capabilities dropped, uid/gid 65534
    inside, `--die-with-parent`, `--new-session`. The filesystem is a read-only root holding only
    read-only binds of `/usr` (+ the `/lib*`, `/bin` links), `/etc/ld.so.cache`, and the running
    interpreter's installation (`sys.base_prefix` when outside `/usr`); a fresh `/proc` and
    read-only `/dev`; the only writable place is a private size-limited tmpfs at `/tmp`. The
    project checkout, the home directory and the host's `/tmp` are never bound. The network
    namespace has no interfaces but its own loopback, so no host listener is reachable.
  * seccomp (`seccomp.py`): no fork/vfork/non-thread clone, no ptrace, unshare, setns, io_uring.
    This matters when the grader is root: the kernel does not enforce RLIMIT_NPROC for host uid 0,
    which is what the sandbox user maps to.
  * rlimits set inside the sandbox before any untrusted code runs (`limits_prelude`): CPU seconds,
    address space, processes, file size, open files, no core dumps.
  * host side: a wall-clock deadline after which the whole process group is SIGKILLed (bwrap is
    PID 1 of the sandbox's PID namespace, so every process inside dies with it), and a cap on the
    bytes read from stdout + stderr (exceeding it kills the sandbox too).

The sandboxed interpreter is the running one (`sys.executable`'s installation), started with
`-I -S -B`: standard library only, no site-packages, no environment, no bytecode writes. This
configuration (every namespace, --disable-userns, seccomp) was verified both as root in a
container and as an unprivileged user with bubblewrap 0.8.

Without bwrap, `run_sandboxed` refuses (`sandbox_error`) unless `SandboxConfig.allow_weak` is set:
then it runs the interpreter directly with the rlimits only (no namespaces, no seccomp), after
logging one loud warning per process. Weak mode is also used when bwrap is installed but cannot
start a sandbox here (see `sandbox_status`). `allow_weak` defaults to the environment variable
NEMOCASCADE_ALLOW_WEAK_SANDBOX ("1"/"true"/"yes" on; "0"/"false"/"no"/unset off; anything else
is a ValueError): the user-facing opt-in, e.g. on macOS, which has no bubblewrap. It reaches the
reward workers, which inherit the environment. Never set it on a shared machine.

`sandbox_status()` says whether the bubblewrap sandbox can run here, by starting a trivial
sandboxed process once per process (bwrap can be installed and still fail, e.g. without user
namespaces), and if not, how to fix it; the launcher's preflight calls it.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import selectors
import shutil
import signal
import subprocess
import sys
import tempfile
import time

from nemocascade.rewards import seccomp

log = logging.getLogger(__name__)
_SHOUTED: set[str] = set()  # messages already shouted in this process
RESULT_FD = "@RESULT_FD@"
_NAMESPACES = (
    "--unshare-all --unshare-user --disable-userns --die-with-parent --new-session "
    "--cap-drop ALL --uid 65534 --gid 65534 --hostname sandbox"
)
_FINISH = (
    "--remount-ro / --chdir /tmp --clearenv --setenv HOME /tmp --setenv PATH /usr/bin:/bin "
    "--setenv LANG C.UTF-8"
)
_RESULT_CAP = 4096
WEAK_SANDBOX_ENV = "NEMOCASCADE_ALLOW_WEAK_SANDBOX"
_STATUS: dict[tuple, tuple[bool, str]] = {}  # sandbox_status probes: (bwrap, cfg) -> (ok, msg)


def weak_sandbox_from_env() -> bool:
    """Whether NEMOCASCADE_ALLOW_WEAK_SANDBOX opts in to the weak (rlimits-only) sandbox."""
    value = os.environ.get(WEAK_SANDBOX_ENV, "").strip().lower()
    if value in ("", "0", "false", "no", "off"):
        return False
    if value in ("1", "true", "yes", "on"):
        return True
    raise ValueError(f"{WEAK_SANDBOX_ENV}={value!r}: expected 1/true/yes or 0/false/no")


@dataclasses.dataclass(frozen=True)
class SandboxConfig:
    """Limits for one sandboxed run. Memory/file sizes are bytes; times are seconds."""

    memory_bytes: int = 1 << 30  # RLIMIT_AS
    max_processes: int = 16  # RLIMIT_NPROC (see module docstring for uid 0)
    file_size_bytes: int = 16 << 20  # RLIMIT_FSIZE
    open_files: int = 64  # RLIMIT_NOFILE
    tmpfs_bytes: int = 64 << 20  # size of the writable /tmp
    output_bytes: int = 4 << 20  # cap on stdout + stderr read by the host
    # without a working bwrap: run with rlimits only instead of refusing (default: the env var
    # WEAK_SANDBOX_ENV, see the module docstring)
    allow_weak: bool = dataclasses.field(default_factory=weak_sandbox_from_env)
    bwrap_path: str | None = None  # default: `bwrap` on PATH


@dataclasses.dataclass
class SandboxRun:
    """What one sandboxed process did. `result` is what it wrote on the private result pipe."""

    returncode: int | None
    stdout: bytes
    stderr: bytes
    result: bytes
    timed_out: bool
    output_exceeded: bool
    wall_s: float
    sandbox_error: str | None = None


@dataclasses.dataclass(frozen=True)
class SandboxStatus:
    """Whether code rewards can run here. `available`: the bubblewrap sandbox started a trivial
    process; `weak_allowed`: without it, code runs with rlimits only (`allow_weak`); `message`:
    "" when available, else one paragraph saying what failed and how to fix it."""

    available: bool
    weak_allowed: bool
    bwrap: str | None
    message: str

    @property
    def usable(self) -> bool:
        """Code rewards will run (sandboxed, or weakly by explicit opt-in)."""
        return self.available or self.weak_allowed


_MISSING_FIX = (
    "bubblewrap (bwrap) is not installed{where}, so code rewards cannot run programs in a "
    "sandbox and every code item is a grader error (sandbox_error), not a verdict. Fix: on "
    "Debian/Ubuntu `apt-get install bubblewrap` (elsewhere on Linux, the distribution's "
    "bubblewrap package). macOS has no bubblewrap: to run code rewards there anyway, with resource "
    "limits only and no isolation from your files and network, set {env}=1 (local experiments "
    "only, never on a shared machine)."
)
_BROKEN_FIX = (
    "bubblewrap ({bwrap}) is installed but could not start a sandbox here ({why}), so every code "
    "item is a grader error (sandbox_error), not a verdict. Usually unprivileged user namespaces "
    "are disabled: enable them (Debian: `sysctl kernel.unprivileged_userns_clone=1`; Ubuntu "
    "24.04+: `sysctl kernel.apparmor_restrict_unprivileged_userns=0`), or run the container with "
    "user namespaces allowed (e.g. docker `--security-opt seccomp=unconfined --security-opt "
    "apparmor=unconfined`). Where that is impossible, {env}=1 runs code with resource limits only "
    "(no isolation)."
)
_WEAK_ON = " Weak mode is ON (allow_weak / {env}): code runs with rlimits only."


def sandbox_status(cfg: SandboxConfig | None = None, *, refresh: bool = False) -> SandboxStatus:
    """Whether the bubblewrap sandbox can run here, found by starting a trivial sandboxed
    process (once per process and bwrap/config; `refresh=True` probes again), and if not, the
    fix (see `SandboxStatus`)."""
    cfg = cfg or SandboxConfig()
    bwrap = find_bwrap(cfg)
    probe_cfg = dataclasses.replace(cfg, allow_weak=False)
    key = (bwrap, probe_cfg)
    if refresh or key not in _STATUS:
        _STATUS[key] = _probe(bwrap, probe_cfg)
    available, message = _STATUS[key]
    if not available and cfg.allow_weak:
        message += _WEAK_ON.format(env=WEAK_SANDBOX_ENV)
    return SandboxStatus(available, cfg.allow_weak, bwrap, message)


def _probe(bwrap: str | None, cfg: SandboxConfig) -> tuple[bool, str]:
    """(started, message) of one trivial sandboxed process."""
    if bwrap is None or not os.path.exists(bwrap):
        where = f" at {cfg.bwrap_path}" if cfg.bwrap_path else ""
        return False, _MISSING_FIX.format(where=where, env=WEAK_SANDBOX_ENV)
    run = run_sandboxed(
        ["-c", "import os, sys; os.write(int(sys.argv[1]), b'ok')", RESULT_FD],
        stdin=b"",
        timeout_s=20.0,
        cfg=cfg,
    )
    if run.sandbox_error is None and not run.timed_out and run.result == b"ok":
        return True, ""
    why = run.sandbox_error or (
        "timed out" if run.timed_out else _last_line(run.stderr) or f"exit code {run.returncode}"
    )
    return False, _BROKEN_FIX.format(bwrap=bwrap, why=why, env=WEAK_SANDBOX_ENV)


def _last_line(b: bytes) -> str:
    lines = b.decode("utf-8", errors="replace").strip().splitlines()
    return lines[-1][:300] if lines else ""


def limits_prelude(cfg: SandboxConfig, cpu_s: float) -> str:
    """Python source that lowers this process's rlimits; runs inside the sandbox before user
    code."""
    cpu = max(1, int(cpu_s) + 1)
    pairs = [
        ("RLIMIT_CPU", cpu),
        ("RLIMIT_AS", cfg.memory_bytes),
        ("RLIMIT_NPROC", cfg.max_processes),
        ("RLIMIT_FSIZE", cfg.file_size_bytes),
        ("RLIMIT_NOFILE", cfg.open_files),
        ("RLIMIT_CORE", 0),
    ]
    lines = ["import resource as _r"]
    lines += [f"_r.setrlimit(_r.{name}, ({value}, {value}))" for name, value in pairs]
    lines.append("del _r")
    return "\n".join(lines) + "\n"


def interpreter() -> tuple[str, str]:
    """(path of the real python binary, installation prefix to bind) for the running interpreter."""
    exe = os.path.realpath(sys.executable)
    prefix = os.path.realpath(sys.base_prefix)
    return exe, prefix


def find_bwrap(cfg: SandboxConfig) -> str | None:
    """Path of the bwrap binary, or None when it is not installed."""
    return cfg.bwrap_path or shutil.which("bwrap")


def _under(path: str, root: str) -> bool:
    return path == root or path.startswith(root.rstrip(os.sep) + os.sep)


def _bwrap_argv(bwrap: str, cfg: SandboxConfig, seccomp_fd: int | None) -> list[str]:
    """bwrap options (up to, not including, the command) for the layout in the module docstring."""
    exe, prefix = interpreter()
    argv = [bwrap, *_NAMESPACES.split(), "--ro-bind", "/usr", "/usr"]
    for top in ("/lib", "/lib32", "/lib64", "/libx32", "/bin", "/sbin"):
        if os.path.islink(top):
            argv += ["--symlink", os.readlink(top), top]
        elif os.path.isdir(top):
            argv += ["--ro-bind", top, top]
    argv += ["--ro-bind-try", "/etc/ld.so.cache", "/etc/ld.so.cache"]
    if not _under(prefix, "/usr"):
        argv += ["--ro-bind", prefix, prefix]
    if not _under(exe, "/usr") and not _under(exe, prefix):
        argv += ["--ro-bind", exe, exe]
    argv += ["--proc", "/proc", "--dev", "/dev", "--remount-ro", "/dev"]
    argv += ["--size", str(cfg.tmpfs_bytes), "--tmpfs", "/tmp", *_FINISH.split()]
    if seccomp_fd is not None:
        argv += ["--seccomp", str(seccomp_fd)]
    return argv


def run_sandboxed(
    python_args: list[str], *, stdin: bytes, timeout_s: float, cfg: SandboxConfig
) -> SandboxRun:
    """Run `python -I -S -B -X utf8 <python_args>` sandboxed and collect what it did.

    The token RESULT_FD in `python_args` is replaced by the number of a write-only pipe that only
    the host reads (the result channel). `stdin` is fed to the process; stdout + stderr are
    collected up to `cfg.output_bytes`. The process group is killed at `timeout_s` (wall clock) or
    when the output cap is exceeded.
    """
    exe, _ = interpreter()
    bwrap = find_bwrap(cfg)
    if bwrap is not None and cfg.allow_weak and not sandbox_status(cfg).available:
        bwrap = None  # installed but unable to start a sandbox here: the opted-in weak mode
    if bwrap is None and not cfg.allow_weak:
        _shout_once(
            "bwrap not found: refusing to run untrusted code (`apt-get install bubblewrap`; "
            f"{WEAK_SANDBOX_ENV}=1 or SandboxConfig.allow_weak=True runs it with rlimits only)"
        )
        return _failed_start("bwrap not found and allow_weak is False")
    res_r, res_w = os.pipe()
    to_close = [res_w]
    tmpdir = None
    try:
        py = [
            exe,
            "-I",
            "-S",
            "-B",
            "-X",
            "utf8",
            *[a.replace(RESULT_FD, str(res_w)) for a in python_args],
        ]
        if bwrap is not None:
            bpf = seccomp.build_filter()
            sc_fd = None
            if bpf is not None:
                sc_fd = _filter_fd(bpf)
                to_close.append(sc_fd)
            argv = _bwrap_argv(bwrap, cfg, sc_fd) + py
            cwd, env = "/", {"PATH": "/usr/bin:/bin"}
        else:
            _shout_once(
                "no working bwrap: running untrusted code with rlimits ONLY (no namespaces, "
                "no seccomp; host files and network are visible) because "
                f"SandboxConfig.allow_weak=True ({WEAK_SANDBOX_ENV}). Never do this for RL "
                "training on a shared machine."
            )
            tmpdir = tempfile.mkdtemp(prefix="nemocascade_weak_")
            argv, cwd = py, tmpdir
            env = {"PATH": "/usr/bin:/bin", "HOME": tmpdir, "LANG": "C.UTF-8"}
        t0 = time.monotonic()
        try:
            proc = subprocess.Popen(
                argv,
                stdin=subprocess.PIPE,
                stdout=subprocess.PIPE,
                stderr=subprocess.PIPE,
                pass_fds=tuple(to_close),
                cwd=cwd,
                env=env,
                start_new_session=True,
            )
        except OSError as e:
            return _failed_start(repr(e))
        for fd in to_close:
            os.close(fd)
        to_close = []
        run = _communicate(proc, res_r, stdin, t0 + timeout_s, cfg.output_bytes)
        run.wall_s = time.monotonic() - t0
        return run
    finally:
        for fd in to_close:
            os.close(fd)
        os.close(res_r)
        if tmpdir is not None:
            shutil.rmtree(tmpdir, ignore_errors=True)


def _failed_start(why: str) -> SandboxRun:
    return SandboxRun(None, b"", b"", b"", False, False, 0.0, sandbox_error=why)


def _shout_once(msg: str) -> None:
    """Log `msg` loudly (logging error + stderr), once per process."""
    if msg not in _SHOUTED:
        _SHOUTED.add(msg)
        log.error("!!! %s !!!", msg)
        print(f"!!! {msg} !!!", file=sys.stderr, flush=True)


def _filter_fd(bpf: bytes) -> int:
    """A readable fd holding `bpf` (a pipe; the filter is a few hundred bytes, below PIPE_BUF)."""
    r, w = os.pipe()
    os.write(w, bpf)
    os.close(w)
    return r


def _kill_group(proc: subprocess.Popen) -> None:
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass


def _drain(sel: selectors.BaseSelector, until: float) -> None:
    """Read and discard until every registered pipe hits EOF (all sandbox processes are gone,
    since each holds them) or `until` passes. Makes the kernel's namespace teardown visible."""
    for key in list(sel.get_map().values()):
        if key.events & selectors.EVENT_WRITE:
            sel.unregister(key.fd)
    while sel.get_map() and time.monotonic() < until:
        for key, _ in sel.select(timeout=max(0.0, until - time.monotonic())):
            try:
                if not os.read(key.fd, 1 << 16):
                    sel.unregister(key.fd)
            except BlockingIOError:
                pass


def _communicate(
    proc: subprocess.Popen, res_r: int, stdin: bytes, deadline: float, cap: int
) -> SandboxRun:
    """Feed stdin, read stdout/stderr/result with a deadline and an output cap; reap the process."""
    out_fd, err_fd, win = proc.stdout.fileno(), proc.stderr.fileno(), proc.stdin.fileno()
    bufs = {out_fd: bytearray(), err_fd: bytearray(), res_r: bytearray()}
    sel = selectors.DefaultSelector()
    for fd in bufs:
        os.set_blocking(fd, False)
        sel.register(fd, selectors.EVENT_READ)
    if stdin:
        os.set_blocking(win, False)
        sel.register(win, selectors.EVENT_WRITE)
    else:
        proc.stdin.close()
    pos, timed_out, exceeded = 0, False, False
    while sel.get_map() and not exceeded:
        left = deadline - time.monotonic()
        if left <= 0:
            timed_out = True
            break
        for key, _ in sel.select(timeout=min(left, 0.5)):
            if key.fd == win:
                try:
                    pos += os.write(win, stdin[pos : pos + 65536])
                except BlockingIOError:
                    continue
                except BrokenPipeError:
                    pos = len(stdin)
                if pos >= len(stdin):
                    sel.unregister(win)
                    proc.stdin.close()
                continue
            try:
                chunk = os.read(key.fd, 65536)
            except BlockingIOError:
                continue
            if not chunk:
                sel.unregister(key.fd)
                continue
            if key.fd == res_r:
                chunk = chunk[: _RESULT_CAP - len(bufs[res_r])]
            bufs[key.fd] += chunk
            if len(bufs[out_fd]) + len(bufs[err_fd]) > cap:
                exceeded = True
                break
    if timed_out or exceeded:
        _kill_group(proc)
        _drain(sel, time.monotonic() + 2.0)
    sel.close()
    try:
        rc = proc.wait(timeout=max(0.5, deadline - time.monotonic()))
    except subprocess.TimeoutExpired:
        _kill_group(proc)
        rc = proc.wait()
        timed_out = True
    for f in (proc.stdin, proc.stdout, proc.stderr):
        try:
            f.close()
        except OSError:
            pass
    return SandboxRun(
        rc,
        bytes(bufs[out_fd][:cap]),
        bytes(bufs[err_fd][:cap]),
        bytes(bufs[res_r]),
        timed_out,
        exceeded,
        0.0,
    )
