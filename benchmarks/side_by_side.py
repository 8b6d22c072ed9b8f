"""Side-by-side timing of our programs and transformers', each side in a process of its own.

Used by `train_step.py` and `generate.py`. Measured in one process, torch's and XLA's thread
pools fight for the same cores (transformers' train step once took 79-157 s there instead of
~10 s alone), so the parent here runs neither library: it starts one worker process per side
(`python benchmarks/<script>.py --side=ours|transformers ...`), sets the workers up one after
the other (loading, compiling and warm-up are timed and reported apart), then asks them in turn
to run one timed call each: ours, theirs, ours, theirs, ... While one side runs, the other is
blocked reading its stdin and uses no CPU. The parent sleeps `gap_s` before each timed call so
the previous worker's spinning pool threads have gone to sleep.

Threads. Both workers get the same `threads` (default: every CPU this process may run on):

  env       OMP_NUM_THREADS, MKL_NUM_THREADS, OPENBLAS_NUM_THREADS = threads;
            XLA_FLAGS += --xla_cpu_multi_thread_eigen=true (XLA:CPU's default, made explicit);
            JAX_PLATFORMS=cpu, TOKENIZERS_PARALLELISM=false
  affinity  both workers are pinned (`os.sched_setaffinity`, before the worker starts) to the
            same first `threads` CPUs of the parent's set. XLA:CPU sizes its intra-op (Eigen)
            pool from the affinity mask (`intra_op_parallelism_threads=N` in XLA_FLAGS is
            accepted and ignored by this jaxlib), so pinning is what sets JAX's thread count;
            with `threads` = all CPUs the pin changes nothing.
  torch     `torch.set_num_threads(threads)` and `torch.set_num_interop_threads(threads)` in
            the transformers worker (`set_torch_threads`).

Each worker reports the counts it actually runs with (`worker_threads`: the XLA Eigen pool
threads counted in /proc/self/task, torch's intra/inter-op threads).

Protocol: the parent writes one JSON object per line to the worker's stdin ({"op": ..., ...});
the worker answers one JSON line on its original stdout (everything the libraries print goes to
stderr, which the worker shares with the parent). An error in the worker is answered with its
traceback and raised in the parent.
"""

from __future__ import annotations

import json
import os
import platform
import statistics
import subprocess
import sys
import time
import traceback
from collections.abc import Callable
from importlib import metadata
from pathlib import Path

SIDES = ("ours", "transformers")


# ----------------------------------------------------------------------------- machine
def cpu_set(threads: int | None = None) -> list[int]:
    """The first `threads` CPUs this process may run on (all of them when None)."""
    cpus = sorted(os.sched_getaffinity(0))
    if threads is not None and not 1 <= threads <= len(cpus):
        raise ValueError(f"threads={threads}: this process may run on {len(cpus)} CPUs")
    return cpus[: threads or len(cpus)]


def thread_env(threads: int) -> dict[str, str]:
    """The environment variables set (identically) for both workers."""
    flags = os.environ.get("XLA_FLAGS", "")
    if "xla_cpu_multi_thread_eigen" not in flags:
        flags = f"{flags} --xla_cpu_multi_thread_eigen=true".strip()
    n = str(threads)
    return {
        "OMP_NUM_THREADS": n,
        "MKL_NUM_THREADS": n,
        "OPENBLAS_NUM_THREADS": n,
        "XLA_FLAGS": flags,
        "JAX_PLATFORMS": "cpu",
        "TOKENIZERS_PARALLELISM": "false",
    }


def machine_info() -> dict:
    """CPU model, core counts, memory and load average (a loaded machine is recognisable)."""
    fields: dict[str, set] = {}
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            key, _, val = line.partition(":")
            fields.setdefault(key.strip(), set()).add(val.strip())
    except OSError:
        pass
    mem_kb = None
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal:"):
                mem_kb = int(line.split()[1])
    except OSError:
        pass
    cores_per_socket = fields.get("cpu cores", {"0"})
    return {
        "cpu_model": sorted(fields.get("model name", {platform.processor() or "unknown"}))[0],
        "physical_cores": int(max(cores_per_socket)) * len(fields.get("physical id", {0})),
        "os_cpu_count": os.cpu_count(),
        "cpus_allowed": len(os.sched_getaffinity(0)),
        "avx512": any("avx512f" in f.split() for f in fields.get("flags", set())),
        "mem_total_gib": round(mem_kb / 2**20, 1) if mem_kb else None,
        "loadavg": [round(x, 2) for x in os.getloadavg()],
        "platform": platform.platform(),
    }


