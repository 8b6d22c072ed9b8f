"""Multi-host: two processes on localhost (4 CPU devices each, jax.distributed) train with the same
loss curve as one process with 8 devices and the same global batch."""

import json
import os
import socket
import subprocess
import sys

import numpy as np

ROOT = os.path.abspath(os.path.join(os.path.dirname(__file__), "..", ".."))
COMMON = [
    "--config=configs/sft_tiny.py:fast",
    "--config.model.pattern=M",
    "--config.train.steps=4",
    "--config.data.eval_records=0",
    "--config.train.best_metric=loss",
    "--config.train.progress=False",
    "--config.data.shard_by=row",
]


def _start(workdir, devices, *extra):
    env = dict(
        os.environ,
        PYTHONPATH=ROOT,
        JAX_PLATFORMS="cpu",
        XLA_FLAGS=f"--xla_force_host_platform_device_count={devices}",
    )
    return subprocess.Popen(
        [sys.executable, "-m", "nemocascade.launch", *COMMON, f"--workdir={workdir}", *extra],
        cwd=ROOT,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )


def _free_port():
    with socket.socket() as s:
        s.bind(("localhost", 0))
        return s.getsockname()[1]


def test_two_processes_match_one(tmp_path):
    port = _free_port()
    procs = [
        _start(
            tmp_path / "two",
            4,
            "--distributed",
            f"--coordinator_address=localhost:{port}",
            "--num_processes=2",
            f"--process_id={i}",
        )
        for i in range(2)
    ]
    procs.append(_start(tmp_path / "one", 8))
    logs = [p.communicate(timeout=300)[0] for p in procs]
    for p, log in zip(procs, logs, strict=True):
        assert p.returncode == 0, log[-3000:]

    def curve(name):
        with open(tmp_path / name / "metrics.jsonl") as f:
            return [json.loads(line) for line in f]

    one, two = curve("one"), curve("two")
    assert [r["step"] for r in two] == [r["step"] for r in one] == [1, 2, 3, 4]
    assert [r["tokens"] for r in two] == [r["tokens"] for r in one]  # the same global batches
    np.testing.assert_allclose([r["loss"] for r in two], [r["loss"] for r in one], rtol=1e-5)
    np.testing.assert_allclose(
        [r["grad_norm"] for r in two], [r["grad_norm"] for r in one], rtol=1e-4
    )
    # process 0 alone writes the logs; both processes wrote their shards of the checkpoint
    assert json.loads((tmp_path / "two" / "final_metrics.json").read_text())["step"] == 4
    assert os.listdir(tmp_path / "two" / "checkpoints") == ["4"]
