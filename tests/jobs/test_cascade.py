"""A 2-stage mini Cascade (SFT -> GRPO) end to end: outputs, schema, teacher registry, resume."""

import json
import os
import signal
from pathlib import Path

import jax
import numpy as np
import pytest
from ml_collections import ConfigDict

from configs.tiny_cascade import get_config
from nemocascade.jobs.cascade import Cascade, CascadePlan


def _config():
    c = get_config("fast")
    c.progress = False
    c.num_workers = 1
    c.mesh.data = 1  # one device of the simulated eight: faster, and the code path of a laptop
    c.stages.sft.domains = "instruction,math,code"  # the chat domain has tests of its own
    c.data.train_per_domain = 64
    c.data.eval_per_domain = 8
    c.eval.max_new_tokens = 12
    c.stage_order = "sft,math_rl"
    c.stages.sft.steps = 4
    c.stages.sft.batch_size = 4
    c.stages.sft.seq_len = 64
    c.stages.math_rl.steps = 2
    c.stages.math_rl.prompts_per_step = 4
    c.stages.math_rl.samples_per_prompt = 2
    c.stages.math_rl.max_new_tokens = 8
    c.stages.math_rl.max_gen_batches = 1
    c.stages.math_rl.checkpoint_every = 1
    c.stages.math_rl.eval_every = 2  # the held-out learning curve within the stage
    c.stages.mopd.domains = "math,code"
    c.stages.mopd.steps = 1
    c.stages.mopd.prompts_per_step = 4
    c.stages.mopd.samples_per_prompt = 2
    c.stages.mopd.max_new_tokens = 8
    return c


def _json(path):
    with open(path) as f:
        return json.load(f)


def _lines(path):
    with open(path) as f:
        return [json.loads(line) for line in f if line.strip()]