def library_versions() -> dict:
    """Versions of the libraries on both sides (read from package metadata, nothing imported)."""
    out = {"python": platform.python_version()}
    for pkg in ("jax", "jaxlib", "flax", "optax", "numpy", "torch", "transformers"):
        try:
            out[pkg] = metadata.version(pkg)
        except metadata.PackageNotFoundError:
            out[pkg] = None
    return out


def worker_threads() -> dict:
    """Thread counts as this worker runs: XLA's Eigen pool (counted) and torch's (if imported)."""
    names = []
    for tid in os.listdir("/proc/self/task"):
        try:
            names.append(Path(f"/proc/self/task/{tid}/comm").read_text().strip())
        except OSError:
            continue
    out = {
        "cpu_affinity": sorted(os.sched_getaffinity(0)),
        "os_threads": len(names),
        "env": {k: os.environ.get(k) for k in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "XLA_FLAGS")},
    }
    eigen = sum(n.startswith("tf_XLAEigen") for n in names)
    if eigen:  # the pool exists once a jax backend has been initialised (ours only)
        out["xla_eigen_threads"] = eigen
    if "torch" in sys.modules:
        torch = sys.modules["torch"]
        out["torch_num_threads"] = torch.get_num_threads()
        out["torch_num_interop_threads"] = torch.get_num_interop_threads()
    return out


def set_torch_threads(threads: int) -> None:
    """The transformers worker's torch thread pools (intra-op and inter-op) = `threads`."""
    import torch

    torch.set_num_threads(threads)
    torch.set_num_interop_threads(threads)


def start_transformers_worker(threads: int) -> None:
    """The transformers worker's setup: torch's thread pools = `threads`, no progress bars."""
    import transformers

    set_torch_threads(threads)
    transformers.utils.logging.disable_progress_bar()


def load_transformers(ckpt: str):
    """(seconds, model): the checkpoint loaded with `AutoModelForCausalLM` in fp32."""
    import torch
    import transformers

    return timed(
        lambda: transformers.AutoModelForCausalLM.from_pretrained(ckpt, dtype=torch.float32)
    )


# ----------------------------------------------------------------------------- parent side
class Worker:
    """One side's worker process (`python <script> --side=<side> <args>`), spoken to by `call`."""

    def __init__(self, script: Path, side: str, threads: int, args: tuple[str, ...] = ()):
        if side not in SIDES:
            raise ValueError(f"side {side!r} not in {SIDES}")
        self.side = side
        cpus = cpu_set(threads)
        env = {**os.environ, **thread_env(threads)}
        root = str(Path(__file__).resolve().parents[1])
        env["PYTHONPATH"] = os.pathsep.join(filter(None, [root, env.get("PYTHONPATH")]))
        # A trampoline pins the child before it execs the worker, so every thread it ever
        # creates inherits the CPU set (no preexec_fn: unsafe in a parent that has threads).
        pin = (
            f"import os, sys; os.sched_setaffinity(0, {cpus}); os.execv(sys.argv[1], sys.argv[1:])"
        )
        self.proc = subprocess.Popen(
            [sys.executable, "-c", pin, sys.executable, str(script), f"--side={side}"]
            + [f"--threads={threads}", *args],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
            env=env,
        )

    def call(self, op: str, **kw) -> dict:
        """Sends one request; returns the worker's answer (raises on a worker error or exit)."""
        self.proc.stdin.write(json.dumps({"op": op, **kw}) + "\n")
        self.proc.stdin.flush()
        line = self.proc.stdout.readline()
        if not line:
            rc = self.proc.wait()
            raise RuntimeError(f"{self.side} worker exited ({rc}) during {op!r}")
        reply = json.loads(line)
        if "error" in reply:
            raise RuntimeError(f"{self.side} worker failed in {op!r}:\n{reply['error']}")
        return reply

    def close(self) -> None:
        if self.proc.poll() is None:
            try:
                self.call("exit")
            except (RuntimeError, BrokenPipeError, ValueError):
                pass
            try:
                self.proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.proc.kill()


def summarize(times: list[float]) -> dict:
    return {
        "median_s": statistics.median(times),
        "min_s": min(times),
        "max_s": max(times),
        "times_s": [round(t, 4) for t in times],
    }


