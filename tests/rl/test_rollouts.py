"""Rollout rows -> training batch layout, and the reward memo."""

import numpy as np
import pytest

from nemocascade.rewards import RewardCache
from nemocascade.rl import rollouts as ro


def _roll():
    recs = [{"domain": "math", "verifier": {"type": "math", "answer": "3"}}] * 2
    return ro.Rollouts(
        records=recs,
        prompt_ids=[[5, 6, 7], [5, 6]],
        response_ids=[[8, 9, 2], [10]],
        responses=["a", "b"],
        finished=np.array([True, False]),
        sampler_logprobs=[np.array([-0.1, -0.2, -0.3], np.float32), np.array([-0.5], np.float32)],
        rewards=np.array([1.0, 0.0], np.float32),
        errors=np.array([False, False]),
        n=2,
        timings={},
        reward_metrics={},
    )


def test_training_batch_layout():
    b = ro.training_batch(_roll(), num_rows=3, seq_bucket=8)
    assert b["input_ids"].shape == (3, 8)
    np.testing.assert_array_equal(b["input_ids"][0, :5], [5, 6, 7, 8, 9])
    np.testing.assert_array_equal(b["targets"][0, :5], [6, 7, 8, 9, 2])
    # loss on targets that are response tokens only: 8, 9, 2
    np.testing.assert_array_equal(b["loss_mask"][0, :6], [0, 0, 1, 1, 1, 0])
    np.testing.assert_allclose(b["sampler_logprobs"][0, 2:5], [-0.1, -0.2, -0.3])
    np.testing.assert_array_equal(b["segment_ids"][0], [1] * 5 + [0] * 3)
    np.testing.assert_array_equal(b["loss_mask"][1, :3], [0, 1, 0])
    assert b["loss_mask"][2].sum() == 0 and b["segment_ids"][2].sum() == 0  # padding row


def test_training_batch_exact_length():
    b = ro.training_batch(_roll(), seq_len=6)  # not a power of two: the RL stage's length
    assert b["input_ids"].shape == (2, 6)
    np.testing.assert_array_equal(b["loss_mask"][0], [0, 0, 1, 1, 1, 0])
    with pytest.raises(ValueError, match="does not fit seq_len=4"):
        ro.training_batch(_roll(), seq_len=4)


def test_reward_cache_reuses_identical_pairs():
    cache = RewardCache()
    recs = [{"verifier": {"type": "math", "answer": "4"}}] * 3
    s, _, m = cache.score(
        recs, ["\\boxed{4}", "\\boxed{4}", "\\boxed{5}"], [True] * 3, num_workers=1, timeout_s=30
    )
    np.testing.assert_array_equal(s, [1.0, 1.0, 0.0])
    assert m["scored"] == 2 and m["reused"] == 1
    s2, _, m2 = cache.score(recs[:1], ["\\boxed{4}"], [True], num_workers=1, timeout_s=30)
    assert s2[0] == 1.0 and m2["scored"] == 0


def test_domain_means():
    assert ro.domain_means(np.array([1.0, 0.0, 1.0]), ["a", "b", "a"]) == {"a": 1.0, "b": 0.0}
