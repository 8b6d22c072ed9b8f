"""Checkpoints with orbax: asynchronous saves, keep the last N plus the best by a named metric.

A checkpoint at step s is the directory `<workdir>/checkpoints/<s>/` with three items:
    state  the TrainState (params, optimizer state, model state, step, RNG), sharded arrays
    data   the data iterator's state (JSON, from `iterator.get_state()`)
    extra  JSON the caller wants back (e.g. the metrics of that step)

Orbax writes into a temporary directory and renames it when complete, so an interrupted save
is never listed. `restore_latest` walks the listed steps from newest to oldest and skips (with a
warning) any that fails to restore, e.g. a checkpoint whose files were truncated or deleted.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Mapping
from typing import Any

import jax
import numpy as np
import orbax.checkpoint as ocp
from orbax.checkpoint._src.metadata import array_metadata_store
from orbax.checkpoint.checkpoint_managers import preservation_policy as pp

log = logging.getLogger(__name__)

BEST_MODES = ("min", "max")
CORRUPT_DIR = "corrupt"  # unreadable checkpoints are moved here, never deleted


def _type_handlers():
    """Orbax's default leaf handlers, except that arrays are written without replica-parallel
    slicing in a single process: there every replica's slice would be written by the same
    process anyway, and each slice is a small program XLA compiles per shape (144 programs,
    10 of a tiny SFT job's 50 s on 8 CPU devices). Across hosts it still spreads the writing."""
    array = ocp.type_handlers.ArrayHandler(
        use_replica_parallel=jax.process_count() > 1,
        array_metadata_store=array_metadata_store.Store(),
    )
    scalar = ocp.type_handlers.ScalarHandler()
    return ocp.type_handlers.create_type_handler_registry(
        (int, scalar),
        (float, scalar),
        (bytes, scalar),
        (np.number, scalar),
        (np.ndarray, ocp.type_handlers.NumpyHandler()),
        (jax.Array, array),
        (str, ocp.type_handlers.StringHandler()),
    )


class CheckpointSaveError(RuntimeError):
    """An (asynchronous) checkpoint save failed: the run stops at once with the cause."""


class Checkpointer:
    """Saves and restores `(TrainState, data state, extra)` under `directory`.

    keep_last: how many of the newest checkpoints to keep; best_metric: key of the `metrics`
    passed to `save` whose best value (by `best_mode`) is also kept ("" to disable).

    read_only: restore only (evaluation, a finished stage's weights): the directory is never
    created, cleaned of temporary directories (a save under way is not disturbed), moved or
    deleted from, and `save` raises.
    """

    def __init__(
        self,
        directory: str | os.PathLike,
        *,
        keep_last: int = 2,
        best_metric: str = "",
        best_mode: str = "min",
        async_save: bool = True,
        read_only: bool = False,
    ):
        if keep_last < 1:
            raise ValueError(f"checkpoint keep_last must be >= 1, got {keep_last}")
        if best_mode not in BEST_MODES:
            raise ValueError(f"checkpoint best_mode must be one of {BEST_MODES}, got {best_mode!r}")
        self.directory = os.path.abspath(os.fspath(directory))
        self.best_metric = best_metric
        self.read_only = read_only
        if read_only:
            options = ocp.CheckpointManagerOptions(
                read_only=True, create=False, cleanup_tmp_directories=False
            )
        else:
            options = ocp.CheckpointManagerOptions(
                preservation_policy=_preservation(keep_last, best_metric, best_mode),
                enable_async_checkpointing=async_save,
                cleanup_tmp_directories=True,
            )
        self._manager = ocp.CheckpointManager(
            self.directory,
            item_handlers={
                "state": ocp.PyTreeCheckpointHandler(type_handler_registry=_type_handlers()),
                "data": ocp.JsonCheckpointHandler(),
                "extra": ocp.JsonCheckpointHandler(),
            },
            options=options,
        )

    def all_steps(self) -> list[int]:
        """Steps of the complete checkpoints on disk, ascending."""
        return sorted(self._manager.all_steps())

    def save(
        self,
        step: int,
        state: Any,
        data_state: Mapping[str, Any],
        metrics: Mapping[str, float] | None = None,
        extra: Mapping[str, Any] | None = None,
    ) -> None:
        """Start saving (returns once arrays are copied off the device; writing continues)."""
        if self.read_only:
            raise RuntimeError(f"checkpointer of {self.directory} is read-only: cannot save")
        if self.best_metric and (metrics is None or self.best_metric not in metrics):
            raise KeyError(
                f"checkpoint at step {step}: best_metric {self.best_metric!r} missing "
                f"from metrics {sorted(metrics or {})}"
            )
        metrics = None if metrics is None else {k: float(v) for k, v in metrics.items()}
        self._manager.save(
            int(step),
            args=ocp.args.Composite(
                state=ocp.args.PyTreeSave(state),
                data=ocp.args.JsonSave(dict(data_state)),
                extra=ocp.args.JsonSave(dict(extra or {})),
            ),
            metrics=metrics,
            force=True,
        )

    def restore(self, step: int, abstract_state: Any) -> tuple[Any, dict, dict]:
        """`(state, data_state, extra)` of checkpoint `step`; arrays get `abstract_state`'s
        shapes, dtypes and shardings (a pytree of `jax.ShapeDtypeStruct`)."""
        out = self._manager.restore(
            int(step),
            args=ocp.args.Composite(
                state=_pytree_restore(abstract_state, partial=False),
                data=ocp.args.JsonRestore(),
                extra=ocp.args.JsonRestore(),
            ),
        )
        return out["state"], dict(out["data"] or {}), dict(out["extra"] or {})

    def restore_fields(self, step: int, abstract_fields: Mapping[str, Any]) -> dict[str, Any]:
        """Only some top-level fields of the state saved at `step` (e.g. `{"params": ...,
        "model_state": ...}` of a TrainState: a stage's final weights without its optimizer
        state), with `abstract_fields`' shapes, dtypes and shardings."""
        out = self._manager.restore(
            int(step),
            args=ocp.args.Composite(state=_pytree_restore(dict(abstract_fields), partial=True)),
        )
        return dict(out["state"])

    def restore_latest(self, abstract_state: Any) -> tuple[int, Any, dict, dict] | None:
        """The newest checkpoint that restores, as `(step, state, data_state, extra)`, or None.

        A checkpoint that fails to restore (truncated or deleted files) is moved aside, never
        deleted, to `<directory>/corrupt/<step>[.n]` with a warning, so the run resumes from the
        newest good one and can save that step again (no crash loop on the same step); read-only,
        it is only skipped.
        """
        for step in reversed(self.all_steps()):
            try:
                state, data_state, extra = self.restore(step, abstract_state)
            except Exception as e:  # noqa: BLE001 - any failure means "unusable checkpoint"
                where = (
                    "left in place (read-only)"
                    if self.read_only
                    else f"moved to {self._move_aside(step)}"
                )
                log.warning(
                    "checkpoint %s/%d is unreadable (%s: %s); %s, trying an older one",
                    self.directory,
                    step,
                    type(e).__name__,
                    str(e).splitlines()[0][:300] if str(e) else "",
                    where,
                )
                continue
            return step, state, data_state, extra
        return None

    def _move_aside(self, step: int) -> str:
        """Move checkpoint `step` out of the manager's view (kept for inspection)."""
        src = os.path.join(self.directory, str(step))
        aside = os.path.join(self.directory, CORRUPT_DIR)
        os.makedirs(aside, exist_ok=True)
        dst, n = os.path.join(aside, str(step)), 0
        while os.path.exists(dst):
            n += 1
            dst = os.path.join(aside, f"{step}.{n}")
        os.replace(src, dst)
        self._manager.reload()
        return dst

    def wait(self) -> None:
        """Block until pending asynchronous saves are on disk."""
        self._manager.wait_until_finished()
        self.check_errors()

    def check_errors(self) -> None:
        """Raise `CheckpointSaveError` (the cause on one line) if a background save failed."""
        try:
            self._manager.check_for_errors()
        except Exception as e:  # noqa: BLE001 - any failure of the save thread stops the run
            cause = _root_cause(e)
            raise CheckpointSaveError(
                f"saving a checkpoint to {self.directory} failed: {type(cause).__name__}: "
                f"{str(cause).splitlines()[0] if str(cause) else ''}"
            ) from e

    def close(self) -> None:
        """Finish pending saves and release the manager."""
        self._manager.wait_until_finished()
        self._manager.close()


def _preservation(keep_last: int, best_metric: str, best_mode: str) -> pp.PreservationPolicy:
    """Keep the newest `keep_last` checkpoints, and the best by `best_metric` if one is named."""
    policies: list[pp.PreservationPolicy] = [pp.LatestN(n=keep_last)]
    if best_metric:
        policies.append(
            pp.BestN(
                get_metric_fn=lambda m: float(m[best_metric]),
                reverse=(best_mode == "min"),
                n=1,
                keep_checkpoints_without_metrics=False,
            )
        )
    return pp.AnyPreservationPolicy(policies)


def abstract_with_shardings(abstract_state: Any, shardings: Any) -> Any:
    """`abstract_state` (ShapeDtypeStructs) with each leaf's sharding set from `shardings`."""
    return jax.tree.map(
        lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), abstract_state, shardings
    )


def _pytree_restore(abstract: Any, *, partial: bool) -> ocp.args.PyTreeRestore:
    """Restore args placing every array as its `jax.ShapeDtypeStruct` says (no sharding: the
    default device)."""

    def args(x):
        sharding = getattr(x, "sharding", None) or jax.sharding.SingleDeviceSharding(
            jax.devices()[0]
        )
        return ocp.ArrayRestoreArgs(sharding=sharding, global_shape=x.shape, dtype=x.dtype)

    return ocp.args.PyTreeRestore(
        item=abstract, restore_args=jax.tree.map(args, abstract), partial_restore=partial
    )


def _root_cause(e: BaseException) -> BaseException:
    """The innermost exception of a chain (e.g. the OSError under orbax's wrappers)."""
    seen = set()
    while (e.__cause__ or e.__context__) is not None and id(e) not in seen:
        seen.add(id(e))
        e = e.__cause__ or e.__context__
    return e