@pytest.mark.slow
def test_two_stage_pipeline_outputs_and_resume(tmp_path):
    work = str(tmp_path / "run")
    c = _config()
    final = Cascade(c, work).run()
    assert set(final) == {"final_code", "final_instruction", "final_math"}

    summary = _json(os.path.join(work, "summary.json"))
    assert [s["name"] for s in summary["stages"]] == ["sft", "math_rl"]
    for s in summary["stages"]:
        assert set(s) >= {"name", "type", "domains", "eval"}
        assert set(s["eval"]) == {"code", "instruction", "math"}
        assert all(0.0 <= v <= 100.0 for v in s["eval"].values())
    assert summary["stages"][1]["type"] == "grpo" and summary["stages"][1]["domains"] == ["math"]
    # the registry names, per domain, the stage with the best score (first one on ties)
    for d, stage in summary["teachers"].items():
        scores = {s["name"]: s["eval"][d] for s in summary["stages"]}
        assert scores[stage] == max(scores.values())
    report = Path(work, "report.md").read_text()
    assert "| sft |" in report and "| math_rl |" in report and "(best)" in report
    assert os.path.getsize(os.path.join(work, "scores.png")) > 1000
    rl_metrics = _lines(os.path.join(work, "stages", "math_rl", "metrics.jsonl"))
    assert [r["step"] for r in rl_metrics] == [1, 2]
    assert all("reward/math" in r and "loss" in r for r in rl_metrics)
    assert "eval/math" not in rl_metrics[0]
    # each stage's per-problem scores are kept; math_rl is compared to its start, problem by
    # problem: the paired difference is the difference of the two scores
    for s in summary["stages"]:
        assert os.path.exists(os.path.join(work, "stages", s["name"], "eval_problems.json"))
    sft, rl = summary["stages"]
    assert sft["paired_ci95"] == {}
    for d, (delta, lo, hi) in rl["paired_ci95"]["sft"].items():
        assert delta == pytest.approx(rl["eval"][d] - sft["eval"][d], abs=0.02)
        assert lo <= delta <= hi
    delta, lo, hi = rl["paired_ci95"]["sft"]["math"]
    assert f"- `math_rl` vs `sft`: math {delta:+.1f} [{lo:+.1f}, {hi:+.1f}]" in report
    assert set(rl_metrics[1]) >= {"eval/math", "eval/code", "eval/instruction"}

    # re-running a finished pipeline repeats nothing
    Cascade(c, work).run()
    assert _json(os.path.join(work, "summary.json")) == summary
    assert len(_lines(os.path.join(work, "stages", "math_rl", "metrics.jsonl"))) == 2

    # MOPD after the GRPO stage: every domain scored by its registered teacher
    c.stage_order = "sft,math_rl,mopd"
    Cascade(c, work).run()
    summary = _json(os.path.join(work, "summary.json"))
    assert [s["name"] for s in summary["stages"]] == ["sft", "math_rl", "mopd"]
    mopd = _lines(os.path.join(work, "stages", "mopd", "metrics.jsonl"))
    assert len(mopd) == 1 and {"in_band_fraction", "advantage", "loss"} <= set(mopd[0])
    # MOPD is compared with its start and with every teacher, problem by problem
    before = summary["stages"][:2]
    teachers = {  # the best stage per domain before MOPD, the earlier one on ties
        max(before, key=lambda s: (s["eval"][d], -before.index(s)))["name"]
        for d in summary["stages"][2]["domains"]
    }
    assert set(summary["stages"][2]["paired_ci95"]) == {"math_rl"} | teachers
    # the full-vocabulary reverse-KL objective: the registered teachers run inside the step
    c.stages.mopd_rkl = ConfigDict(c.stages.mopd.to_dict())
    c.stages.mopd_rkl.loss.objective = "reverse_kl"
    c.stage_order = "sft,math_rl,mopd_rkl"
    Cascade(c, work).run()
    rkl = _lines(os.path.join(work, "stages", "mopd_rkl", "metrics.jsonl"))
    assert len(rkl) == 1 and rkl[0]["reverse_kl"] >= 0 and rkl[0]["skipped"] == 0

    # a side branch from SFT, and an MOPD stage whose math teacher is that branch by name: the
    # branch starts from sft, the MOPD stage from the main chain (math_rl)
    c.stages.branch = ConfigDict(c.stages.math_rl.to_dict())
    c.stages.branch.update(start_from="sft", steps=1, eval_every=0)
    c.stages.mopd_named = ConfigDict(c.stages.mopd.to_dict())
    c.stages.mopd_named.teachers = {"math": "branch"}
    c.stage_order = "sft,math_rl,branch,mopd_named"
    cascade = Cascade(c, work)
    cascade.run()
    starts = {
        s["name"]: s["start_from"] for s in _json(os.path.join(work, "summary.json"))["stages"]
    }
    assert starts["branch"] == "sft" and starts["mopd_named"] == "math_rl"
    best = _json(os.path.join(work, "summary.json"))["teachers"]
    teachers = cascade._teachers("mopd_named", cascade.stages["mopd_named"], best)
    branch_params = cascade._load_final("branch")[0]
    for a, b in zip(
        jax.tree.leaves(teachers["math"].state[0]), jax.tree.leaves(branch_params), strict=True
    ):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    assert teachers["code"].state[0] is not None  # the others: their best stage so far
    c.stage_order = "sft,math_rl"
    summary["stages"] = summary["stages"][:2]

    # resume mid-stage: forget that math_rl finished and ask for one more step
    summary["stages"] = summary["stages"][:1]
    Path(work, "summary.json").write_text(json.dumps(summary))
    c.stages.math_rl.steps = 3
    Cascade(c, work).run()
    assert [
        r["step"] for r in _lines(os.path.join(work, "stages", "math_rl", "metrics.jsonl"))
    ] == [1, 2, 3]
    assert [s["name"] for s in _json(os.path.join(work, "summary.json"))["stages"]] == [
        "sft",
        "math_rl",
    ]


def test_bad_stage_config_is_named(tmp_path):
    c = _config()
    c.stage_order = "sft,nope"
    with pytest.raises(KeyError, match="nope"):
        Cascade(c, str(tmp_path))
    c = _config()
    c.stages.sft.type = "dpo"
    with pytest.raises(ValueError, match="stages.sft.type"):
        Cascade(c, str(tmp_path))


def test_train_counts_size_one_domain():
    """`data.train_counts`: the named domain gets its own count of synthetic problems (the first
    ones of the same stream), the others `train_per_domain`; bad counts and domains no stage
    trains are refused naming the key."""
    c = _config()
    c.data.train_counts = {"code": 20}
    records = CascadePlan.check(c).records
    assert len(records("code", "sft")) == 20 and len(records("code", "rl")) == 20
    assert len(records("math", "sft")) == 64
    c.data.train_counts = {}
    assert CascadePlan.check(c).records("code", "sft")[:20] == records("code", "sft")
    for bad in ({"code": 0}, {"code": 2.5}, {"poetry": 5}):
        c.data.train_counts = bad
        with pytest.raises(ValueError, match="train_counts"):
            CascadePlan.check(c)


