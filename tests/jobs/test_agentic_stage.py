"""The agentic GRPO stage in a mini Cascade (SFT on tool-calling repairs -> swe_rl) end to end:
episode metrics per step, the held-out swe domain scored by episodes, the summary and report;
and its config problems named before anything trains."""

import json
import os
from pathlib import Path

import pytest

from configs.tiny_cascade import get_config
from nemocascade.jobs import validate
from nemocascade.jobs.cascade import Cascade
from nemocascade.jobs.validate import StageValidationError
from nemocascade.rewards.sandbox import SandboxStatus, sandbox_status


def _config():
    c = get_config("swe")
    c.progress = False
    c.num_workers = 1
    c.mesh.data = 1  # one device of the simulated eight
    c.model.pattern = "M*E"  # three blocks: Mamba, attention, MoE
    c.data.train_per_domain = 16
    c.data.eval_per_domain = 2
    c.eval.max_new_tokens = 16
    c.eval.slots = 4  # the training rounds' slot count: one compiled decode for both
    c.stages.sft.steps = 2
    c.stages.sft.batch_size = 2
    c.stages.sft.seq_len = 256
    c.stages.swe_rl.update(
        steps=2, prompts_per_step=2, samples_per_prompt=2, max_new_tokens=16, checkpoint_every=2
    )
    c.stages.swe_rl.loss.dynamic_filtering = False  # a random policy rarely succeeds
    c.stages.swe_rl.env.update(max_turns=2, max_episode_tokens=2048)
    return c


def _lines(path):
    with open(path) as f:
        return [json.loads(line) for line in f if line.strip()]


@pytest.mark.slow
@pytest.mark.skipif(not sandbox_status().usable, reason="the swe environment needs the sandbox")
def test_sft_then_swe_rl_pipeline(tmp_path):
    work = str(tmp_path / "run")
    final = Cascade(_config(), work).run()
    assert set(final) == {"final_swe"} and 0.0 <= final["final_swe"] <= 100.0

    rows = _lines(os.path.join(work, "stages", "swe_rl", "metrics.jsonl"))
    assert [r["step"] for r in rows] == [1, 2]
    for r in rows:
        assert 1 <= r["turns"] <= 2 and r["tool_calls"] >= 0 and r["tool_errors"] >= 0
        assert 0.0 <= r["success_rate"] <= 1.0 and r["episode_tokens"] > r["model_tokens"] > 0
        finish = {k: v for k, v in r.items() if k.startswith("finish/")}
        assert sum(finish.values()) == 4  # every episode of the step, counted by reason
        assert r["success_first_turn"] + r["success_after_feedback"] == r["success_rate"]
        assert "loss" in r and r["reward_error_frac"] == 0.0

    with open(os.path.join(work, "summary.json")) as f:
        summary = json.load(f)
    assert [s["name"] for s in summary["stages"]] == ["sft", "swe_rl"]
    for s in summary["stages"]:  # the swe domain is evaluated by episodes after every stage
        m = s["episodes"]["swe"]
        assert {"success_rate", "success_first_turn", "turns", "tool_calls"} <= set(m)
        assert s["eval"]["swe"] == pytest.approx(100 * m["reward_mean"], abs=0.01)
    assert "| swe_rl | swe |" in Path(work, "report.md").read_text()


@pytest.mark.slow
@pytest.mark.skipif(not sandbox_status().usable, reason="the swe environment needs the sandbox")
def test_swe_rl_episodes_sampled_one_step_ahead(tmp_path):
    """The asynchronous mode (`rollout_lag=1`) on the agentic stage: each step's episodes run in
    the sandbox from a background thread while the previous update trains."""
    c = _config()
    c.stages.swe_rl.update(steps=3, checkpoint_every=3, rollout_lag=1)
    c.stages.swe_rl.loss.importance_correction = "tis"
    work = str(tmp_path / "run")
    Cascade(c, work).run()
    rows = _lines(os.path.join(work, "stages", "swe_rl", "metrics.jsonl"))
    assert [r["rollout_lag"] for r in rows] == [0, 1, 1]
    for r in rows:
        assert 1 <= r["turns"] <= 2 and r["reward_error_frac"] == 0.0 and r["skipped"] == 0
        assert sum(v for k, v in r.items() if k.startswith("finish/")) == 4
        assert r["is_weight_mean"] > 0 and r["rollout_wait_s"] >= 0


def test_env_problems_are_named(tmp_path, monkeypatch):
    c = _config()
    c.stages.swe_rl.env.name = "nope"
    with pytest.raises(StageValidationError, match=r"stages\.swe_rl\.env\.name='nope'"):
        Cascade(c, str(tmp_path / "a"))
    c = _config()
    c.stages.swe_rl.env.max_turns = 0
    c.stages.swe_rl.env.tool_timeout_s = 0.0
    with pytest.raises(StageValidationError) as e:
        Cascade(c, str(tmp_path / "b"))
    assert "stages.swe_rl.env.max_turns=0: must be >= 1" in str(e.value)
    assert "stages.swe_rl.env.tool_timeout_s=0.0: must be > 0" in str(e.value)
    c = _config()  # records that cannot build the environment: named with the stage
    c.stages.swe_rl.env.name = "code_repair"
    with pytest.raises(StageValidationError, match=r"env\.name='code_repair' \(swe prompts\)"):
        Cascade(c, str(tmp_path / "c"))
    c = _config()  # no sandbox: named with the stage before anything trains
    monkeypatch.setattr(
        validate.sandbox,
        "sandbox_status",
        lambda: SandboxStatus(False, False, None, "bwrap not found"),
    )
    with pytest.raises(StageValidationError) as e:
        Cascade(c, str(tmp_path / "e"))
    assert "stages.swe_rl.env.name='swe': the environment's tools run in the sandbox" in str(
        e.value
    )
    c = _config()
    c.stages.swe_rl.env.bogus = 1
    with pytest.raises(ValueError, match=r"stages\.swe_rl\.env: unknown keys \['bogus'\]"):
        Cascade(c, str(tmp_path / "d"))
    assert not any((tmp_path / x).exists() for x in "abcde")
