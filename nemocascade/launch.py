"""Launcher: `python -m nemocascade.launch --config=configs/X.py[:arg] --workdir=DIR`.

    --config.a.b=value      override a config key (every key must be declared in the file;
                            a typo is an error listing the closest keys)
    --sweep                 run every variant of the file's `get_sweep(arg)` into DIR/<variant>/,
                            then write DIR/sweep.csv and DIR/sweep.md (final metrics of each)
    --parallel=N            with --sweep: N variants at a time, each in its own process

`config.job` picks the function to run from the job registry (`nemocascade.jobs`;
`register_job` is re-exported here). Every run writes DIR/config.json before it starts and
DIR/final_metrics.json when its job returns. A job stopped by SIGTERM saves and exits with 0.
"""

from __future__ import annotations

import json
import logging as std_logging
import os
import subprocess
import sys
import time
from collections.abc import Sequence
from typing import Any

from absl import app, flags, logging
from ml_collections import ConfigDict, config_flags

from nemocascade import config_files
from nemocascade.jobs import get_identity, get_job, get_preflight, register_job

__all__ = ["main", "register_job", "run_job", "run_sweep"]


def user_errors() -> tuple[type[BaseException], ...]:
    """Problems with a run's inputs or environment (config, data, workdir, checkpoints, disk),
    reported on one line with exit 2 (imported here, not at the top: the launcher stays light)."""
    from nemocascade.data.sources import DataError
    from nemocascade.jobs.identity import IncompatibleResume
    from nemocascade.model.hf_io import CheckpointError
    from nemocascade.rl.stage import RewardErrors
    from nemocascade.train.checkpoint import CheckpointSaveError
    from nemocascade.train.loop import NonFiniteError
    from nemocascade.typed_config import ConfigError

    return (
        ConfigError,
        IncompatibleResume,
        DataError,
        CheckpointError,
        CheckpointSaveError,
        FileNotFoundError,
        NotADirectoryError,
        PermissionError,
        NonFiniteError,
        RewardErrors,
    )


FINAL_METRICS = "final_metrics.json"
RUN_INFO = "run_info.json"

_CONFIG = config_flags.DEFINE_config_file(
    "config", None, "config file path[:arg]", lock_config=True
)
_WORKDIR = flags.DEFINE_string("workdir", None, "output directory")
_SWEEP = flags.DEFINE_bool("sweep", False, "run every variant of get_sweep(arg)")
_PARALLEL = flags.DEFINE_integer("parallel", 1, "with --sweep: variants run at once (processes)")
_VARIANT = flags.DEFINE_string("variant", "", "run only this sweep variant (used by --parallel)")
_DISTRIBUTED = flags.DEFINE_bool(
    "distributed",
    False,
    "call jax.distributed.initialize() first (multi-host); without "
    "the three flags below the cluster is auto-detected",
)
_COORDINATOR = flags.DEFINE_string("coordinator_address", None, "host:port of process 0")
_NUM_PROCESSES = flags.DEFINE_integer("num_processes", None, "number of processes")
_PROCESS_ID = flags.DEFINE_integer("process_id", None, "this process's index")


def run_info(config: ConfigDict) -> dict[str, Any]:
    """What this run executes on: devices, the mesh's axes and sizes, whether MoE layers run
    expert-parallel, the jax / flax versions and the git commit of the code."""
    import flax
    import jax

    from nemocascade.sharding import MeshConfig, make_mesh
    from nemocascade.typed_config import from_mapping

    mesh = None
    if "mesh" in config:
        mesh = dict(make_mesh(from_mapping(MeshConfig, config.mesh, "mesh")).shape)
    try:
        commit = subprocess.run(
            ["git", "rev-parse", "HEAD"],
            cwd=os.path.dirname(os.path.abspath(__file__)),
            capture_output=True,
            text=True,
            timeout=10,
            check=True,
        ).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        commit = "unknown"
    return {
        "device_count": jax.device_count(),
        "process_count": jax.process_count(),
        "platform": jax.devices()[0].platform,
        "mesh": mesh,
        "expert_parallel": bool(mesh and mesh["expert"] > 1),
        "context_parallel": bool(mesh and mesh.get("context", 1) > 1),
        "jax": jax.__version__,
        "flax": flax.__version__,
        "git_commit": commit,
    }


def run_job(config: ConfigDict, workdir: str) -> dict[str, Any]:
    """Check the workdir (and, for a rerun, that the run's identity allows resuming), keep a
    changed previous config, write DIR/config.json and DIR/run_info.json, run `config.job`,
    write DIR/final_metrics.json; return the metrics."""
    import jax

    from nemocascade.jobs import identity as ident
    from nemocascade.jobs.preflight import check_workdir

    is_main = jax.process_index() == 0
    job = get_job(config.job)
    identity_fn = get_identity(config.job)
    if is_main:
        check_workdir(workdir)
        if identity_fn is not None:  # before anything is written: refuse, touching nothing
            ident.check_resume(workdir, identity_fn(config), _previous_identity(workdir, config))
        preflight = get_preflight(config.job)
        if preflight is not None:
            preflight(config, workdir)
        os.makedirs(workdir, exist_ok=True)
        ident.keep_previous_config(workdir, json.loads(config.to_json_best_effort()))
        config_files.write_config_json(config, workdir)
        if identity_fn is not None:
            ident.record(workdir, identity_fn(config))
        with open(os.path.join(workdir, RUN_INFO), "w") as f:
            json.dump(run_info(config), f, indent=2)
            f.write("\n")
    metrics = dict(job(config, workdir))
    if is_main:
        with open(os.path.join(workdir, FINAL_METRICS), "w") as f:
            json.dump(metrics, f, indent=2, sort_keys=True, default=float)
            f.write("\n")
    return metrics


