"""Score a rollout batch in parallel worker processes with a hard per-item timeout.

Workers are fresh `python -m nemocascade.rewards.worker` processes (no fork of a multithreaded
JAX parent, no re-import of the caller's `__main__`), fed one item at a time over private pipes.

Every item ends with a status: "ok" (a real verdict: a wrong answer, a truncated response, a
program that fails its tests or runs past its own sandbox time limit all score 0 with status ok)
or "error" (the grader failed; the score is 0 but means nothing). An error has a kind, one of
ERROR_KINDS:
  * timeout: the worker did not answer within `timeout_s` of being handed the item; it is killed
    (which also kills any sandbox it started: bwrap runs with --die-with-parent) and replaced;
  * worker_died: the worker exited while scoring the item, or could not be handed it twice;
  * sandbox_error: the code sandbox could not start (see `sandbox.sandbox_status()`);
  * bad_record: no verifier for the record, a malformed verifier spec, an unpicklable record;
  * unsupported: the record asks for something its verifier does not implement;
  * exception: the verifier raised anything else.
Nothing is raised: `grade_batch` returns a `ScoredBatch` whose `errors` mask says which scores
to ignore; `score_batch` keeps the older (scores, details, metrics) shape, where the status is in
`details[i]["reward_status"]` and, for errors, the cause in `details[i]["error"]` and
`details[i]["error_kind"]`. Metrics count errors in total, by kind and by verifier.
"""

from __future__ import annotations

import collections
import dataclasses
import logging
import os
import subprocess
import sys
import time
from multiprocessing.connection import Connection, wait

from nemocascade.rewards.registry import VerifierError, get_verifier, score_one, verifier_name

log = logging.getLogger(__name__)

ERROR_KINDS = (
    "timeout",
    "worker_died",
    "sandbox_error",
    "bad_record",
    "unsupported",
    "exception",
)


@dataclasses.dataclass(frozen=True)
class ScoredBatch:
    """Scores of a batch with the mask of items the grader failed on (`errors[i]`: the score is
    a placeholder 0, not a verdict), per-item details and batch metrics."""

    scores: list[float]
    errors: list[bool]
    details: list[dict]
    metrics: dict

    @property
    def status(self) -> list[str]:
        """Per item: "ok" (a verdict, right or wrong) or "error" (no verdict)."""
        return ["error" if e else "ok" for e in self.errors]

    @property
    def error_kinds(self) -> list[str | None]:
        """Per item: the error kind (one of ERROR_KINDS), or None for an ok item."""
        pairs = zip(self.errors, self.details, strict=True)
        return [d.get("error_kind") if e else None for e, d in pairs]


def _error(kind: str, message: str, **extra) -> tuple[float, dict, str]:
    message = message[:500]
    details = {"reward_status": "error", "error": message, "error_kind": kind, **extra}
    return 0.0, details, kind


def _safe_score(record, response, finished, thinking=False) -> tuple[float, dict, str | None]:
    """(score, details, error kind or None); never raises (see the module docstring)."""
    try:
        get_verifier(verifier_name(record))
    except (TypeError, ValueError, KeyError) as e:
        return _error("bad_record", f"{type(e).__name__}: {e}")
    try:
        score, details = score_one(record, response, bool(finished), thinking=bool(thinking))
    except Exception as e:  # noqa: BLE001 - any verifier failure is an error, never stops training
        kind = e.kind if isinstance(e, VerifierError) else "exception"
        return _error(kind, f"{type(e).__name__}: {e}", verifier=verifier_name(record))
    return score, {**details, "reward_status": "ok"}, None


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