def test_sft_stops_at_measured_scores_and_stays_stopped(tmp_path, monkeypatch):
    """`stop_at`: the SFT is scored every `eval_every` steps on its stop_at domains only and ends
    at the first check where every one reaches its score (here math at the second check); the
    summary records the steps done and the scores that ended it, and a rerun trains no further.
    Invalid stop_at sections are refused with the key named."""
    calls = []

    def scripted(self, params, model_state, episodes=None, domains=None, intervals=None, **kw):
        calls.append(tuple(domains) if domains is not None else None)
        if domains is None:  # the evaluation after the stage
            return {d: 1.0 for d in self.eval_sets}
        return {"math": 10.0 * sum(1 for c in calls if c is not None)}  # 10, 20, ...

    monkeypatch.setattr(Cascade, "evaluate", scripted)
    c = _config()
    c.stage_order = "sft"
    c.stages.sft.update(steps=8, eval_every=2, checkpoint_every=8, stop_at={"math": 15.0})
    work = str(tmp_path / "run")
    Cascade(c, work).run()
    assert calls == [("math",), ("math",), None]  # checked at steps 2 and 4, stopped at 4
    entry = _json(os.path.join(work, "summary.json"))["stages"][0]
    assert entry["steps_done"] == 4 and entry["stopped_at"] == {"math": 20.0}
    metrics = _lines(os.path.join(work, "stages", "sft", "metrics.jsonl"))
    assert [r["step"] for r in metrics] == [1, 2, 3, 4]
    assert metrics[1]["eval/math"] == 10.0 and metrics[3]["stopped_early"] == 1
    report = Path(work, "report.md").read_text()
    assert "`sft` stopped at step 4" in report and "math 20.0" in report
    assert os.path.getsize(os.path.join(work, "curve_sft.png")) > 1000  # the stop checks plotted

    calls.clear()
    Cascade(c, work).run()  # finished: nothing trained, nothing evaluated
    assert calls == [] and len(_lines(os.path.join(work, "stages", "sft", "metrics.jsonl"))) == 4

    for bad, match in (
        ({"stop_at": {"chat": 10.0}}, "stop_at names domains"),
        ({"stop_at": {"math": 150.0}}, "percentages"),
        ({"stop_at": {"math": 10.0}, "eval_every": 0}, "eval_every"),
    ):
        c = _config()
        c.stages.sft.update(bad)
        with pytest.raises(ValueError, match=match):
            Cascade(c, str(tmp_path / "bad"))


def test_sft_trains_rows_of_several_lengths(tmp_path, monkeypatch):
    """`buckets`: records longer than `seq_len` train in the longer rows, the short ones in
    `seq_len` rows; both shapes are trained in one stage (one step function, two programs)."""
    import nemocascade.jobs.sft as sft_module

    shapes = []

    class Spy(sft_module.IteratorSource):
        def next_batch(self, state, step):
            batch, host = super().next_batch(state, step)
            shapes.append(batch["input_ids"].shape)
            return batch, host

    monkeypatch.setattr(sft_module, "IteratorSource", Spy)
    monkeypatch.setattr(Cascade, "evaluate", lambda self, *a, **k: {d: 1.0 for d in self.eval_sets})
    c = _config()
    c.stage_order = "sft"
    c.stages.sft.update(steps=12, seq_len=64, batch_size=4, checkpoint_every=12)
    c.stages.sft.buckets = [(160, 2)]
    work = str(tmp_path / "run")
    Cascade(c, work).run()
    assert set(shapes) == {(4, 64), (2, 160)}
    metrics = _lines(os.path.join(work, "stages", "sft", "metrics.jsonl"))
    assert len(metrics) == 12 and all(np.isfinite(r["loss"]) for r in metrics)

    for bad in ([(48, 2)], [(96, 2), (96, 1)], [(96, 0)]):
        c = _config()
        c.stages.sft.seq_len = 48
        c.stages.sft.buckets = bad
        with pytest.raises(ValueError, match="buckets"):
            Cascade(c, str(tmp_path / "bad"))


class _SigtermAfter:
    """A data iterator that sends this process SIGTERM when its `n`-th batch is taken."""

    def __init__(self, inner, n):
        self.inner, self.n, self.taken = inner, n, 0

    def __next__(self):
        self.taken += 1
        if self.taken == self.n:
            os.kill(os.getpid(), signal.SIGTERM)
        return next(self.inner)

    def __iter__(self):
        return self

    def get_state(self):
        return self.inner.get_state()

    def set_state(self, state):
        self.inner.set_state(state)


