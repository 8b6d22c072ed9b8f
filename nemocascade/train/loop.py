"""The sharded training loop shared by the trainers (SFT now; any `(state, batch) -> (state,
metrics)` step).

What it does, in order:
  1. abstract train state (`jax.eval_shape(init_fn)`), shardings from the logical-axis table;
  2. resume from the newest readable checkpoint, or initialise directly into those shardings;
  3. jit the step once with explicit shardings and the state donated;
  4. per step: next batch -> global array -> step; the metrics of the *previous* step are
     fetched and logged (the device never waits on the host), NaN/Inf skips are counted;
  5. at checkpoint steps, the last step and on SIGTERM: sync, evaluate, save (async);
     SIGTERM then returns cleanly with `preempted=True`.
Running again on a finished workdir restores the last checkpoint and does no step.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import signal
import threading
import time
from collections.abc import Callable, Mapping
from typing import Any, Protocol

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding

from nemocascade.configs_lib import dataclass_from_mapping
from nemocascade.sharding import batch_sharding, state_shardings
from nemocascade.train.checkpoint import Checkpointer, abstract_with_shardings
from nemocascade.train.metrics import MetricsWriter, read_metrics

log = logging.getLogger(__name__)

CHECKPOINT_DIR = "checkpoints"


class DataIterator(Protocol):
    """What the loop needs from a data pipeline (grain's DatasetIterator has this shape)."""

    def __next__(self) -> Mapping[str, np.ndarray]: ...
    def get_state(self) -> dict: ...
    def set_state(self, state: dict) -> None: ...


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
        if self.steps < 1 or self.checkpoint_every < 1 or self.max_consecutive_skips < 1:
            raise ValueError(
                f"train: steps, checkpoint_every, max_consecutive_skips must be >= 1: {self}"
            )

    @classmethod
    def from_mapping(cls, cfg: Mapping[str, Any]) -> LoopConfig:
        """From a config section; unknown keys raise, naming the valid ones."""
        return dataclass_from_mapping(cls, cfg, "train")


class NonFiniteError(RuntimeError):
    """Too many consecutive steps had a non-finite loss or gradient."""


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

    Shared by the SFT loop and the RL stages (`nemocascade.rl`).
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


def to_global(batch: Mapping[str, np.ndarray], mesh: Mesh) -> dict[str, jax.Array]:
    """Global arrays, batch-sharded over the mesh, from this process's rows `[B_local, ...]`."""
    return {
        k: jax.make_array_from_process_local_data(batch_sharding(mesh, np.ndim(v)), np.asarray(v))
        for k, v in batch.items()
    }


def train_loop(
    *,
    config: LoopConfig,
    workdir: str | os.PathLike,
    mesh: Mesh,
    init_fn: Callable[[], Any],
    step_fn: Callable[[Any, Any], tuple[Any, dict]],
    data_iter: DataIterator,
    eval_fn: Callable[[Any], dict[str, float]] | None = None,
    on_record: Callable[[dict[str, Any]], None] | None = None,
) -> dict[str, Any]:
    """Train for `config.steps` steps in `workdir`; returns the last step's record.

    init_fn() -> state builds the initial TrainState (jitted here into its shardings);
    step_fn(state, batch) -> (state, metrics) must return `loss` and `skipped` among its scalar
    metrics; eval_fn(state) -> {"eval_...": float} runs at sync points; on_record(record) is
    called on every process after each step's record is logged.
    """
    workdir = os.fspath(workdir)
    is_main = jax.process_index() == 0
    abstract = jax.eval_shape(init_fn)
    shardings = full_shardings(abstract, mesh)
    ckpt = Checkpointer(
        os.path.join(workdir, CHECKPOINT_DIR),
        keep_last=config.keep_checkpoints,
        best_metric=config.best_metric,
        best_mode=config.best_mode,
        async_save=config.async_checkpoint,
    )
    restored = ckpt.restore_latest(abstract_with_shardings(abstract, shardings))
    if restored is not None:
        start, state, data_state, _ = restored
        data_iter.set_state(data_state)
        log.info("resumed from %s/%s/%d", workdir, CHECKPOINT_DIR, start)
    else:
        start = 0
        state = jax.jit(init_fn, out_shardings=shardings)()
    writer = MetricsWriter(workdir, enabled=is_main, resume_step=start)
    try:
        if start >= config.steps:
            log.info(
                "%s: already trained %d >= %d steps; nothing to do", workdir, start, config.steps
            )
            records = read_metrics(workdir) if is_main else []
            return dict(records[-1]) if records else {"step": start}
        return _run(
            config,
            workdir,
            mesh,
            state,
            shardings,
            start,
            step_fn,
            data_iter,
            eval_fn,
            on_record,
            ckpt,
            writer,
            is_main,
        )
    finally:
        writer.close()
        ckpt.close()


def _run(
    config,
    workdir,
    mesh,
    state,
    shardings,
    start,
    step_fn,
    data_iter,
    eval_fn,
    on_record,
    ckpt,
    writer,
    is_main,
) -> dict[str, Any]:
    stop = StopFlag()
    stop.install()
    jstep = None
    progress = None
    if is_main and config.progress:
        from tqdm import tqdm

        progress = tqdm(
            total=config.steps,
            initial=start,
            desc=os.path.basename(workdir) or "train",
            dynamic_ncols=True,
        )
    last: dict[str, Any] = {"step": start}
    skips = {"run": 0, "total": 0}
    timer = {"t": time.perf_counter()}

    def handle(done: int, metrics: dict, tokens: int, extra: dict | None = None) -> dict:
        host = jax.device_get(metrics)
        now = time.perf_counter()
        host["tokens_per_s"] = tokens / max(now - timer["t"], 1e-9)
        timer["t"] = now
        skipped = int(host["skipped"])
        skips["run"] = skips["run"] + 1 if skipped else 0
        skips["total"] += skipped
        host["skipped_total"] = skips["total"]
        record = writer.write(done, {**host, **(extra or {})})
        if progress is not None:
            progress.update(done - progress.n)
            progress.set_postfix(loss=f"{record['loss']:.4f}", tok_s=f"{host['tokens_per_s']:.0f}")
        if on_record is not None:
            on_record(record)
        if skips["run"] >= config.max_consecutive_skips:
            raise NonFiniteError(
                f"{workdir}: loss or gradients were NaN/Inf for {skips['run']} consecutive steps "
                f"(up to step {done}; last loss={record['loss']}, "
                f"grad_norm={record.get('grad_norm')}"
                f"); aborting. Lower optim.lr, check the data, or raise "
                f"train.max_consecutive_skips."
            )
        return record

    pending = None  # (done, metrics on device, tokens) of the step not yet logged
    try:
        for done in range(start + 1, config.steps + 1):
            local = next(data_iter)
            data_state = data_iter.get_state()
            batch = to_global(local, mesh)
            tokens = int(np.prod(next(iter(local.values())).shape[:2])) * jax.process_count()
            if jstep is None:
                batch_sh = {k: v.sharding for k, v in batch.items()}
                jstep = jax.jit(
                    step_fn,
                    in_shardings=(shardings, batch_sh),
                    out_shardings=(shardings, None),
                    donate_argnums=0,
                )
            state, metrics = jstep(state, batch)
            if pending is not None:
                last = handle(*pending)
            pending = (done, metrics, tokens)
            is_eval = config.eval_every > 0 and done % config.eval_every == 0
            stopping = stop.check(done)
            is_ckpt = done % config.checkpoint_every == 0 or done == config.steps or stopping
            if is_eval or is_ckpt:
                extra = eval_fn(state) if eval_fn is not None else None
                last = handle(*pending, extra=extra)
                pending = None
                if is_ckpt:
                    ckpt.save(
                        done,
                        state,
                        data_state,
                        metrics=_ckpt_metrics(last, config),
                        extra={"record": _jsonable(last)},
                    )
                if stopping:
                    ckpt.wait()
                    return {**last, "preempted": True}
        return last
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
    return {k: (v if isinstance(v, (int, float, str)) else float(v)) for k, v in record.items()}