def grade_batch(
    records: list[dict],
    responses: list[str],
    finished: list[bool] | None = None,
    *,
    num_workers: int = 2,
    timeout_s: float = 60.0,
    thinking: bool = False,
) -> ScoredBatch:
    """Scores in [0, 1] with the error mask, per-item details and batch metrics.

    `finished[i]` is False for a response cut at the length limit (scores 0); None means all
    finished. `thinking=True`: every prompt ended with `<think>\\n` (see `score_one`).
    `num_workers=0` scores in this process (no hard timeout; for debugging).
    """
    n = len(records)
    if len(responses) != n or (finished is not None and len(finished) != n):
        raise ValueError(
            f"score_batch: {n} records, {len(responses)} responses, "
            f"{None if finished is None else len(finished)} finished flags"
        )
    finished = [True] * n if finished is None else [bool(f) for f in finished]
    thinking = bool(thinking)
    t0 = time.monotonic()
    out: list = [None] * n
    if num_workers <= 0 or n == 0:
        for i in range(n):
            out[i] = _safe_score(records[i], responses[i], finished[i], thinking)
    else:
        try:
            _run_pool(records, responses, finished, thinking, out, min(num_workers, n), timeout_s)
        except OSError as e:  # cannot start workers (fd / process limits): score what is left here
            log.error("score_batch: worker pool failed (%r); scoring the rest in-process", e)
            for i in range(n):
                if out[i] is None:
                    out[i] = _safe_score(records[i], responses[i], finished[i], thinking)
    scores = [o[0] for o in out]
    details = [o[1] for o in out]
    kinds = [o[2] for o in out]
    metrics = _metrics(records, scores, kinds, finished, time.monotonic() - t0)
    return ScoredBatch(scores, [k is not None for k in kinds], details, metrics)


def score_batch(
    records: list[dict],
    responses: list[str],
    finished: list[bool] | None = None,
    *,
    num_workers: int = 2,
    timeout_s: float = 60.0,
    thinking: bool = False,
) -> tuple[list[float], list[dict], dict]:
    """`grade_batch` in the older (scores, details, metrics) shape: an item the grader failed on
    scores 0 with `details[i]["reward_status"] == "error"`; prefer `grade_batch`'s mask."""
    res = grade_batch(
        records,
        responses,
        finished,
        num_workers=num_workers,
        timeout_s=timeout_s,
        thinking=thinking,
    )
    return res.scores, res.details, res.metrics


def _run_pool(records, responses, finished, thinking, out, num_workers, timeout_s) -> None:
    todo = collections.deque(range(len(records)))
    resent: set[int] = set()  # items whose first worker was found dead before taking them
    workers = [_Worker() for _ in range(num_workers)]
    try:
        while todo or any(w.item is not None for w in workers):
            for k, w in enumerate(workers):
                if w.item is None and todo:
                    i = todo.popleft()
                    try:
                        w.send.send((i, records[i], responses[i], finished[i], thinking))
                    except OSError as e:  # the idle worker is gone: replace it, retry once
                        w.kill()
                        workers[k] = _Worker()
                        if i in resent:
                            out[i] = _error("worker_died", f"could not hand out the item: {e!r}")
                        else:
                            resent.add(i)
                            todo.appendleft(i)
                        continue
                    except Exception as e:  # noqa: BLE001 - unpicklable record
                        out[i] = _error("bad_record", f"cannot send the record: {e!r}")
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
                        i, score, det, kind = w.conn.recv()
                        out[i] = (score, det, kind)
                        w.item = None
                        continue
                    except (EOFError, OSError):
                        out[w.item] = _error("worker_died", "the worker died while scoring")
                elif now >= w.deadline:
                    out[w.item] = _error(
                        "timeout", f"no verdict within {timeout_s}s (worker killed)", timeout=True
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


def _metrics(records, scores, kinds, finished, wall_s) -> dict:
    """Batch metrics: mean reward overall and per verifier; error counts in total, by kind and by
    verifier; truncations; throughput."""
    n = len(scores)
    ok = [s for s, k in zip(scores, kinds, strict=True) if k is None]
    m = {
        "rewards/mean": sum(scores) / n if n else 0.0,
        "rewards/mean_ok": sum(ok) / len(ok) if ok else 0.0,
        "rewards/count": n,
        "rewards/truncated": sum(not f for f in finished),
        "rewards/errors": sum(k is not None for k in kinds),
        "rewards/timeouts": sum(k == "timeout" for k in kinds),
        "rewards/wall_s": wall_s,
        "rewards/items_per_s": n / wall_s if wall_s > 0 else 0.0,
    }
    for kind in ERROR_KINDS:
        m[f"rewards/errors/kind/{kind}"] = sum(k == kind for k in kinds)
    by_name = collections.defaultdict(list)
    for rec, s, k in zip(records, scores, kinds, strict=True):
        try:
            name = verifier_name(rec)
        except (ValueError, TypeError):
            name = "invalid"
        by_name[name].append((s, k))
    for name, vals in sorted(by_name.items()):
        m[f"rewards/mean/{name}"] = sum(s for s, _ in vals) / len(vals)
        m[f"rewards/errors/verifier/{name}"] = sum(k is not None for _, k in vals)
    return m
