"""Score a rollout batch in parallel worker processes with a hard per-item timeout.

Workers are fresh `python -m nemocascade.rewards.worker` processes (no fork of a multithreaded
JAX parent, no re-import of the caller's `__main__`), fed one item at a time over private pipes.
An item whose worker does not answer within `timeout_s` of being handed out gets score 0 and its
worker is killed (which also kills any sandbox it started: bwrap runs with --die-with-parent) and
replaced. A verifier exception, a bad record or a dead
worker also give score 0. Everything is counted in the metrics; nothing is raised.
"""

from __future__ import annotations

import collections
import logging
import os
import subprocess
import sys
import time
from multiprocessing.connection import Connection, wait

from nemocascade.rewards.registry import score_one, verifier_name

log = logging.getLogger(__name__)


def _safe_score(record, response, finished) -> tuple[float, dict, str | None]:
    """(score, details, error) where an exception becomes (0, {...}, "Type: message")."""
    try:
        score, details = score_one(record, response, bool(finished))
        return score, details, None
    except Exception as e:  # noqa: BLE001 - any verifier failure scores 0, never stops training
        err = f"{type(e).__name__}: {e}"[:500]
        return 0.0, {"error": err}, err


class _Worker:
    """A `python -m nemocascade.rewards.worker` child speaking pickles over two private pipes."""

    def __init__(self):
        to_child_r, to_child_w = os.pipe()
        from_child_r, from_child_w = os.pipe()
        pkg_root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
        env = dict(os.environ)
        env["PYTHONPATH"] = os.pathsep.join(p for p in (pkg_root, env.get("PYTHONPATH")) if p)
        try:
            self.proc = subprocess.Popen(
                [
                    sys.executable,
                    "-m",
                    "nemocascade.rewards.worker",
                    str(to_child_r),
                    str(from_child_w),
                ],
                pass_fds=(to_child_r, from_child_w),
                stdin=subprocess.DEVNULL,
                stdout=subprocess.DEVNULL,
                env=env,
            )
        finally:
            os.close(to_child_r)
            os.close(from_child_w)
        self.send = Connection(to_child_w, readable=False)
        self.conn = Connection(from_child_r, writable=False)
        self.item = None  # index being scored
        self.deadline = None

    def kill(self) -> None:
        self.proc.kill()
        self.proc.wait()
        self.close()

    def close(self) -> None:
        self.send.close()
        self.conn.close()


def score_batch(
    records: list[dict],
    responses: list[str],
    finished: list[bool] | None = None,
    *,
    num_workers: int = 2,
    timeout_s: float = 60.0,
) -> tuple[list[float], list[dict], dict]:
    """Scores in [0, 1], per-item details, and batch metrics for aligned records / responses.

    `finished[i]` is False for a response cut at the length limit (scores 0); None means all
    finished. `num_workers=0` scores in this process (no hard timeout; for debugging).
    """
    n = len(records)
    if len(responses) != n or (finished is not None and len(finished) != n):
        raise ValueError(
            f"score_batch: {n} records, {len(responses)} responses, "
            f"{None if finished is None else len(finished)} finished flags"
        )
    finished = [True] * n if finished is None else [bool(f) for f in finished]
    t0 = time.monotonic()
    out: list = [None] * n
    if num_workers <= 0 or n == 0:
        for i in range(n):
            out[i] = _safe_score(records[i], responses[i], finished[i])
    else:
        try:
            _run_pool(records, responses, finished, out, min(num_workers, n), timeout_s)
        except OSError as e:  # cannot start workers (fd / process limits): score what is left here
            log.error("score_batch: worker pool failed (%r); scoring the rest in-process", e)
            for i in range(n):
                if out[i] is None:
                    out[i] = _safe_score(records[i], responses[i], finished[i])
    scores = [o[0] for o in out]
    details = [o[1] for o in out]
    return scores, details, _metrics(records, scores, details, finished, time.monotonic() - t0)


def _run_pool(records, responses, finished, out, num_workers, timeout_s) -> None:
    todo = collections.deque(range(len(records)))
    workers = [_Worker() for _ in range(num_workers)]
    try:
        while todo or any(w.item is not None for w in workers):
            for _k, w in enumerate(workers):
                if w.item is None and todo:
                    i = todo.popleft()
                    try:
                        w.send.send((i, records[i], responses[i], finished[i]))
                    except Exception as e:  # noqa: BLE001 - unpicklable record or dead worker
                        out[i] = (0.0, {"error": f"send failed: {e!r}"[:500]}, "send")
                        continue
                    w.item, w.deadline = i, time.monotonic() + timeout_s
            busy = [w for w in workers if w.item is not None]
            if not busy:
                continue
            left = max(0.0, min(w.deadline for w in busy) - time.monotonic())
            ready = wait([w.conn for w in busy], timeout=left)
            now = time.monotonic()
            for k, w in enumerate(workers):
                if w.item is None:
                    continue
                if w.conn in ready:
                    try:
                        i, score, det, err = w.conn.recv()
                        out[i] = (score, det, err)
                        w.item = None
                        continue
                    except (EOFError, OSError):
                        out[w.item] = (0.0, {"error": "worker died"}, "worker died")
                elif now >= w.deadline:
                    out[w.item] = (
                        0.0,
                        {"error": f"timeout after {timeout_s}s", "timeout": True},
                        "timeout",
                    )
                else:
                    continue
                w.kill()
                workers[k] = _Worker()
    finally:
        for w in workers:
            try:
                w.send.send(None)
            except OSError:
                w.kill()  # already gone or stuck
        for w in workers:
            try:
                w.proc.wait(2)
                w.close()
            except subprocess.TimeoutExpired:
                w.kill()


def _metrics(records, scores, details, finished, wall_s) -> dict:
    """Batch metrics: mean reward overall and per verifier, error / timeout / truncation counts."""
    n = len(scores)
    m = {
        "rewards/mean": sum(scores) / n if n else 0.0,
        "rewards/count": n,
        "rewards/truncated": sum(not f for f in finished),
        "rewards/errors": sum("error" in d and not d.get("timeout") for d in details),
        "rewards/timeouts": sum(bool(d.get("timeout")) for d in details),
        "rewards/wall_s": wall_s,
        "rewards/items_per_s": n / wall_s if wall_s > 0 else 0.0,
    }
    by_name = collections.defaultdict(list)
    for rec, s in zip(records, scores, strict=True):
        try:
            by_name[verifier_name(rec)].append(s)
        except (ValueError, TypeError):
            by_name["invalid"].append(s)
    for name, vals in sorted(by_name.items()):
        m[f"rewards/mean/{name}"] = sum(vals) / len(vals)
    return m
