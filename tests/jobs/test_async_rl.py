"""The asynchronous RL mode (issue 20, item 4) in a mini Cascade: a GRPO stage with
`rollout_lag=1` on a data mesh of two simulated devices (the sampler thread and the trainer
dispatch to the same devices) with the ICE-POP correction; its records show the lag, the wait
and the background sampling; a resume samples its first step on-policy."""

import json
import os

from configs.tiny_cascade import get_config
from nemocascade.jobs.cascade import Cascade


def _config():
    c = get_config("fast")
    c.progress = False
    c.num_workers = 1
    c.mesh.data = 2
    c.stages.sft.domains = "math"
    c.data.train_per_domain = 32
    c.data.eval_per_domain = 4
    c.eval.max_new_tokens = 8
    c.stage_order = "sft,math_rl"
    c.stages.sft.steps = 2
    c.stages.sft.batch_size = 4
    c.stages.sft.seq_len = 64
    c.stages.math_rl.update(
        steps=3,
        prompts_per_step=2,
        samples_per_prompt=2,
        max_new_tokens=8,
        max_gen_batches=1,
        checkpoint_every=2,
        eval_every=2,  # an evaluation while a batch is sampled ahead
        rollout_lag=1,
    )
    c.stages.math_rl.loss.dynamic_filtering = False
    c.stages.math_rl.loss.importance_correction = "icepop"
    return c


def _lines(path):
    with open(path) as f:
        return [json.loads(line) for line in f if line.strip()]


def test_one_step_off_policy_stage_and_its_resume(tmp_path):
    work = str(tmp_path / "run")
    c = _config()
    Cascade(c, work).run()
    path = os.path.join(work, "stages", "math_rl", "metrics.jsonl")
    rows = _lines(path)
    assert [r["step"] for r in rows] == [1, 2, 3]
    assert [r["rollout_lag"] for r in rows] == [0, 1, 1]
    assert "eval/math" in rows[1]  # evaluated while step 3's batch was sampled ahead
    for r in rows:
        assert r["skipped"] == 0 and "reward/math" in r
        assert r["rollout_wait_s"] >= 0 and r["logp_gap_mean"] >= 0
        assert 0.0 <= r["is_weight_mean"] <= 1.0  # ICE-POP: the share of tokens kept
    assert rows[0]["rollout_ahead_s"] == 0 and rows[1]["rollout_ahead_s"] > 0

    # resume one more step: the batch sampled ahead was not kept, the first step is on-policy
    summary_path = os.path.join(work, "summary.json")
    with open(summary_path) as f:
        summary = json.load(f)
    summary["stages"] = summary["stages"][:1]
    with open(summary_path, "w") as f:
        json.dump(summary, f)
    c.stages.math_rl.steps = 4
    Cascade(c, work).run()
    rows = _lines(path)
    assert [r["step"] for r in rows] == [1, 2, 3, 4]
    assert rows[3]["rollout_lag"] == 0
