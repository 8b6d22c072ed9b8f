"""The one sharded train loop, for every stage kind (SFT, GRPO, MOPD, reward models).

A stage supplies a batch source and a pure step `step_fn(state, batch, *step_args) -> (state,
metrics)`; everything else happens here, once:

  1. the abstract train state and its shardings (the logical-axis table);
  2. resume from the newest readable checkpoint, else the initial state laid out in those
     shardings;
  3. the step jitted once, explicit shardings, the state donated (`step_args`: extra traced
     inputs such as MOPD teachers' weights, passed every call, never baked in as constants);
  4. per step: `source.next_batch(state, step)` (an iterator for SFT; for RL, rollouts sampled
     and scored with the current state) -> device arrays (`sharding.device_batch`) -> step. The
     previous step's metrics are fetched and logged one step late, so the device never waits on
     the host; NaN/Inf updates are skipped by the step and counted here, and too many in a row
     abort with `NonFiniteError`;
  5. `eval_fn(state)` every `eval_every` steps (and at checkpoints when `eval_on_checkpoint`);
     checkpoints every `checkpoint_every` steps, at the last step and on SIGTERM, which then
     returns with `preempted=True`; a progress bar, `metrics.jsonl` and TensorBoard;
  6. `until(eval metrics)`: an early stop sized by a measured score (e.g. an SFT that ends
     once a held-out accuracy is reached): the step is checkpointed and the loop returns with
     `stopped_early=True`; a rerun restores that checkpoint, sees the same record and stops.

Running again on a finished workdir restores the last checkpoint and does no step.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import signal
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from typing import Any, Protocol

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding

from nemocascade.sharding import device_batch, state_shardings
from nemocascade.train.checkpoint import Checkpointer, abstract_with_shardings
from nemocascade.train.metrics import MetricsWriter, read_metrics
from nemocascade.typed_config import from_mapping

log = logging.getLogger(__name__)

CHECKPOINT_DIR = "checkpoints"
HostBatch = Mapping[str, np.ndarray]


class BatchSource(Protocol):
    """Where a stage's batches come from.

    `next_batch(state, step)` returns `(batch or None, host metrics)`: the host arrays of the
    step's update (None: no update this step, e.g. every RL group was filtered out) and scalars
    for the step's record (rollout rewards, timings). `process_local`: True if each process
    yields only its own rows, False if every process yields the whole batch. `get_state` /
    `set_state` make the source resumable (saved with every checkpoint)."""

    process_local: bool

    def next_batch(self, state: Any, step: int) -> tuple[HostBatch | None, dict[str, Any]]: ...
    def get_state(self) -> dict: ...
    def set_state(self, state: dict) -> None: ...


class IteratorSource:
    """A `BatchSource` over a data iterator (e.g. grain's `DatasetIterator`): one batch per
    step, whatever the state; its position is checkpointed."""

    process_local = True

    def __init__(self, iterator):
        self.iterator = iterator

    def next_batch(self, state: Any, step: int) -> tuple[HostBatch, dict[str, Any]]:
        del state, step
        return next(self.iterator), {}

    def get_state(self) -> dict:
        return self.iterator.get_state()

    def set_state(self, state: dict) -> None:
        self.iterator.set_state(state)


@dataclasses.dataclass(frozen=True)
class LoopConfig:
    """The `train` section of a config (every key is required to be one of these)."""

    steps: int = 100
    checkpoint_every: int = 50
    keep_checkpoints: int = 2  # the newest N, plus the best by best_metric
    best_metric: str = "loss"  # a key of the step record (e.g. eval_loss); "" keeps no best
    best_mode: str = "min"
    eval_every: int = 0  # 0: evaluate only at checkpoints and at the end (if an eval_fn is given)
    max_consecutive_skips: int = 10
    progress: bool = True
    async_checkpoint: bool = True

    def __post_init__(self):
        for key in ("steps", "checkpoint_every", "keep_checkpoints", "max_consecutive_skips"):
            if getattr(self, key) < 1:
                raise ValueError(f"train.{key} must be >= 1, got {getattr(self, key)}")
        if self.eval_every < 0:
            raise ValueError(f"train.eval_every must be >= 0, got {self.eval_every}")

    @classmethod
    def from_mapping(cls, cfg: Mapping[str, Any], section: str = "train") -> LoopConfig:
        """From a config section; unknown or mistyped keys raise, naming them."""
        return from_mapping(cls, cfg, section)


class NonFiniteError(RuntimeError):
    """Too many consecutive steps had a non-finite loss or gradient."""


class Preempted(RuntimeError):
    """A stage stopped on SIGTERM after saving a checkpoint; running the job again resumes it."""


@dataclasses.dataclass
class LoopResult:
    """The state after the last step done, that step's record, whether SIGTERM stopped the
    loop early (after saving a checkpoint) and whether `until` ended it before `steps`."""

    state: Any
    record: dict[str, Any]
    preempted: bool = False
    stopped_early: bool = False


def full_shardings(abstract_state: Any, mesh: Mesh) -> Any:
    """A NamedSharding for every array leaf of `abstract_state`, from the logical-axis table."""
    prefix = state_shardings(abstract_state, mesh)
    return jax.tree.map(
        lambda s, sub: jax.tree.map(lambda _: s, sub),
        prefix,
        abstract_state,
        is_leaf=lambda x: isinstance(x, NamedSharding),
    )


class StopFlag:
    """Whether to checkpoint and stop after the current step.

    One process: set by our SIGTERM handler (installed from the main thread). Several processes:
    JAX's preemption service (started by `jax.distributed.initialize`, listening for SIGTERM)
    agrees on one step at which every process stops, so all of them join the same save.
    """

    def __init__(self):
        self._requested = False
        self._previous = None
        self._multi = jax.process_count() > 1

    def install(self):
        if not self._multi and threading.current_thread() is threading.main_thread():
            self._previous = signal.signal(signal.SIGTERM, self._handle)

    def check(self, step: int) -> bool:
        """Called once per step on every process, with the same step numbers."""
        if self._multi and not self._requested:
            from jax.experimental import multihost_utils

            self._requested = multihost_utils.reached_preemption_sync_point(step)
        return self._requested

    def _handle(self, signum, frame):
        log.warning("SIGTERM received: saving a checkpoint and stopping")
        self._requested = True

    def uninstall(self):
        if self._previous is not None:
            signal.signal(signal.SIGTERM, self._previous)
            self._previous = None


def train_loop(
    *,
    config: LoopConfig,
    workdir: str | os.PathLike,
    mesh: Mesh,
    init: Callable[[], Any] | Any,
    step_fn: Callable[..., tuple[Any, dict]],
    source: BatchSource,
    eval_fn: Callable[[Any], dict[str, float]] | None = None,
    eval_on_checkpoint: bool = True,
    until: Callable[[dict[str, float]], bool] | None = None,
    on_record: Callable[[dict[str, Any]], None] | None = None,
    step_args: Sequence[Any] = (),
    progress_keys: Sequence[str] = ("loss",),
    name: str | None = None,
) -> LoopResult:
    """Train for `config.steps` steps in `workdir` (see the module docstring).

    init: a function building the initial TrainState (jitted into its shardings) or the initial
    state itself (laid out into its shardings). step_fn must return `loss` and `skipped` among
    its scalar metrics. eval_fn(state) -> {name: float} is merged into the step's record.
    on_record(record) is called on every process after each record is logged. `progress_keys`
    are shown in the progress bar; `name` labels it (default: the workdir's name).
    until(eval metrics) -> True ends training after that evaluation (checkpointed first).
    """
    workdir = os.fspath(workdir)
    is_main = jax.process_index() == 0
    abstract = jax.eval_shape(init) if callable(init) else _abstract(init)
    shardings = full_shardings(abstract, mesh)
    ckpt = Checkpointer(
        os.path.join(workdir, CHECKPOINT_DIR),
        keep_last=config.keep_checkpoints,
        best_metric=config.best_metric,
        best_mode=config.best_mode,
        async_save=config.async_checkpoint,
    )
    try:
        restored = ckpt.restore_latest(abstract_with_shardings(abstract, shardings))
        if restored is not None:
            start, state, source_state, extra = restored
            source.set_state(source_state)
            log.info("resumed from %s/%s/%d", workdir, CHECKPOINT_DIR, start)
            record = dict((extra or {}).get("record") or {})
            if until is not None and record.get("stopped_early"):
                log.info("%s: stopped early at step %d (resumed); nothing to do", workdir, start)
                return LoopResult(state, record, stopped_early=True)
        elif callable(init):
            start, state = 0, jax.jit(init, out_shardings=shardings)()
        else:
            start, state = 0, jax.device_put(init, shardings)
        if start >= config.steps:
            log.info(
                "%s: already trained %d >= %d steps; nothing to do", workdir, start, config.steps
            )
            records = read_metrics(workdir) if is_main else []
            return LoopResult(state, dict(records[-1]) if records else {"step": start})
        writer = MetricsWriter(workdir, enabled=is_main, resume_step=start)
        try:
            run = _Run(
                config, workdir, mesh, shardings, step_fn, source, eval_fn, on_record, ckpt, until
            )
            return run.loop(
                state,
                start,
                eval_on_checkpoint=eval_on_checkpoint,
                step_args=tuple(step_args),
                writer=writer,
                progress=_progress(config, is_main, start, name or os.path.basename(workdir)),
                progress_keys=tuple(progress_keys),
            )
        finally:
            writer.close()
    finally:
        ckpt.close()


def _abstract(state: Any) -> Any:
    return jax.tree.map(lambda x: jax.ShapeDtypeStruct(np.shape(x), x.dtype), state)


def _progress(config: LoopConfig, is_main: bool, start: int, name: str):
    if not (is_main and config.progress):
        return None
    from tqdm import tqdm

    return tqdm(total=config.steps, initial=start, desc=name or "train", dynamic_ncols=True)


@dataclasses.dataclass
class _Run:
    config: LoopConfig
    workdir: str
    mesh: Mesh
    shardings: Any
    step_fn: Callable
    source: BatchSource
    eval_fn: Callable | None
    on_record: Callable | None
    ckpt: Checkpointer
    until: Callable | None = None

    def loop(self, state, start, *, eval_on_checkpoint, step_args, writer, progress, progress_keys):
        config = self.config
        stop = StopFlag()
        stop.install()
        jstep = None
        last: dict[str, Any] = {"step": start}
        skips = {"run": 0, "total": 0}
        clock = {"t": time.perf_counter()}
        pending = None  # (step, metrics on device or None, host metrics, tokens) not yet logged

        def handle(done, metrics, host, tokens, extra=None) -> dict:
            now = time.perf_counter()
            values = dict(host)
            if metrics is not None:
                values.update(jax.device_get(metrics))
            values["step_s"] = now - clock["t"]
            values["tokens_per_s"] = tokens / max(now - clock["t"], 1e-9)
            clock["t"] = now
            skipped = int(values.get("skipped", 0)) if metrics is not None else 0
            skips["run"] = skips["run"] + 1 if skipped else 0
            skips["total"] += skipped
            values["skipped_total"] = skips["total"]
            record = writer.write(done, {**values, **(extra or {})})
            if progress is not None:
                progress.update(done - progress.n)
                progress.set_postfix(
                    {k: f"{record[k]:.4g}" for k in progress_keys if k in record}
                    | {"tok_s": f"{values['tokens_per_s']:.0f}"}
                )
            if self.on_record is not None:
                self.on_record(record)
            if skips["run"] >= config.max_consecutive_skips:
                raise NonFiniteError(
                    f"{self.workdir}: loss or gradients were NaN/Inf for {skips['run']} "
                    f"consecutive steps (up to step {done}; last loss={record.get('loss')}, "
                    f"grad_norm={record.get('grad_norm')}); aborting. Lower optim.lr, check the "
                    "data, or raise max_consecutive_skips."
                )
            return record

        try:
            for done in range(start + 1, config.steps + 1):
                self.ckpt.check_errors()  # a failed background save stops the run at once
                local, host = self.source.next_batch(state, done)
                source_state = self.source.get_state()
                if local is None:  # nothing to train on this step: no update, logged as such
                    metrics, tokens = None, 0
                    host = {**host, "loss": 0.0, "skipped": 1, "empty_batch": 1}
                else:
                    batch = device_batch(local, self.mesh, process_local=self.source.process_local)
                    first = np.shape(next(iter(local.values())))
                    copies = jax.process_count() if self.source.process_local else 1
                    tokens = int(np.prod(first[:2])) * copies
                    if jstep is None:
                        batch_sh = {k: v.sharding for k, v in batch.items()}
                        jstep = jax.jit(
                            self.step_fn,
                            in_shardings=(self.shardings, batch_sh) + (None,) * len(step_args),
                            out_shardings=(self.shardings, None),
                            donate_argnums=0,
                        )
                    state, metrics = jstep(state, batch, *step_args)
                if pending is not None:
                    last = handle(*pending)
                pending = (done, metrics, host, tokens)
                is_eval = config.eval_every > 0 and done % config.eval_every == 0
                stopping = stop.check(done)
                is_ckpt = done % config.checkpoint_every == 0 or done == config.steps or stopping
                if is_eval or is_ckpt or metrics is None:
                    run_eval = self.eval_fn is not None and (
                        is_eval or (is_ckpt and eval_on_checkpoint)
                    )
                    extra = self.eval_fn(state) if run_eval else None
                    early = extra is not None and self.until is not None and self.until(extra)
                    if early:
                        extra = {**extra, "stopped_early": 1}
                        is_ckpt = True
                    last = handle(*pending, extra=extra)
                    pending = None
                    if is_ckpt:
                        self.ckpt.save(
                            done,
                            state,
                            source_state,
                            metrics=_ckpt_metrics(last, config),
                            extra={"record": _jsonable(last)},
                        )
                    if stopping:
                        self.ckpt.wait()
                        return LoopResult(state, last, preempted=True)
                    if early:
                        self.ckpt.wait()
                        log.info("%s: stopped early at step %d", self.workdir, done)
                        return LoopResult(state, last, stopped_early=True)
            self.ckpt.wait()  # the last checkpoint is on disk (or its failure is raised)
            return LoopResult(state, last)
        finally:
            stop.uninstall()
            if progress is not None:
                progress.close()


def _ckpt_metrics(record: dict, config: LoopConfig) -> dict[str, float] | None:
    if not config.best_metric:
        return None
    if config.best_metric not in record:
        raise KeyError(
            f"train.best_metric={config.best_metric!r} is not among the step metrics "
            f"{sorted(record)}"
        )
    return {config.best_metric: float(record[config.best_metric])}


def _jsonable(record: dict) -> dict:
    return {k: (v if isinstance(v, int | float | str) else float(v)) for k, v in record.items()}
