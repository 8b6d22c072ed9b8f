"""The training loop end to end on configs/sft_tiny.py:fast (tiny model, 30 steps, CPU).

One uninterrupted run is the reference; a crashed run and a SIGTERM-ed run are resumed and must
end with bitwise the same parameters and the same per-step losses.
"""

import json
import math
import os
import pathlib
import signal

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from nemocascade import config_files as configs_lib
from nemocascade.jobs import sft as sft_job
from nemocascade.sharding import make_mesh
from nemocascade.train import loop as loop_lib
from nemocascade.train.checkpoint import Checkpointer
from nemocascade.train.metrics import read_metrics
from nemocascade.train.optim import OptimConfig, lr_schedule

CONFIG = os.path.join(os.path.dirname(__file__), "..", "..", "configs", "sft_tiny.py")


class _Crash(RuntimeError):
    pass


@pytest.fixture(scope="module")
def compile_cache(tmp_path_factory):
    """Reruns in this module hit a persistent compilation cache (restored afterwards)."""
    keys = (
        "jax_compilation_cache_dir",
        "jax_persistent_cache_min_compile_time_secs",
        "jax_persistent_cache_min_entry_size_bytes",
    )
    old = {k: getattr(jax.config, k) for k in keys}
    jax.config.update("jax_compilation_cache_dir", str(tmp_path_factory.mktemp("jax_cache")))
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
    jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)
    yield
    for k, v in old.items():
        jax.config.update(k, v)


def _config():
    config = configs_lib.load_config(CONFIG + ":fast")
    with config.unlocked():
        config.train.progress = False
    return config


@pytest.fixture(scope="module")
def reference(tmp_path_factory, compile_cache):
    workdir = str(tmp_path_factory.mktemp("ref"))
    final = sft_job.run_sft(_config(), workdir)
    return workdir, final


def _final_params(workdir, config):
    abstract = sft_job.abstract_train_state(config)
    ckpt = Checkpointer(os.path.join(workdir, loop_lib.CHECKPOINT_DIR))
    try:
        step = ckpt.all_steps()[-1]
        return step, ckpt.restore(step, abstract)[0]
    finally:
        ckpt.close()


def _with_hook(monkeypatch, hook):
    real = sft_job.train_loop

    def patched(**kw):
        return real(**kw, on_record=hook)

    monkeypatch.setattr(sft_job, "train_loop", patched)


def _assert_same_run(workdir, ref_dir, config):
    step_a, a = _final_params(ref_dir, config)
    step_b, b = _final_params(workdir, config)
    assert step_a == step_b == config.train.steps
    leaves_a, leaves_b = jax.tree.leaves(a), jax.tree.leaves(b)
    assert len(leaves_a) == len(leaves_b)
    for x, y in zip(leaves_a, leaves_b, strict=True):
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))  # bitwise
    ra, rb = read_metrics(ref_dir), read_metrics(workdir)
    assert [r["step"] for r in rb] == list(range(1, config.train.steps + 1))
    assert [r["loss"] for r in ra] == [r["loss"] for r in rb]


def test_loss_falls_and_logs(reference):
    workdir, final = reference
    config = _config()
    records = read_metrics(workdir)
    assert [r["step"] for r in records] == list(range(1, config.train.steps + 1))
    losses = [r["loss"] for r in records]
    assert losses[0] > math.log(512) - 0.5  # starts near uniform over the vocabulary
    assert np.mean(losses[-5:]) < losses[0] - 1.5
    assert final["step"] == config.train.steps and final["eval_loss"] < losses[0] - 1.0
    ocfg = OptimConfig.from_mapping(config.optim.to_dict())
    lr = lr_schedule(ocfg, config.train.steps)
    np.testing.assert_allclose(
        [r["lr"] for r in records], [float(lr(s)) for s in range(config.train.steps)], rtol=1e-6
    )
    assert all(r["skipped"] == 0 and r["tokens_per_s"] > 0 for r in records)
    assert any(f.startswith("events.out.tfevents") for f in os.listdir(os.path.join(workdir, "tb")))


def test_export_to_hugging_face_format(reference):
    from flax import nnx

    from nemocascade.model import load_hf_checkpoint

    workdir, _ = reference
    config = _config()
    path = sft_job.export_hf(config, workdir)
    assert {"config.json", "tokenizer.json"} <= set(os.listdir(path))
    model = load_hf_checkpoint(path)
    _, params, model_state = nnx.split(model, nnx.Param, ...)
    _, state = _final_params(workdir, config)
    ours = jax.tree.leaves((state.params, state.model_state))
    theirs = jax.tree.leaves((params, model_state))
    assert len(ours) == len(theirs)
    for a, b in zip(ours, theirs, strict=True):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def test_rerun_of_finished_run_does_nothing(reference):
    workdir, final = reference
    metrics_path = pathlib.Path(workdir) / "metrics.jsonl"
    before = metrics_path.read_text()
    steps = sorted(os.listdir(os.path.join(workdir, loop_lib.CHECKPOINT_DIR)))
    again = sft_job.run_sft(_config(), workdir)
    assert again["step"] == final["step"] and again["loss"] == final["loss"]
    assert metrics_path.read_text() == before
    assert sorted(os.listdir(os.path.join(workdir, loop_lib.CHECKPOINT_DIR))) == steps