def _previous_identity(workdir: str, config: ConfigDict) -> dict | None:
    """The recorded identity of the run in `workdir`: its run_identity.json, else (a run older
    than that file) the identity of its config.json; None for a new workdir."""
    from nemocascade.jobs import identity as ident

    if os.path.exists(os.path.join(workdir, ident.IDENTITY_FILE)):
        return None  # check_resume reads it
    path = os.path.join(workdir, ident.CONFIG_FILE)
    if not os.path.exists(path):
        return None
    old = ConfigDict(config_files.read_json(path))
    fn = get_identity(old.get("job", config.job))
    return None if fn is None else dict(fn(old))


def _sweep_row(name: str, overrides: dict, metrics: dict | None, status: str) -> dict[str, Any]:
    row: dict[str, Any] = {"variant": name, "status": status}
    row.update({k: v for k, v in overrides.items() if k != config_files.NAME_KEY})
    row.update(metrics or {})
    return row


def run_sweep(
    spec: str,
    config: ConfigDict,
    workdir: str,
    *,
    parallel: int = 1,
    child_args: Sequence[str] = (),
) -> list[dict[str, Any]]:
    """Run every variant of the spec's `get_sweep`; returns the rows written to sweep.csv/md.

    parallel == 1 runs the variants one after another in this process; parallel > 1 starts
    `python -m nemocascade.launch ... --variant=NAME` processes, at most `parallel` at a time,
    passing `child_args` (the command line's --config.* overrides) on.
    """
    variants = config_files.load_sweep(spec)
    names = config_files.variant_names(variants)
    for v in variants:  # fail on a typo before anything runs
        config_files.apply_overrides(config, v)
    os.makedirs(workdir, exist_ok=True)
    rows: list[dict[str, Any]] = []
    if parallel <= 1:
        for name, overrides in zip(names, variants, strict=True):
            logging.info("sweep variant %s: %s", name, overrides)
            metrics = run_job(
                config_files.apply_overrides(config, overrides), os.path.join(workdir, name)
            )
            rows.append(_sweep_row(name, overrides, metrics, "ok"))
    else:
        rows = _run_parallel(spec, workdir, names, variants, parallel, child_args)
    config_files.write_sweep_tables(rows, workdir)
    failed = [r["variant"] for r in rows if r["status"] != "ok"]
    if failed:
        raise RuntimeError(f"sweep variants failed: {failed} (see {workdir}/<variant>/launch.log)")
    return rows


def _run_parallel(spec, workdir, names, variants, parallel, child_args) -> list[dict[str, Any]]:
    queue = list(zip(names, variants, strict=True))
    running: list[tuple[str, dict, subprocess.Popen, Any]] = []
    done: dict[str, tuple[dict, int]] = {}
    while queue or running:
        while queue and len(running) < parallel:
            name, overrides = queue.pop(0)
            vdir = os.path.join(workdir, name)
            os.makedirs(vdir, exist_ok=True)
            log_file = open(os.path.join(vdir, "launch.log"), "w")  # noqa: SIM115 - child's log
            cmd = [
                sys.executable,
                "-m",
                "nemocascade.launch",
                f"--config={spec}",
                f"--workdir={vdir}",
                f"--variant={name}",
                *child_args,
            ]
            running.append(
                (
                    name,
                    overrides,
                    subprocess.Popen(cmd, stdout=log_file, stderr=subprocess.STDOUT),
                    log_file,
                )
            )
        for item in list(running):
            name, overrides, proc, log_file = item
            if proc.poll() is not None:
                log_file.close()
                done[name] = (overrides, proc.returncode)
                running.remove(item)
        time.sleep(0.2)
    rows = []
    for name in names:
        overrides, rc = done[name]
        path = os.path.join(workdir, name, FINAL_METRICS)
        metrics = config_files.read_json(path) if rc == 0 and os.path.exists(path) else None
        rows.append(
            _sweep_row(name, overrides, metrics, "ok" if metrics is not None else f"rc={rc}")
        )
    return rows


def _override_args(argv: Sequence[str]) -> list[str]:
    """The `--config.key=value` (or `--config.key value`) arguments of a command line."""
    out, i = [], 0
    while i < len(argv):
        a = argv[i]
        if a.startswith("--config."):
            out.append(a)
            if "=" not in a and i + 1 < len(argv):
                out.append(argv[i + 1])
                i += 1
        i += 1
    return out


