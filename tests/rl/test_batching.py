"""Prompt draws, the dynamic-filtering refill (with grader errors) and batch assembly."""

import random

import numpy as np
import pytest

from nemocascade.rl import batching
from nemocascade.rl.rollouts import Rollouts
from nemocascade.train.grpo import GRPOConfig


def _pools():
    return {
        "a": [{"domain": "a", "id": i} for i in range(10)],
        "b": [{"domain": "b", "id": i} for i in range(10)],
        "c": [{"domain": "c", "id": i} for i in range(2)],
    }


def test_draw_prompts_mixes_by_weight_deterministically():
    pools = _pools()
    out = batching.draw_prompts(pools, 9, batching.prompt_rng(0, "s", 3, 0))
    assert sorted(r["domain"] for r in out) == ["a"] * 3 + ["b"] * 3 + ["c"] * 2  # c has only 2
    again = batching.draw_prompts(pools, 9, batching.prompt_rng(0, "s", 3, 0))
    assert out == again  # same (seed, stage, step, round): same prompts, same order
    other = batching.draw_prompts(pools, 9, batching.prompt_rng(0, "s", 4, 0))
    assert other != out
    # within one draw a domain never repeats a record
    ids = [(r["domain"], r["id"]) for r in out]
    assert len(set(ids)) == len(ids)
    weighted = batching.draw_prompts(
        {k: pools[k] for k in "ab"}, 8, random.Random(1), {"a": 3.0, "b": 1.0}
    )
    assert sum(r["domain"] == "a" for r in weighted) == 6
    assert batching.stable_seed(0, "s", 1) == batching.stable_seed(0, "s", 1)
    assert batching.stable_seed(0, "s", 1) != batching.stable_seed(0, "s", 2)


def _roll(rewards, errors=None, n=2, prompt=(5, 6), response=(7, 8)):
    rows = len(rewards)
    return Rollouts(
        records=[{"domain": "a"}] * rows,
        prompt_ids=[list(prompt)] * rows,
        response_ids=[list(response)] * rows,
        responses=["x"] * rows,
        finished=np.ones(rows, bool),
        sampler_logprobs=[np.full(len(response), -0.5, np.float32)] * rows,
        rewards=np.asarray(rewards, np.float32),
        errors=np.zeros(rows, bool) if errors is None else np.asarray(errors, bool),
        n=n,
        timings={},
        reward_metrics={},
    )


def test_collect_groups_refills_whole_informative_groups():
    rounds = [
        _roll([1, 1, 0, 1, 0, 0]),  # groups: uniform, informative, uniform
        _roll([1, 0, 1, 0, 0, 1]),  # three informative groups: only two still fit
    ]
    calls = []

    def sample_round(r):
        calls.append(r)
        return rounds[r]

    cfg = GRPOConfig(dynamic_filtering=True)
    parts, rolls, m = batching.collect_groups(sample_round, rows=6, group_size=2, rounds=3, cfg=cfg)
    assert calls == [0, 1] and len(rolls) == 2  # full after two rounds: no third
    assert [p.rows.tolist() for p in parts] == [[2, 3], [0, 1, 2, 3]]
    assert m["gen_rounds"] == 2 and m["groups_filtered_frac"] == pytest.approx(2 / 6)
    np.testing.assert_allclose(parts[0].extra["advantages"][2:4], [-0.707106, 0.707106], atol=1e-5)


def test_collect_groups_drops_groups_with_grader_errors():
    # row 1 has no verdict (its 0 is not a wrong answer): its whole group is dropped, and the
    # other informative group is kept; the errored group is counted
    roll = _roll([1, 0, 1, 0], errors=[False, True, False, False])
    parts, _, m = batching.collect_groups(
        lambda r: roll, rows=4, group_size=2, rounds=1, cfg=GRPOConfig(dynamic_filtering=True)
    )
    assert [p.rows.tolist() for p in parts] == [[2, 3]]
    assert m["groups_error_frac"] == pytest.approx(0.5)
    # without dynamic filtering too
    parts, _, _ = batching.collect_groups(
        lambda r: roll, rows=4, group_size=2, rounds=1, cfg=GRPOConfig()
    )
    assert [p.rows.tolist() for p in parts] == [[2, 3]]


def test_assemble_pads_to_fixed_rows_and_weights_the_mask():
    roll = _roll([1, 0, 1, 0])
    cfg = GRPOConfig(overlong_filtering=True)
    roll.finished[1] = False  # truncated: leaves the loss, stays in the baseline
    parts, _, _ = batching.collect_groups(lambda r: roll, rows=4, group_size=2, rounds=1, cfg=cfg)
    batch = batching.assemble(parts, rows=6, seq_len=8, pad_id=0)
    assert batch["input_ids"].shape == (6, 8) and batch["advantages"].shape == (6,)
    np.testing.assert_array_equal(batch["loss_mask"].sum(1), [2, 0, 2, 2, 0, 0])
    np.testing.assert_array_equal(batch["segment_ids"][4:], 0)  # padding rows
    np.testing.assert_allclose(batch["advantages"][:4], [0.707106, -0.707106] * 2, atol=1e-5)
    assert batching.assemble([], rows=6, seq_len=8, pad_id=0) is None
    with pytest.raises(ValueError, match="rows > rows=2"):
        batching.assemble(parts, rows=2, seq_len=8, pad_id=0)