def interleaved(
    workers: dict[str, Worker], jobs: list[tuple[str, str]], rounds: int, gap_s: float
) -> tuple[dict, list]:
    """`rounds` rounds; in each, every (side, job) of `jobs` runs once, in that order (ours,
    theirs, ours, theirs, ...). Returns ({"<side>/<job>": summary with "replies" (each call's
    answer, its seconds under "s")}, the load average after each round)."""
    replies: dict[str, list[dict]] = {f"{s}/{j}": [] for s, j in jobs}
    loads = []
    for r in range(rounds):
        for side, job in jobs:
            time.sleep(gap_s)
            replies[f"{side}/{job}"].append(workers[side].call("time", job=job))
        loads.append([round(x, 2) for x in os.getloadavg()])
        last = ", ".join(f"{k} {v[-1]['s']:.3f}s" for k, v in replies.items())
        print(f"round {r + 1}/{rounds}: {last}", flush=True)
    return {k: {**summarize([x["s"] for x in v]), "replies": v} for k, v in replies.items()}, loads


def paired_ratios(times_a: list[float], times_b: list[float]) -> dict:
    """Speed ratio of A over B (time_b / time_a) round by round, and its median."""
    per_round = [b / a for a, b in zip(times_a, times_b, strict=True)]
    return {"median": statistics.median(per_round), "per_round": [round(x, 4) for x in per_round]}


# ----------------------------------------------------------------------------- worker side
def serve(handlers: dict[str, Callable[..., dict]]) -> None:
    """The worker loop: one JSON request per stdin line -> one JSON answer on the original
    stdout. Library prints are redirected to stderr so they cannot corrupt the protocol."""
    proto = os.fdopen(os.dup(1), "w", buffering=1)
    os.dup2(2, 1)
    for line in sys.stdin:
        req = json.loads(line)
        op = req.pop("op")
        if op == "exit":
            proto.write(json.dumps({"ok": True}) + "\n")
            return
        try:
            reply = handlers[op](**req)
        except Exception:  # noqa: BLE001  (the parent raises it with the traceback)
            reply = {"error": traceback.format_exc()}
        proto.write(json.dumps(reply, default=float) + "\n")


def timed(fn: Callable[[], object]) -> tuple[float, object]:
    """(seconds, result) of one call."""
    t0 = time.perf_counter()
    out = fn()
    return time.perf_counter() - t0, out


# ----------------------------------------------------------------------------- transformers
ATTN_IMPLS = ("sdpa", "eager")
EXPERTS_IMPLS = ("grouped_mm", "batched_mm", "eager")  # transformers 5.x `experts_implementation`


def batched_mm_gather_bytes(hf_config, routed_tokens: int, train: bool) -> int:
    """Bytes `batched_mm` gathers: one [F, D] up and one [D, F] down weight copy per (token,
    expert) pair (fp32), kept for the backward when training."""
    pairs = routed_tokens * hf_config.num_experts_per_tok
    per_pair = 2 * hf_config.hidden_size * hf_config.moe_intermediate_size * 4
    return pairs * per_pair * (2 if train else 1)


def set_impl(model, attn: str, experts: str) -> None:
    """Switches a loaded transformers model's attention and experts implementations."""
    if model.config._attn_implementation != attn:
        model.set_attn_implementation(attn)
    if model.config._experts_implementation != experts:
        model.set_experts_implementation(experts)


def select_impl(
    model,
    fn: Callable[[], object],
    *,
    gather_bytes: int,
    max_gather_bytes: int,
    check: Callable[[object], dict] | None = None,
    first_fn: Callable[[], object] | None = None,
) -> dict:
    """Times `fn` under every (attention, experts) implementation (one warm-up call, then one
    timed) and leaves the model on the fastest. `batched_mm` is skipped when it would gather
    more than `max_gather_bytes` of expert weights. The warm-up call is `first_fn` if given
    (the same work, returning what the guard needs); `check(its output)` adds guard fields
    (e.g. the logit difference to ours) to the candidate's record. Returns {"chosen": {"attn",
    "experts"}, "candidates": [...]}."""
    cands = []
    for attn in ATTN_IMPLS:
        for experts in EXPERTS_IMPLS:
            rec: dict = {"attn": attn, "experts": experts}
            if experts == "batched_mm" and gather_bytes > max_gather_bytes:
                rec["skipped"] = (
                    f"would gather {gather_bytes / 2**30:.1f} GiB of expert weights "
                    f"(> {max_gather_bytes / 2**30:.1f} GiB)"
                )
                cands.append(rec)
                continue
            set_impl(model, attn, experts)
            rec["first_s"], out = timed(first_fn or fn)
            if check is not None:
                rec.update(check(out))
            rec["s"], _ = timed(fn)
            cands.append(rec)
            print(f"transformers candidate {rec}", flush=True)
    best = min((c for c in cands if "s" in c), key=lambda c: c["s"])
    set_impl(model, best["attn"], best["experts"])
    return {"chosen": {"attn": best["attn"], "experts": best["experts"]}, "candidates": cands}
