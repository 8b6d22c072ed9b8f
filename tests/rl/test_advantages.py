"""GRPO advantages on the host: plain and leave-one-out baselines against hand-computed values,
dynamic and overlong filtering, and the estimator registry."""

import jax.numpy as jnp
import numpy as np
import pytest

from nemocascade.rl import advantages
from nemocascade.train import grpo

TOL = 1e-5  # fp32, fixed up front
S3 = np.sqrt(1.0 / 3.0)  # unbiased std of [1, 0, 0, 1] and of [0, 0, 1]


@pytest.mark.parametrize("to_array", [np.asarray, jnp.asarray])
def test_group_advantages_hand(to_array):
    r = to_array(np.array([1, 0, 0, 1, 2, 2, 2, 2], np.float32))
    got = np.asarray(advantages.group_advantages(r, 4))  # eps 1e-6: all-equal groups give 0
    np.testing.assert_allclose(
        got, [0.5 / S3, -0.5 / S3, -0.5 / S3, 0.5 / S3, 0, 0, 0, 0], atol=TOL
    )
    # population std (ddof 0): std 0.5
    got0 = np.asarray(advantages.group_advantages(r, 4, ddof=0))
    np.testing.assert_allclose(got0[:4], [1, -1, -1, 1], atol=TOL)
    # leave-one-out: for r_0 = 1 the others are [0, 0, 1]: b = 1/3, std = sqrt(1/3)
    loo = np.asarray(advantages.group_advantages(r, 4, leave_one_out=True))
    a = (1 - 1 / 3) / S3
    np.testing.assert_allclose(loo, [a, -a, -a, a, 0, 0, 0, 0], atol=TOL)
    # eps enters the denominator; no std normalisation gives r - baseline
    np.testing.assert_allclose(
        np.asarray(advantages.group_advantages(r, 4, eps=0.5))[0], 0.5 / (S3 + 0.5), atol=TOL
    )
    np.testing.assert_allclose(
        np.asarray(advantages.group_advantages(r, 4, normalize_std=False))[:4],
        [0.5, -0.5, -0.5, 0.5],
        atol=TOL,
    )
    with pytest.raises(ValueError, match="groups of 3"):
        advantages.group_advantages(r, 3)


def test_filtering():
    r = np.array([1, 1, 0, 1, 0, 0, 0.5, 0.5], np.float32)
    flt = advantages.filter_groups(r, 2)
    np.testing.assert_array_equal(flt.keep_groups, [False, True, False, False])
    np.testing.assert_array_equal(flt.keep_samples, [0, 0, 1, 1, 0, 0, 0, 0])
    assert flt.filtered_fraction == pytest.approx(0.75)
    # overlong filtering: the truncated row leaves the loss but stays in the baseline
    r = np.array([1, 0, 0, 0], np.float32)
    truncated = np.array([False, False, True, False])
    cfg = grpo.GRPOConfig(overlong_filtering=True, dynamic_filtering=True)
    out = advantages.prepare_advantages(r, 4, cfg, truncated=truncated)
    np.testing.assert_allclose(out["advantages"], advantages.group_advantages(r, 4), atol=TOL)
    np.testing.assert_array_equal(out["sample_weight"], [1, 1, 0, 1])
    assert out["keep"].all() and out["filtered_fraction"] == 0.0
    mask = advantages.overlong_loss_mask(np.ones((4, 3), np.float32), truncated)
    np.testing.assert_array_equal(mask.sum(1), [3, 3, 0, 3])


def test_config_from_mapping():
    cfg = grpo.GRPOConfig.from_mapping({"eps_high": 0.2, "kl_coef": 0.03})
    assert (cfg.eps_low, cfg.eps_high, cfg.kl_coef, cfg.token_level) == (0.2, 0.2, 0.03, True)
    with pytest.raises(KeyError, match="unknown keys \\['eps'\\]"):
        grpo.GRPOConfig.from_mapping({"eps": 0.2})
    with pytest.raises(ValueError, match="eps_low"):
        grpo.GRPOConfig(eps_low=1.5)


def test_estimator_registry():
    r = np.array([1, 0, 0, 1, 1, 1, 0, 1], np.float32)
    out = advantages.prepare_advantages(r, 4, grpo.GRPOConfig(advantage_estimator="leave_one_out"))
    want = advantages.group_advantages(r, 4, leave_one_out=True)
    np.testing.assert_allclose(out["advantages"], want, atol=TOL)
    with pytest.warns(DeprecationWarning, match="advantage_estimator"):
        old = grpo.GRPOConfig(leave_one_out=True)
    assert old.advantage_estimator == "leave_one_out"
    with pytest.raises(KeyError, match="'nope' is not registered"):
        advantages.prepare_advantages(r, 4, grpo.GRPOConfig(advantage_estimator="nope"))

    @advantages.register_estimator("test_centered")
    def centered(rewards, group_size, cfg):  # r - group mean, no std
        return advantages.group_advantages(rewards, group_size, normalize_std=False)

    try:
        out = advantages.prepare_advantages(
            r, 4, grpo.GRPOConfig(advantage_estimator="test_centered")
        )
        np.testing.assert_allclose(out["advantages"][:4], [0.5, -0.5, -0.5, 0.5], atol=TOL)
    finally:
        del advantages.ESTIMATORS["test_centered"]
