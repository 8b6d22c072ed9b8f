"""The one-step off-policy sampler (issue 20, the asynchronous mode): step n's batch comes from
the weights of step n - 1, sampled in the background while step n - 1 trains, on a copy the
loop's donation cannot free; lag 0 where nothing was sampled ahead (first step, resume); errors
of the background sampling raised at the step they were for; nothing sampled past the last
step; the stage option validated."""

import threading
import time

import jax.numpy as jnp
import numpy as np
import pytest

from nemocascade.rl.ahead import SampleAhead
from nemocascade.rl.config import RLStageConfig


class _Sampler:
    """make(weights, step): the batch is what it was sampled from (weights' value, step), in
    the thread that sampled it."""

    def __init__(self, delay: float = 0.0, fail_at: int | None = None):
        self.calls, self.delay, self.fail_at = [], delay, fail_at

    def __call__(self, weights, step):
        time.sleep(self.delay)
        if step == self.fail_at:
            raise RuntimeError(f"grader down at step {step}")
        value = float(np.asarray(weights["w"]))
        self.calls.append((step, value, threading.current_thread().name))
        return {"sampled_from": value, "step": step}, {"reward_mean": value}


def _weights(v):
    return {"w": jnp.asarray(v, jnp.float32)}


def test_each_batch_is_sampled_from_the_previous_steps_weights():
    sampler = _Sampler(delay=0.05)
    ahead = SampleAhead(sampler, last_step=4, name="t")
    seen = []
    for step in range(1, 5):
        w = _weights(step - 1)  # the trainer's weights at step `step`: step - 1 updates
        batch, record = ahead.next(w, step)
        w["w"].delete()  # what the loop's donation does to them next
        seen.append((batch["step"], batch["sampled_from"], record["rollout_lag"]))
        assert record["reward_mean"] == batch["sampled_from"]
        assert record["rollout_wait_s"] >= 0 and record["rollout_ahead_s"] >= 0
    ahead.close()
    # step 1 on-policy (nothing sampled ahead yet), then each step from the weights one update old
    assert seen == [(1, 0.0, 0), (2, 0.0, 1), (3, 1.0, 1), (4, 2.0, 1)]
    assert [c[0] for c in sampler.calls] == [1, 2, 3, 4]  # nothing past the last step
    assert sampler.calls[0][2] == threading.current_thread().name  # the first in the caller
    assert all(c[2].startswith("t-ahead") for c in sampler.calls[1:])  # the rest in background


def test_sampling_ahead_overlaps_the_trainers_work():
    sampler = _Sampler(delay=0.3)
    ahead = SampleAhead(sampler, last_step=3)
    ahead.next(_weights(0), 1)
    time.sleep(0.4)  # the trainer's update: the next batch is sampled meanwhile
    _, record = ahead.next(_weights(1), 2)
    ahead.close()
    assert record["rollout_lag"] == 1 and record["rollout_ahead_s"] >= 0.3
    assert record["rollout_wait_s"] < 0.15  # it was ready (or nearly) when asked for


def test_resume_and_a_skipped_step_sample_on_policy():
    sampler = _Sampler()
    ahead = SampleAhead(sampler, last_step=10)
    _, r = ahead.next(_weights(6), 7)  # a resumed stage's first step
    assert r["rollout_lag"] == 0
    batch, r = ahead.next(_weights(8), 9)  # the step sampled ahead (8) is not this one
    assert r["rollout_lag"] == 0 and batch["sampled_from"] == 8.0
    ahead.close()


def test_a_background_error_is_raised_at_its_step():
    ahead = SampleAhead(_Sampler(fail_at=2), last_step=3)
    ahead.next(_weights(0), 1)  # step 2's sampling fails in the background
    with pytest.raises(RuntimeError, match="grader down at step 2"):
        ahead.next(_weights(1), 2)
    ahead.close()


def test_settle_waits_for_the_batch_in_flight_and_keeps_it():
    sampler = _Sampler(delay=0.2)
    ahead = SampleAhead(sampler, last_step=2)
    ahead.next(_weights(0), 1)
    ahead.settle()
    assert [c[0] for c in sampler.calls] == [1, 2]  # done before an evaluation starts
    batch, r = ahead.next(_weights(1), 2)
    assert r["rollout_lag"] == 1 and batch["sampled_from"] == 0.0
    ahead.close()


def test_rollout_lag_is_a_stage_option(grpo_stage_section):
    base = grpo_stage_section
    assert RLStageConfig.from_mapping(base, "stages.x").rollout_lag == 0  # on-policy default
    assert RLStageConfig.from_mapping(dict(base, rollout_lag=1), "stages.x").rollout_lag == 1
    with pytest.raises(ValueError, match="rollout_lag must be 0 or 1"):
        RLStageConfig.from_mapping(dict(base, rollout_lag=2), "stages.x")
