"""Run logs: `metrics.jsonl` (one JSON record per step) and TensorBoard events, process 0 only.

Every record has `step` (the number of updates done, 1-based) and the step's scalars. When a run
resumes from a checkpoint at step s, records with step > s (written after that checkpoint by
the interrupted run) are dropped, so the file always describes exactly the steps the final
parameters went through.
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Mapping
from typing import Any

METRICS_FILE = "metrics.jsonl"
TB_DIR = "tb"


def _scalar(v: Any) -> float | int:
    if hasattr(v, "item"):
        v = v.item()
    if isinstance(v, bool):
        return int(v)
    return v if isinstance(v, int) else float(v)


def _json_value(v: float) -> float | int | str:
    if isinstance(v, float) and not math.isfinite(v):
        return str(v)  # "nan" / "inf": strict JSON has no NaN
    return v


def read_metrics(workdir: str | os.PathLike) -> list[dict[str, Any]]:
    """All records of `<workdir>/metrics.jsonl` (empty if the file does not exist)."""
    path = os.path.join(os.fspath(workdir), METRICS_FILE)
    if not os.path.exists(path):
        return []
    with open(path) as f:
        return [json.loads(line) for line in f if line.strip()]


class MetricsWriter:
    """Appends per-step records to metrics.jsonl and TensorBoard; a no-op when not enabled."""

    def __init__(
        self,
        workdir: str | os.PathLike,
        *,
        enabled: bool,
        resume_step: int = 0,
        tensorboard: bool = True,
    ):
        self.enabled = enabled
        self._file = None
        self._tb = None
        if not enabled:
            return
        workdir = os.fspath(workdir)
        os.makedirs(workdir, exist_ok=True)
        path = os.path.join(workdir, METRICS_FILE)
        kept = [r for r in read_metrics(workdir) if r["step"] <= resume_step]
        with open(path, "w") as f:  # rewrite: drop records beyond the checkpoint resumed from
            f.writelines(json.dumps(r) + "\n" for r in kept)
        self._file = open(path, "a")  # noqa: SIM115 - held open for the run, closed in close()
        if tensorboard:
            from tensorboardX import SummaryWriter  # imported lazily: only process 0 needs it

            self._tb = SummaryWriter(logdir=os.path.join(workdir, TB_DIR))

    def write(self, step: int, metrics: Mapping[str, Any]) -> dict[str, Any]:
        """Log one record; returns it (with python scalars)."""
        record = {"step": int(step), **{k: _scalar(v) for k, v in metrics.items()}}
        if not self.enabled:
            return record
        self._file.write(json.dumps({k: _json_value(v) for k, v in record.items()}) + "\n")
        self._file.flush()
        if self._tb is not None:
            for k, v in record.items():
                if k != "step":
                    self._tb.add_scalar(k, v, global_step=int(step))
        return record

    def close(self) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None
        if self._tb is not None:
            self._tb.close()
            self._tb = None