@pytest.mark.slow
def test_sigterm_stops_the_pipeline_and_the_rerun_resumes(tmp_path, monkeypatch):
    """SIGTERM in SFT or in an RL stage saves a checkpoint and stops the whole job (never the
    next stage on a partly trained model); running it again resumes where it stopped."""
    import nemocascade.jobs.sft as sft_mod
    from nemocascade.rl import RLStage
    from nemocascade.train.loop import IteratorSource, Preempted

    c, work = _config(), str(tmp_path / "run")
    handler = signal.getsignal(signal.SIGTERM)
    real_loop = sft_mod.train_loop
    monkeypatch.setattr(
        sft_mod,
        "train_loop",
        lambda **kw: real_loop(
            **{**kw, "source": IteratorSource(_SigtermAfter(kw["source"].iterator, 2))}
        ),
    )
    with pytest.raises(Preempted, match="stage sft: SIGTERM at step 2/4"):
        Cascade(c, work).run()
    assert not os.path.exists(os.path.join(work, "summary.json"))
    assert signal.getsignal(signal.SIGTERM) == handler
    monkeypatch.setattr(sft_mod, "train_loop", real_loop)

    real_next = RLStage.next_batch

    def batch_then_sigterm(self, state, step):
        out = real_next(self, state, step)
        if step == 1:
            os.kill(os.getpid(), signal.SIGTERM)
        return out

    monkeypatch.setattr(RLStage, "next_batch", batch_then_sigterm)
    with pytest.raises(Preempted, match="stage math_rl: SIGTERM at step 1/2"):
        Cascade(c, work).run()
    assert [s["name"] for s in _json(os.path.join(work, "summary.json"))["stages"]] == ["sft"]
    assert signal.getsignal(signal.SIGTERM) == handler
    monkeypatch.setattr(RLStage, "next_batch", real_next)

    Cascade(c, work).run()
    assert [
        r["step"] for r in _lines(os.path.join(work, "stages", "math_rl", "metrics.jsonl"))
    ] == [1, 2]
    assert [s["name"] for s in _json(os.path.join(work, "summary.json"))["stages"]] == [
        "sft",
        "math_rl",
    ]


@pytest.mark.slow
def test_reward_model_and_rlhf_stages(tmp_path):
    """A reward_model stage trains and exports a Bradley-Terry model on the chat domain's pairs;
    an RLHF stage trains against it (stage:rm) with KL to its start, logging the reward model's
    score beside the hidden rule's ground truth, plotted in the report; the policy chain skips
    the reward model stage."""
    c = _config()
    c.stages.sft.domains = "math,chat"
    c.stages.rm = ConfigDict(get_config().stages.rm.to_dict())
    c.stages.rm.update(steps=3, eval_pairs=16, batch_size=8, checkpoint_every=3)
    c.stages.rlhf = ConfigDict(get_config().stages.rlhf.to_dict())
    c.stages.rlhf.update(steps=2, prompts_per_step=4, samples_per_prompt=2, max_new_tokens=8)
    c.stages.rlhf.update(max_gen_batches=1, checkpoint_every=2)
    c.stage_order = "sft,rm,rlhf"
    work = str(tmp_path / "run")
    Cascade(c, work).run()
    summary = _json(os.path.join(work, "summary.json"))
    rm = summary["stages"][1]
    assert rm["type"] == "reward_model" and rm["eval"] == {}
    assert 0.0 <= rm["rm_eval"]["eval_accuracy"] <= 1.0 and rm["rm_eval"]["eval_pairs"] == 16
    assert os.path.exists(os.path.join(work, "stages", "rm", "reward_model", "reward_model.json"))
    rlhf = summary["stages"][2]
    assert rlhf["start_from"] == "sft"  # the chain skipped the reward model stage
    assert set(rlhf["eval"]) == {"chat", "math"}  # the domains of its stages
    rows = _lines(os.path.join(work, "stages", "rlhf", "metrics.jsonl"))
    assert len(rows) == 2
    for r in rows:
        assert {"reward_mean", "ground_truth_mean", "ground_truth/chat", "kl"} <= set(r)
        assert r["kl"] >= 0.0 and 0.0 <= r["ground_truth_mean"] <= 1.0
    report = Path(work, "report.md").read_text()
    assert "Reward model `rm`: held-out pair accuracy" in report and "reward_rlhf.png" in report
    assert os.path.getsize(os.path.join(work, "reward_rlhf.png")) > 1000

    # a later stage scoring with the finished rm whose export is gone: refused at launch,
    # before anything trains, naming the key and the missing directory
    export = os.path.join(work, "stages", "rm", "reward_model")
    os.rename(export, export + ".moved")
    c.stages.rlhf2 = ConfigDict(c.stages.rlhf.to_dict())
    c.stage_order = "sft,rm,rlhf,rlhf2"
    with pytest.raises(FileNotFoundError, match=r"stages\.rlhf2\.reward_model_path.*missing"):
        Cascade(c, work).run()
    assert not os.path.exists(os.path.join(work, "stages", "rlhf2"))
