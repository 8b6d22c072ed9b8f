"""The launcher as a command: override typos, sweeps (sequential and parallel), SIGTERM."""

import csv
import json
import os
import signal
import subprocess
import sys
import textwrap
import time

ROOT = os.path.abspath(os.path.join(os.path.dirname(__file__), ".."))

TOY_CONFIG = textwrap.dedent('''
    """A toy job for the launcher tests: loss = (x - 3)^2."""
    from ml_collections import ConfigDict
    from nemocascade.jobs import register_job

    @register_job("toy_quadratic")
    def run(config, workdir):
        return {"loss": (config.x - 3.0) ** 2, "y": config.y}

    def get_config(arg=""):
        c = ConfigDict()
        c.job = "toy_quadratic"
        c.x = 0.0
        c.y = 1
        c.nested = dict(z="a")
        return c

    def get_sweep(arg=""):
        return [{"x": 1.0}, {"x": 3.0}, {"_name": "far", "x": 10.0, "nested.z": "b"}]
''')


def _launch(*args, timeout=120, **kw):
    env = dict(os.environ, PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""))
    return subprocess.run(
        [sys.executable, "-m", "nemocascade.launch", *args],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
        **kw,
    )


def _toy(tmp_path):
    path = tmp_path / "toy.py"
    path.write_text(TOY_CONFIG)
    return str(path)


def test_override_typo_lists_near_matches(tmp_path):
    out = _launch(
        f"--config={_toy(tmp_path)}",
        f"--workdir={tmp_path / 'w'}",
        "--config.nested.zz=3",
        "--config.x=2.0",
    )
    assert out.returncode == 2
    assert "--config.nested.zz: no such config key; did you mean --config.nested.z" in out.stderr
    assert not (tmp_path / "w").exists()


def test_single_run_writes_config_and_final_metrics(tmp_path):
    out = _launch(f"--config={_toy(tmp_path)}", f"--workdir={tmp_path / 'w'}", "--config.x=5.0")
    assert out.returncode == 0, out.stderr[-3000:]
    assert json.loads((tmp_path / "w" / "config.json").read_text())["x"] == 5.0
    assert json.loads((tmp_path / "w" / "final_metrics.json").read_text())["loss"] == 4.0


def _check_sweep(workdir, y):
    with open(workdir / "sweep.csv") as f:
        rows = list(csv.DictReader(f))
    assert [r["variant"] for r in rows] == ["x=1", "x=3", "far"]
    assert [float(r["loss"]) for r in rows] == [4.0, 0.0, 49.0]
    assert all(r["status"] == "ok" and int(r["y"]) == y for r in rows)
    md = (workdir / "sweep.md").read_text().splitlines()
    assert md[0].startswith("| variant | status | x |") and len(md) == 2 + 3
    far = json.loads((workdir / "far" / "config.json").read_text())
    assert far["x"] == 10.0 and far["nested"]["z"] == "b" and far["y"] == y


def test_sweep_sequential_and_parallel(tmp_path):
    toy = _toy(tmp_path)
    out = _launch(f"--config={toy}", f"--workdir={tmp_path / 'seq'}", "--sweep")
    assert out.returncode == 0, out.stderr[-3000:]
    _check_sweep(tmp_path / "seq", y=1)
    out = _launch(
        f"--config={toy}",
        f"--workdir={tmp_path / 'par'}",
        "--sweep",
        "--parallel=2",
        "--config.y=7",
    )
    assert out.returncode == 0, out.stderr[-3000:]
    _check_sweep(tmp_path / "par", y=7)


def test_sigterm_checkpoints_and_exits_cleanly(tmp_path):
    """A real sft run (one Mamba layer, to compile fast) stopped by SIGTERM mid-training."""
    workdir = tmp_path / "run"
    env = dict(os.environ, PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""))
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "nemocascade.launch",
            "--config=configs/sft_tiny.py:fast",
            f"--workdir={workdir}",
            "--config.model.pattern=M",
            "--config.train.steps=100000",
            "--config.train.checkpoint_every=100000",
            "--config.data.eval_records=0",
            "--config.train.best_metric=loss",
            "--config.train.progress=False",
        ],
        cwd=ROOT,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    metrics = workdir / "metrics.jsonl"
    deadline = time.time() + 150
    while time.time() < deadline and proc.poll() is None:
        if metrics.exists() and len(metrics.read_text().splitlines()) >= 3:
            break
        time.sleep(0.2)
    assert proc.poll() is None, proc.stdout.read()[-3000:]
    proc.send_signal(signal.SIGTERM)
    log = proc.communicate(timeout=60)[0]
    assert proc.returncode == 0, log[-3000:]
    assert "resume with the same command: python -m nemocascade.launch" in log
    final = json.loads((workdir / "final_metrics.json").read_text())
    assert final["preempted"] is True
    last = json.loads(metrics.read_text().splitlines()[-1])["step"]
    assert final["step"] == last >= 3
    assert os.listdir(workdir / "checkpoints") == [str(last)]


def test_simulated_cpu_devices_get_a_thread_pool_no_collective_can_starve(monkeypatch):
    """With N simulated CPU devices XLA's intra-op pool must hold more threads than collectives
    can keep waiting at once (`sharding.reserve_cpu_collective_threads`: NPROC = 8 N); a
    user's NPROC is kept, and one device changes nothing. The pool really takes that size (a
    fresh process: XLA reads NPROC when its CPU client starts)."""
    from nemocascade.sharding import reserve_cpu_collective_threads

    monkeypatch.delenv("NPROC", raising=False)
    monkeypatch.delenv("JAX_NUM_CPU_DEVICES", raising=False)
    monkeypatch.setenv("XLA_FLAGS", "--xla_force_host_platform_device_count=4 --xla_cpu_x=1")
    assert reserve_cpu_collective_threads() == max(os.cpu_count(), 32) == int(os.environ["NPROC"])
    monkeypatch.setenv("NPROC", "5")
    assert reserve_cpu_collective_threads() is None and os.environ["NPROC"] == "5"
    monkeypatch.delenv("NPROC")
    monkeypatch.setenv("XLA_FLAGS", "")
    assert reserve_cpu_collective_threads() is None and "NPROC" not in os.environ
    code = (
        "import os, jax\n"
        "from nemocascade.sharding import reserve_cpu_collective_threads\n"
        "n = reserve_cpu_collective_threads(); jax.devices()\n"
        "pool = [t for t in os.listdir('/proc/self/task')\n"
        "        if 'XLAEigen' in open(f'/proc/self/task/{t}/comm').read()]\n"
        "print(n, len(pool))\n"
    )
    env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=8")
    env.pop("NPROC", None)
    out = subprocess.run(
        [sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True
    )
    n, pool = map(int, out.stdout.split())
    assert n == max(os.cpu_count(), 64) and pool == n