def _config_spec(argv: Sequence[str]) -> str | None:
    for i, a in enumerate(argv):
        if a.startswith("--config="):
            return a.split("=", 1)[1]
        if a == "--config" and i + 1 < len(argv):
            return argv[i + 1]
    return None


def check_command_line(argv: Sequence[str]) -> None:
    """Exit with a readable message if an override names an undeclared key (ml_collections
    would raise from inside flag parsing with a traceback)."""
    spec = _config_spec(argv)
    keys = [
        a[len("--config.") :].split("=", 1)[0]
        for a in _override_args(argv)
        if a.startswith("--config.")
    ]
    if spec is None or not keys:
        return
    try:
        config_files.check_keys(config_files.load_config(spec), keys, prefix="--config.")
    except config_files.ConfigKeyError as e:
        sys.stderr.write(f"error: {e}\n")
        sys.exit(2)


# orbax warnings about what we ask for on purpose: reading a finished stage read-only
_EXPECTED_ORBAX = ("read only", "read_only=True")


def _quiet_orbax() -> None:
    """orbax logs every save step at INFO through absl; keep its warnings and errors only, less
    the ones about read-only restores (which we ask for)."""
    handler = logging.get_absl_handler().python_handler  # ABSLHandler.handle skips its own filters

    def keep(r) -> bool:
        if "/orbax/" not in r.pathname:
            return True
        return r.levelno >= std_logging.WARNING and not any(
            s in r.getMessage() for s in _EXPECTED_ORBAX
        )

    handler.addFilter(keep)


def main(argv: Sequence[str]) -> None:
    _quiet_orbax()
    from nemocascade.sharding import reserve_cpu_collective_threads

    reserve_cpu_collective_threads()  # simulated CPU devices: no collective starves (see there)
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    if _WORKDIR.value is None or _CONFIG.value is None:
        raise app.UsageError("--config and --workdir are required")
    if _DISTRIBUTED.value:
        import jax

        jax.distributed.initialize(
            coordinator_address=_COORDINATOR.value,
            num_processes=_NUM_PROCESSES.value,
            process_id=_PROCESS_ID.value,
        )
    config, workdir = _CONFIG.value, _WORKDIR.value
    spec = _config_spec(sys.argv[1:])
    if _VARIANT.value:
        variants = config_files.load_sweep(spec)
        by_name = dict(zip(config_files.variant_names(variants), variants, strict=True))
        if _VARIANT.value not in by_name:
            raise app.UsageError(f"--variant={_VARIANT.value!r}: not one of {sorted(by_name)}")
        config = config_files.apply_overrides(config, by_name[_VARIANT.value])
    if _SWEEP.value:
        rows = run_sweep(
            spec, config, workdir, parallel=_PARALLEL.value, child_args=_override_args(sys.argv[1:])
        )
        logging.info("sweep done: %d variants, %s/sweep.md", len(rows), workdir)
        return
    from nemocascade.train.loop import Preempted

    try:
        metrics = run_job(config, workdir)
    except Preempted as e:
        _stopped(str(e))
        return
    except user_errors() as e:
        _fail(e)
    if metrics.get("preempted"):
        _stopped(f"SIGTERM at step {metrics.get('step')}; checkpoint saved in {workdir}")
        return
    logging.info("final metrics: %s", metrics)


def _stopped(message: str) -> None:
    """SIGTERM: the job saved a checkpoint; say how to resume and exit 0."""
    command = " ".join(["python -m nemocascade.launch", *sys.argv[1:]])
    sys.stderr.write(f"stopped: {message}\nresume with the same command: {command}\n")


def _fail(e: BaseException) -> None:
    """A problem with the run's inputs, not a bug: its message (which names the key, file or
    fix) on stderr without a traceback, exit 2; NEMOCASCADE_TRACEBACK=1 shows the traceback."""
    if os.environ.get("NEMOCASCADE_TRACEBACK") == "1":
        raise e
    sys.stderr.write(f"error: {e}\n")
    sys.exit(2)


def check_config_file(argv: Sequence[str]) -> None:
    """Exit with one line if `--config` names a file that is missing or does not load (the
    flag parser would bury it in a long chained traceback)."""
    spec = _config_spec(argv)
    if spec is None:
        return
    path, _ = config_files.split_spec(spec)
    if not os.path.isfile(path):
        sys.stderr.write(f"error: --config={spec}: no such file {path!r}\n")
        sys.exit(2)
    try:
        config_files.load_config(spec)
    except Exception as e:  # noqa: BLE001 - whatever the file raises, report it on one line
        where = ""
        tb = e.__traceback__
        while tb is not None:  # the innermost frame inside the config file itself
            if os.path.abspath(tb.tb_frame.f_code.co_filename) == os.path.abspath(path):
                where = f":{tb.tb_lineno}"
            tb = tb.tb_next
        if isinstance(e, SyntaxError) and e.lineno:
            where = f":{e.lineno}"
        sys.stderr.write(f"error: --config={spec}: {path}{where}: {type(e).__name__}: {e}\n")
        sys.exit(2)


def cli() -> None:
    """Console entry point."""
    check_config_file(sys.argv[1:])
    check_command_line(sys.argv[1:])
    app.run(main)


if __name__ == "__main__":
    cli()
