"""Resume never destroys a run: identity checks, the tokenizer kept, corrupt checkpoints moved
aside, failed saves stop at once; and bad launches fail with one line naming the problem."""

import json
import os
import subprocess
import sys

import orbax.checkpoint as ocp
import pytest

from nemocascade import config_files
from nemocascade.jobs.identity import IncompatibleResume
from nemocascade.jobs.preflight import PreflightError
from nemocascade.launch import run_job
from nemocascade.train.checkpoint import CheckpointSaveError
from nemocascade.train.metrics import read_metrics

ROOT = os.path.abspath(os.path.join(os.path.dirname(__file__), "..", ".."))
CONFIG = os.path.join(ROOT, "configs", "sft_tiny.py")


def _config(steps=6, **data):
    c = config_files.load_config(CONFIG + ":fast")
    with c.unlocked():
        c.model.pattern = "M*E"  # quick to compile
        c.train.update(steps=steps, checkpoint_every=3, progress=False, async_checkpoint=False)
        c.train.best_metric = ""
        c.data.update(**{"num_records": 200, "eval_records": 16, **data})
    return c


def _listing(path):
    out = {}
    for root, _, files in os.walk(path):
        for f in files:
            p = os.path.join(root, f)
            out[os.path.relpath(p, path)] = os.path.getmtime(p)
    return out


@pytest.mark.slow
def test_resume_keeps_the_tokenizer_and_refuses_incompatible_changes(tmp_path):
    work = str(tmp_path / "run")
    run_job(_config(), work)
    tok = (tmp_path / "run" / "tokenizer.json").read_bytes()
    # another data size would train another tokenizer: the run's own one is kept instead
    run_job(_config(steps=9, num_records=300), work)
    assert (tmp_path / "run" / "tokenizer.json").read_bytes() == tok
    assert [r["step"] for r in read_metrics(work)] == list(range(1, 10))
    kept = json.loads((tmp_path / "run" / "config.1.json").read_text())
    assert kept["data"]["num_records"] == 200 and kept["train"]["steps"] == 6
    # another model shape cannot use the checkpoints: refused, listing the keys; nothing touched
    before = _listing(work)
    bad = _config(steps=12)
    with bad.unlocked():
        bad.model.hidden_size = 96
        bad.model.param_dtype = "bfloat16"
    with pytest.raises(IncompatibleResume) as e:
        run_job(bad, work)
    assert "model.hidden_size: 64 -> 96" in str(e.value)
    assert "model.param_dtype: 'float32' -> 'bfloat16'" in str(e.value)
    assert _listing(work) == before
    # a runtime-only change (remat, attention kernel) is compatible
    ok = _config(steps=12)
    with ok.unlocked():
        ok.model.remat = "block"
        ok.model.attention_impl = "blockwise"
    run_job(ok, work)
    assert read_metrics(work)[-1]["step"] == 12


@pytest.mark.slow
def test_corrupt_checkpoint_is_moved_aside_and_the_run_goes_on(tmp_path):
    work = tmp_path / "run"
    run_job(_config(steps=6), str(work))
    ckpts = work / "checkpoints"
    assert sorted(os.listdir(ckpts)) == ["3", "6"]
    for root, _, files in os.walk(ckpts / "6"):  # truncate every array file of the newest
        for f in files:
            if f != "_CHECKPOINT_METADATA":
                open(os.path.join(root, f), "wb").close()
    run_job(_config(steps=9), str(work))  # resumes from 3, saves 6 and 9 again
    assert sorted(os.listdir(ckpts)) == ["6", "9", "corrupt"]
    assert os.listdir(ckpts / "corrupt") == ["6"]
    assert [r["step"] for r in read_metrics(str(work))] == list(range(1, 10))
    run_job(_config(steps=9), str(work))  # and again: no crash loop


def test_failed_background_save_stops_the_run_at_once(tmp_path, monkeypatch):
    calls = {"n": 0}

    def check(self):
        calls["n"] += 1
        if calls["n"] > 4:
            raise RuntimeError("save failed") from OSError(28, "No space left on device")

    monkeypatch.setattr(ocp.CheckpointManager, "check_for_errors", check)
    with pytest.raises(CheckpointSaveError, match="No space left on device") as e:
        run_job(_config(steps=30), str(tmp_path / "run"))
    assert len(str(e.value).splitlines()) == 1
    assert len(read_metrics(str(tmp_path / "run"))) < 30


def test_preflight_names_the_problem_and_writes_nothing(tmp_path):
    c = _config()
    with c.unlocked():
        c.mesh.data = 8
        c.data.global_batch = 12  # not a multiple of the 8 batch shards
    with pytest.raises(PreflightError, match=r"data.global_batch=12 .* mesh"):
        run_job(c, str(tmp_path / "a"))
    assert not (tmp_path / "a").exists()
    c = _config()
    with c.unlocked():
        c.data.source = "jsonl"
        c.data.path = str(tmp_path / "missing.jsonl")
    with pytest.raises(PreflightError, match="data.path=.*missing.jsonl.*no such file"):
        run_job(c, str(tmp_path / "b"))
    (tmp_path / "file").write_text("x")
    with pytest.raises(PreflightError, match="is not a directory"):
        run_job(_config(), str(tmp_path / "file"))


def _launch(*args):
    env = dict(os.environ, PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""))
    return subprocess.run(
        [sys.executable, "-m", "nemocascade.launch", *args],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )


def test_bad_launches_fail_in_one_line(tmp_path):
    out = _launch("--config=configs/nope.py", f"--workdir={tmp_path / 'w'}")
    assert out.returncode == 2 and "Traceback" not in out.stderr
    assert "no such file 'configs/nope.py'" in out.stderr.strip().splitlines()[-1]
    broken = tmp_path / "broken.py"
    broken.write_text("def get_config(arg=''):\n    return 1 / 0\n")
    out = _launch(f"--config={broken}", f"--workdir={tmp_path / 'w'}")
    assert out.returncode == 2 and "Traceback" not in out.stderr
    assert f"{broken}:2: ZeroDivisionError" in out.stderr
    (tmp_path / "afile").write_text("x")
    out = _launch("--config=configs/sft_tiny.py:fast", f"--workdir={tmp_path / 'afile'}")
    assert out.returncode == 2 and "Traceback" not in out.stderr
    assert out.stderr.strip().endswith("exists and is not a directory")
