"""A memo of verifier verdicts for identical (record, response) pairs.

RL groups and greedy evaluation repeat responses often, and a code verdict costs a sandboxed
process. Only real verdicts (status "ok", right or wrong) are kept: an item the grader failed on
(a timeout, a sandbox that did not start, a verifier exception; see `batch.ERROR_KINDS`) is never
cached, so the next call scores it again instead of remembering a meaningless 0.

The key is a SHA-1 of the record's `verifier` and `domain`, the response, `finished`, and the
`thinking` flag (the same response can be right without the thinking rule and wrong with it).
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Sequence
from typing import Any, NamedTuple

import numpy as np

from nemocascade.rewards.batch import grade_batch


class CachedScores(NamedTuple):
    """`scores [N] float32` (0 where `errors`), `errors [N] bool` (no verdict: ignore the score),
    and metrics (`scored`, `reused`, `errors` plus the numeric `rewards/*` metrics of the items
    scored now)."""

    scores: np.ndarray
    errors: np.ndarray
    metrics: dict[str, Any]


class RewardCache:
    """Memoises verdicts (see the module docstring); cleared whole when it exceeds `max_items`."""

    def __init__(self, max_items: int = 200_000):
        self._scores: dict[str, float] = {}
        self.max_items = max_items
        self.hits = 0

    def __len__(self) -> int:
        return len(self._scores)

    @staticmethod
    def key(record: dict, response: str, finished: bool, thinking: bool = False) -> str:
        blob = json.dumps(
            [record.get("verifier"), record.get("domain"), response, bool(finished), thinking],
            sort_keys=True,
            default=str,
        )
        return hashlib.sha1(blob.encode()).hexdigest()

    def score(
        self,
        records: Sequence[dict],
        responses: Sequence[str],
        finished: Sequence[bool],
        *,
        num_workers: int,
        timeout_s: float,
        thinking: bool = False,
    ) -> CachedScores:
        """Scores of every item, reusing cached verdicts and scoring each distinct new pair once
        (`grade_batch`); errored items are reported in the mask and left out of the cache."""
        thinking = bool(thinking)
        keys = [
            self.key(r, s, bool(f), thinking)
            for r, s, f in zip(records, responses, finished, strict=True)
        ]
        todo: dict[str, int] = {}
        for i, k in enumerate(keys):
            if k not in self._scores and k not in todo:
                todo[k] = i
        metrics: dict[str, Any] = {"scored": len(todo), "reused": len(keys) - len(todo)}
        scores = np.zeros(len(keys), np.float32)
        errors = np.zeros(len(keys), bool)
        for i, k in enumerate(keys):
            if k not in todo:
                scores[i] = self._scores[k]
        if todo:
            idx = list(todo.values())
            res = grade_batch(
                [records[i] for i in idx],
                [responses[i] for i in idx],
                [bool(finished[i]) for i in idx],
                num_workers=num_workers,
                timeout_s=timeout_s,
                thinking=thinking,
            )
            metrics.update({k: v for k, v in res.metrics.items() if isinstance(v, (int, float))})
            fresh = {k: (s, e) for k, s, e in zip(todo, res.scores, res.errors, strict=True)}
            for i, k in enumerate(keys):
                if k in fresh:
                    scores[i], errors[i] = fresh[k]
            if len(self._scores) > self.max_items:
                self._scores.clear()
            self._scores.update({k: float(s) for k, (s, e) in fresh.items() if not e})
        self.hits += metrics["reused"]
        metrics["errors"] = int(errors.sum())
        return CachedScores(scores, errors, metrics)
