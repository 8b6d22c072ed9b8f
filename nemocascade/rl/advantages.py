"""GRPO advantages on the host (Cascade 2 §4.1.2): baselines per group, dynamic and overlong
filtering, and a registry of advantage estimators.

Rows are prompt-major: group g (one prompt's `G` samples) is rows [g*G, (g+1)*G). Functions take
numpy or jax arrays.

    group_advantages   A_i = (r_i - mean_g) / (std_g + eps); leave-one-out variant (NeMo-RL):
                       b_i = mean of the other G-1 rewards, std over the other G-1 rewards.
    filter_groups      dynamic filtering (DAPO): keep only groups whose rewards are not all equal.
    overlong_loss_mask overlong filtering: truncated samples leave the loss (loss mask 0) but their
                       rewards stay in the group baseline (advantages are computed before).
    ESTIMATORS         name -> fn(rewards, group_size, cfg) -> advantages: "group_mean_std" (the
                       paper's), "leave_one_out"; `register_estimator` adds one.

Std convention: `ddof=1` (Bessel), as NeMo-RL's `calculate_baseline_and_std_per_prompt`, which
the Cascade MOPD replica runs; the paper writes std({r_i}) without saying which.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from nemocascade.train.grpo import GRPOConfig


def _xp(x):
    return jnp if isinstance(x, jax.Array) else np


def _groups(rewards, group_size: int):
    xp = _xp(rewards)
    r = xp.asarray(rewards, dtype=xp.float32)
    if r.ndim != 1 or group_size < 1 or r.shape[0] % group_size:
        raise ValueError(
            f"grpo: rewards of shape {r.shape} do not split into groups of "
            f"{group_size} (rows must be prompt-major)"
        )
    return xp, r.reshape(-1, group_size)


def group_advantages(
    rewards,
    group_size: int,
    *,
    eps: float = 1e-6,
    leave_one_out: bool = False,
    normalize_std: bool = True,
    ddof: int = 1,
):
    """Per-sample advantages [N] from rewards [N] (N = groups x group_size, prompt-major).

    Plain: A_i = (r_i - mean(group)) / (std(group) + eps). Leave-one-out: the mean and std are
    taken over the other group_size - 1 samples. `ddof` 1 is the unbiased std (NeMo-RL); a std
    over fewer than ddof + 1 values is 0. `normalize_std=False` gives r_i - baseline.
    """
    xp, r_GS = _groups(rewards, group_size)
    n = group_size
    total_G1 = r_GS.sum(axis=1, keepdims=True)
    if leave_one_out:
        m = n - 1
        others_SS = 1.0 - xp.eye(n, dtype=xp.float32)  # [i, j] = 1 for j != i
        base_GS = (total_G1 - r_GS) / max(m, 1)
        dev_GSS = (r_GS[:, None, :] - base_GS[:, :, None]) ** 2  # [g, i, j] = (r_j - b_i)^2
        ss_GS = (dev_GSS * others_SS).sum(axis=2)
    else:
        m = n
        base_GS = xp.broadcast_to(total_G1 / n, r_GS.shape)
        ss_GS = xp.broadcast_to(((r_GS - total_G1 / n) ** 2).sum(axis=1, keepdims=True), r_GS.shape)
    std_GS = xp.sqrt(ss_GS / (m - ddof)) if m - ddof > 0 else xp.zeros_like(r_GS)
    adv_GS = r_GS - base_GS
    if normalize_std:
        adv_GS = adv_GS / (std_GS + eps)
    return adv_GS.reshape(-1)


class FilterResult(NamedTuple):
    keep_samples: Any  # [N] bool: rows of kept groups
    keep_groups: Any  # [G] bool
    filtered_fraction: float  # fraction of groups dropped


def filter_groups(rewards, group_size: int) -> FilterResult:
    """Dynamic filtering: keep the groups whose rewards are not all equal (std > 0)."""
    xp, r_GS = _groups(rewards, group_size)
    keep_G = xp.max(r_GS, axis=1) > xp.min(r_GS, axis=1)
    keep_N = xp.repeat(keep_G, group_size)
    return FilterResult(keep_N, keep_G, float(1.0 - xp.mean(keep_G.astype(xp.float32))))


def overlong_loss_mask(loss_mask_BT, truncated_B):
    """Loss mask with the rows of truncated samples zeroed (overlong filtering)."""
    xp = _xp(loss_mask_BT)
    keep_B = 1 - xp.asarray(truncated_B).astype(xp.asarray(loss_mask_BT).dtype)
    return loss_mask_BT * keep_B[:, None]


def prepare_advantages(rewards, group_size: int, cfg: GRPOConfig, truncated=None) -> dict:
    """The host-side part of a GRPO batch: `advantages` [N], `keep` [N] bool (rows to train on:
    dynamic filtering), `sample_weight` [N] (0 for truncated rows under overlong filtering; the
    baseline still includes them) and `filtered_fraction`. The caller keeps the rows
    `keep` selects and multiplies the batch's `loss_mask` by `sample_weight[:, None]`."""
    adv = get_estimator(cfg.advantage_estimator)(rewards, group_size, cfg)
    xp = _xp(adv)
    n = adv.shape[0]
    if cfg.dynamic_filtering:
        flt = filter_groups(rewards, group_size)
        keep, frac = flt.keep_samples, flt.filtered_fraction
    else:
        keep, frac = xp.ones((n,), bool), 0.0
    weight = xp.ones((n,), xp.float32)
    if cfg.overlong_filtering and truncated is not None:
        weight = overlong_loss_mask(weight[:, None], truncated)[:, 0]
    return {"advantages": adv, "keep": keep, "sample_weight": weight, "filtered_fraction": frac}


# ============================================================================ estimator registry
Estimator = Callable[[Any, int, GRPOConfig], Any]
ESTIMATORS: dict[str, Estimator] = {}


def register_estimator(name: str) -> Callable[[Estimator], Estimator]:
    """Decorator: make `fn(rewards [N], group_size, cfg) -> advantages [N]` selectable as
    `loss.advantage_estimator=name`."""

    def deco(fn: Estimator) -> Estimator:
        ESTIMATORS[name] = fn
        return fn

    return deco


def get_estimator(name: str) -> Estimator:
    if name not in ESTIMATORS:
        raise KeyError(
            f"advantage estimator {name!r} is not registered; known: {sorted(ESTIMATORS)}"
        )
    return ESTIMATORS[name]


@register_estimator("group_mean_std")
def _group_mean_std(rewards, group_size: int, cfg: GRPOConfig):
    """The paper's: (r_i - mean of the group) / (std of the group + eps)."""
    return group_advantages(
        rewards, group_size, eps=cfg.adv_eps, normalize_std=cfg.normalize_std, ddof=cfg.std_ddof
    )


@register_estimator("leave_one_out")
def _leave_one_out(rewards, group_size: int, cfg: GRPOConfig):
    """RLOO (NeMo-RL's default): baseline and std over the other G-1 samples of the group."""
    return group_advantages(
        rewards,
        group_size,
        eps=cfg.adv_eps,
        leave_one_out=True,
        normalize_std=cfg.normalize_std,
        ddof=cfg.std_ddof,
    )
