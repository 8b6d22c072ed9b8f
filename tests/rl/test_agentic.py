"""The agentic stage's host side without a model: episode metrics (success by number of turns,
finish reasons, environment failures) and the batch of kept groups (dynamic filtering, rounds,
groups with an environment failure dropped)."""

import numpy as np
import pytest

from nemocascade.jobs.evaluation import episode_envs
from nemocascade.jobs.stages import parse_stage
from nemocascade.rl import agentic
from nemocascade.rl.config import EnvStageConfig
from nemocascade.rl.trajectory import Trajectory
from nemocascade.train.grpo import GRPOConfig


def _traj(reward, turns=1, reason="submitted", domain="swe", n=6, info=None):
    ids = np.arange(n, dtype=np.int32) + 3
    mask = np.array([0, 0, 1, 1, 0, 1][:n], np.int32)
    return Trajectory(
        episode=0,
        record={"domain": domain},
        ids=ids,
        loss_mask=mask,
        logprobs=-0.5 * mask.astype(np.float32),
        logprobs_untempered=-0.5 * mask.astype(np.float32),
        prompt_len=2,
        messages=[],
        finish_reason=reason,
        reward=float(reward),
        reward_info=info or {},
        turns=turns,
        tool_calls=turns,
        tool_errors=0,
    )


def test_episode_metrics_split_success_by_turns():
    trajs = [
        _traj(1.0, turns=1),
        _traj(1.0, turns=3),
        _traj(0.0, turns=4, reason="max_turns"),
        _traj(0.0, turns=2, reason="sandbox_error"),
        _traj(0.0, turns=2, reason="submitted", info={"status": "sandbox_error"}),
    ]
    m = agentic.episode_metrics(trajs)
    assert m["success_rate"] == 0.4
    assert (m["success_first_turn"], m["success_after_feedback"]) == (0.2, 0.2)
    assert (m["success_turns/1"], m["success_turns/3"]) == (0.2, 0.2)
    assert m["finish/submitted"] == 3 and m["finish/max_turns"] == 1
    # the sandbox failed while running the episode, or while scoring it: no verdict either way
    assert m["reward_error_frac"] == 0.4 and m["reward_errors/sandbox_error"] == 2
    assert m["reward_mean"] == pytest.approx(2 / 3)  # over the episodes with a verdict
    assert m["turns"] == 2.4 and m["truncated_frac"] == 0.2 and m["episode_tokens"] == 6


def test_episode_batch_keeps_whole_informative_groups_over_rounds():
    rounds = [
        # group 0 all equal (filtered), group 1 informative, group 2 has an environment error
        [_traj(0), _traj(0), _traj(1), _traj(0), _traj(1), _traj(0, reason="env_error")],
        [_traj(1), _traj(1), _traj(0), _traj(1), _traj(1), _traj(0)],
    ]
    calls = []

    def sample_round(r):
        calls.append(r)
        return rounds[r]

    cfg = GRPOConfig(dynamic_filtering=True)
    batch, m = agentic.episode_batch(
        sample_round, rows=4, group_size=2, rounds=3, cfg=cfg, seq_len=16, pad_id=0
    )
    assert calls == [0, 1]  # the second round filled the batch
    assert batch["input_ids"].shape == (4, 16) and m["gen_rounds"] == 2
    # kept: round 0 group 1, round 1 group 1 (rewards 0/1 and 0/1): advantages +-1/sqrt(2)
    np.testing.assert_allclose(np.abs(batch["advantages"]), 1 / np.sqrt(2), rtol=1e-5)
    assert batch["loss_mask"].sum() == 4 * 3  # the model's own targets only
    assert m["groups_error_frac"] == pytest.approx(1 / 6)
    none, m = agentic.episode_batch(
        lambda r: rounds[0][:2], rows=2, group_size=2, rounds=1, cfg=cfg, seq_len=16, pad_id=0
    )
    assert none is None and m["groups_filtered_frac"] == 1.0


def test_env_config_problems_and_episode_domains():
    env = EnvStageConfig(name="swe", max_turns=0, tool_timeout_s=0.0)
    assert env.problems("stages.s.env") == [
        "stages.s.env.max_turns=0: must be >= 1",
        "stages.s.env.tool_timeout_s=0.0: must be > 0 (seconds)",
    ]
    stage = {
        "type": "grpo",
        "domains": "swe",
        "steps": 1,
        "prompts_per_step": 1,
        "samples_per_prompt": 2,
        "max_new_tokens": 8,
        "temperature": 1.0,
        "top_p": 1.0,
        "thinking": False,
        "loss": {},
        "optim": {"lr": 1e-3},
        "env": {"name": "swe", "max_turns": 3},
    }
    stages = {"swe_rl": parse_stage("swe_rl", stage)}
    swe = [{"verifier": {"type": "swe"}}]
    math = [{"verifier": {"type": "math", "answer": "1"}}]
    got = episode_envs(["swe_rl"], stages, {"swe": swe, "math": math})
    assert set(got) == {"swe"} and got["swe"].max_turns == 3  # the stage's limits
    got = episode_envs([], {}, {"swe": swe, "math": math})  # no stage: the default limits
    assert got == {"swe": EnvStageConfig(name="swe")}
    with pytest.raises(ValueError, match="env is for grpo stages"):
        parse_stage("x", {**stage, "reward": "bt", "reward_model_path": "p"})