def test_resume_after_crash_is_bitwise(reference, tmp_path, monkeypatch):
    config = _config()

    def crash(record):
        if record["step"] == 15:  # checkpoints at 10, 20, 30: resumes from 10
            raise _Crash("simulated kill")

    _with_hook(monkeypatch, crash)
    with pytest.raises(_Crash):
        sft_job.run_sft(config, str(tmp_path))
    assert max(r["step"] for r in read_metrics(tmp_path)) == 15
    monkeypatch.undo()
    sft_job.run_sft(config, str(tmp_path))
    _assert_same_run(str(tmp_path), reference[0], config)


def test_sigterm_saves_and_resumes(reference, tmp_path, monkeypatch):
    config = _config()

    def term(record):
        if record["step"] == 22:
            os.kill(os.getpid(), signal.SIGTERM)

    _with_hook(monkeypatch, term)
    handler_before = signal.getsignal(signal.SIGTERM)
    out = sft_job.run_sft(config, str(tmp_path))
    assert signal.getsignal(signal.SIGTERM) is handler_before  # the loop's handler is removed
    assert out["preempted"] and out["step"] == 23  # noticed after the next step was dispatched
    ckpt_dir = os.path.join(str(tmp_path), loop_lib.CHECKPOINT_DIR)
    assert "23" in os.listdir(ckpt_dir)
    monkeypatch.undo()
    sft_job.run_sft(config, str(tmp_path))
    _assert_same_run(str(tmp_path), reference[0], config)


class _Counter:
    def __init__(self):
        self.i = 0

    def __next__(self):
        self.i += 1
        return {"x": np.ones((8, 2), np.float32)}

    def get_state(self):
        return {"i": self.i}

    def set_state(self, state):
        self.i = state["i"]


def test_nonfinite_steps_abort_with_a_clear_message(tmp_path):
    cfg = loop_lib.LoopConfig(
        steps=50, checkpoint_every=100, max_consecutive_skips=3, progress=False, best_metric=""
    )

    def step(state, batch):
        loss = jnp.where(state["n"] >= 2, jnp.nan, 1.0)
        skipped = (~jnp.isfinite(loss)).astype(jnp.int32)
        return {"n": state["n"] + 1}, {"loss": loss, "skipped": skipped}

    with pytest.raises(loop_lib.NonFiniteError, match="NaN/Inf for 3 consecutive steps"):
        loop_lib.train_loop(
            config=cfg,
            workdir=tmp_path,
            mesh=make_mesh(),
            init=lambda: {"n": jnp.zeros((), jnp.int32)},
            step_fn=step,
            source=loop_lib.IteratorSource(_Counter()),
        )
    records = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [r["skipped"] for r in records] == [0, 0, 1, 1, 1]
    assert records[-1]["skipped_total"] == 3 and records[-1]["loss"] == "nan"


def test_until_stops_early_checkpoints_and_a_rerun_stays_stopped(tmp_path):
    """`until` ends the loop after the first evaluation it accepts (an SFT sized by a measured
    score): that step is checkpointed even off the checkpoint interval, and a rerun restores it
    and trains no further; without `until` the same loop runs all its steps."""
    cfg = loop_lib.LoopConfig(
        steps=40, checkpoint_every=100, eval_every=5, progress=False, best_metric=""
    )

    def step(state, batch):
        return {"n": state["n"] + 1}, {"loss": jnp.float32(1.0), "skipped": jnp.int32(0)}

    seen = []

    def eval_fn(state):
        seen.append(int(state["n"]))
        return {"eval/score": 10.0 * float(state["n"])}

    def run(workdir, until):
        return loop_lib.train_loop(
            config=cfg,
            workdir=workdir,
            mesh=make_mesh(),
            init=lambda: {"n": jnp.zeros((), jnp.int32)},
            step_fn=step,
            source=loop_lib.IteratorSource(_Counter()),
            eval_fn=eval_fn,
            eval_on_checkpoint=False,
            until=until,
        )

    def until(metrics):
        return metrics["eval/score"] >= 120.0  # reached at step 15 (evaluated at 5, 10, 15)

    result = run(tmp_path / "a", until)
    assert result.stopped_early and not result.preempted
    assert int(result.state["n"]) == 15 and seen == [5, 10, 15]
    assert result.record["step"] == 15 and result.record["stopped_early"] == 1
    ckpt = Checkpointer(os.path.join(tmp_path / "a", loop_lib.CHECKPOINT_DIR))
    try:
        assert ckpt.all_steps() == [15]  # saved although 15 is off checkpoint_every
    finally:
        ckpt.close()

    again = run(tmp_path / "a", until)  # the rerun: restored, already stopped, no step
    assert again.stopped_early and int(again.state["n"]) == 15 and seen == [5, 10, 15]

    full = run(tmp_path / "b", None)
    assert not full.stopped_early and int(full.state["n"]) == 40
