"""GRPO (Cascade 2 §4.1.2, Eq. 1): group-normalised advantages and the policy-gradient train step.

Host side (numpy or jax arrays, rows ordered prompt-major: group g is rows [g*G, (g+1)*G)):
    group_advantages   A_i = (r_i - mean_g) / (std_g + eps); leave-one-out variant (NeMo-RL):
                       b_i = mean of the other G-1 rewards, std over the other G-1 rewards.
    filter_groups      dynamic filtering (DAPO): keep only groups whose rewards are not all equal.
    overlong_loss_mask overlong filtering: truncated samples leave the loss (loss mask 0) but their
                       rewards stay in the group baseline (advantages are computed before).
Device side: `grpo_train_step(state, batch, *, graphdef, tx, cfg) -> (state, metrics)`.

Per response token (ratio r = exp(logp_train - logp_old), old = `sampler_logprobs` of the batch):
    loss_t = -A_t * r                      if the clip is inactive,
             -A_t * clip(r, 1-eps_low, 1+eps_high)   (a constant: no gradient) if it is active,
    i.e. -min(r A, clip(r) A), plus kl_coef * k3 with k3 = exp(ref - logp) - (ref - logp) - 1.
Token-level aggregation divides the batch's summed loss by its total number of response tokens
(`token_level=False`: mean per response, then mean over responses). With one update per rollout
batch (the paper's strict on-policy setting) r == 1 and the gradient is the REINFORCE gradient
-sum_t A_t grad logp_t / N_tokens. Log-probs come from `losses.py`, never from [B, T, V] logits.

Std convention: `ddof=1` (Bessel), as NeMo-RL's `calculate_baseline_and_std_per_prompt`, which
the Cascade MOPD replica runs; the paper writes std({r_i}) without saying which.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable, Mapping
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

from nemocascade.configs_lib import dataclass_from_mapping
from nemocascade.model.moe_balance import load_metrics
from nemocascade.train import losses, optim
from nemocascade.train.sft import schedule_count
from nemocascade.train.state import TrainState

Batch = Mapping[str, jax.Array]
REQUIRED_KEYS = (
    "input_ids",
    "targets",
    "loss_mask",
    "segment_ids",
    "advantages",
    "sampler_logprobs",
)


@dataclasses.dataclass(frozen=True)
class GRPOConfig:
    """Hyperparameters of the GRPO step and advantage estimation (the `grpo` config section)."""

    eps_low: float = 0.2  # ratio clip 1 - eps_low
    eps_high: float = 0.28  # ratio clip 1 + eps_high (clip-higher; 0.2 for symmetric PPO)
    kl_coef: float = 0.0  # k3 penalty to `ref_logprobs`; Cascade: 0 except RLHF (0.03)
    token_level: bool = True  # divide by total response tokens (paper) vs per-response mean
    normalize_std: bool = True  # divide advantages by the group std (paper: yes)
    leave_one_out: bool = False  # RLOO baseline (NeMo-RL default; Cascade: no)
    adv_eps: float = 1e-6
    std_ddof: int = 1
    dynamic_filtering: bool = False  # drop groups with all-equal rewards (IF-RL)
    overlong_filtering: bool = False  # truncated responses leave the loss, stay in the baseline
    compute_entropy: bool = True  # entropy metric (an extra term in the lm_head backward)
    logprob_chunk: int = losses.DEFAULT_CHUNK
    grad_accum_steps: int = 1

    def __post_init__(self):
        if not (0 <= self.eps_low < 1 and self.eps_high >= 0 and self.kl_coef >= 0):
            raise ValueError(f"grpo: need 0 <= eps_low < 1, eps_high >= 0, kl_coef >= 0: {self}")
        if self.logprob_chunk < 1 or self.grad_accum_steps < 1 or self.std_ddof not in (0, 1):
            raise ValueError(f"grpo: bad logprob_chunk/grad_accum_steps/std_ddof in {self}")

    @classmethod
    def from_mapping(cls, cfg: Mapping[str, Any]) -> GRPOConfig:
        """From a config section; unknown keys raise, naming the valid ones."""
        return dataclass_from_mapping(cls, cfg, "grpo")


# ============================================================================ host-side advantages
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
    adv = group_advantages(
        rewards,
        group_size,
        eps=cfg.adv_eps,
        leave_one_out=cfg.leave_one_out,
        normalize_std=cfg.normalize_std,
        ddof=cfg.std_ddof,
    )
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


# ============================================================================ per-token loss
def response_spans(mask_BT: jax.Array, segment_ids_BT: jax.Array) -> tuple[jax.Array, jax.Array]:
    """(span id [B, T] (0 off the mask, 1.. for each contiguous masked run within a segment),
    number of spans). A response is one such span, also in packed rows."""
    m = mask_BT > 0
    prev_m = jnp.pad(m, ((0, 0), (1, 0)))[:, :-1]
    prev_seg = jnp.pad(segment_ids_BT, ((0, 0), (1, 0)), constant_values=-1)[:, :-1]
    start = m & ~(prev_m & (prev_seg == segment_ids_BT))
    ids = jnp.cumsum(start.reshape(-1)).reshape(m.shape) * m
    return ids.astype(jnp.int32), jnp.sum(start)


def aggregate(
    per_token_BT: jax.Array, mask_BT: jax.Array, segment_ids_BT: jax.Array, token_level: bool
) -> tuple[jax.Array, jax.Array]:
    """(numerator, denominator): token level (sum over masked tokens, token count) or sequence
    level (sum over responses of their token mean, number of responses)."""
    mask = mask_BT.astype(jnp.float32)
    if token_level:
        return jnp.sum(per_token_BT * mask), jnp.sum(mask)
    span_BT, n_spans = response_spans(mask_BT, segment_ids_BT)
    num = mask.size + 1
    sums = jax.ops.segment_sum((per_token_BT * mask).reshape(-1), span_BT.reshape(-1), num)
    counts = jax.ops.segment_sum(mask.reshape(-1), span_BT.reshape(-1), num)
    return jnp.sum((sums / jnp.maximum(counts, 1.0))[1:]), n_spans.astype(jnp.float32)


def k3_kl(logp_BT: jax.Array, ref_logp_BT: jax.Array) -> jax.Array:
    """Schulman's k3 estimator of KL(pi || ref) per token: exp(d) - d - 1, d = ref - logp."""
    d = ref_logp_BT - logp_BT
    return jnp.exp(d) - d - 1.0


def policy_loss_terms(logp_BT: jax.Array, batch: Batch, cfg: GRPOConfig) -> tuple[jax.Array, dict]:
    """(per-token loss [B, T], per-token diagnostics) of the clipped policy gradient + k3 KL."""
    adv = batch["advantages"].astype(jnp.float32)
    adv_BT = adv[:, None] if adv.ndim == 1 else adv
    old_BT = batch["sampler_logprobs"].astype(jnp.float32)
    ratio_BT = jnp.exp(logp_BT - old_BT)
    hi = (adv_BT > 0) & (ratio_BT > 1.0 + cfg.eps_high)
    lo = (adv_BT < 0) & (ratio_BT < 1.0 - cfg.eps_low)
    clipped_BT = hi | lo
    bound_BT = jnp.where(hi, 1.0 + cfg.eps_high, 1.0 - cfg.eps_low)
    loss_BT = -adv_BT * jnp.where(clipped_BT, bound_BT, ratio_BT)
    kl_BT = jnp.zeros_like(logp_BT)
    if "ref_logprobs" in batch:
        kl_BT = k3_kl(logp_BT, batch["ref_logprobs"].astype(jnp.float32))
        if cfg.kl_coef:
            loss_BT = loss_BT + cfg.kl_coef * kl_BT
    elif cfg.kl_coef:
        raise KeyError("grpo: kl_coef > 0 needs batch['ref_logprobs'] [B, T]")
    return loss_BT, {"clipped": clipped_BT.astype(jnp.float32), "kl": kl_BT, "ratio": ratio_BT}


# ============================================================================ shared step machinery
def check_batch(batch: Batch, required: tuple[str, ...], where: str) -> None:
    """Raise KeyError/ValueError naming the missing key or the mismatching shape."""
    missing = [k for k in required if k not in batch]
    if missing:
        raise KeyError(f"{where}: batch is missing {missing}; it has {sorted(batch)}")
    shape = batch["input_ids"].shape
    for k in required:
        v = batch[k]
        ok = v.shape == shape[:1] if (k == "advantages" and v.ndim == 1) else v.shape == shape
        if not ok:
            raise ValueError(
                f"{where}: batch[{k!r}] has shape {v.shape}, expected {shape} "
                f"(or [B] for advantages)"
            )


def loss_denominator(batch: Batch, token_level: bool = True) -> jax.Array:
    """The global divisor of the summed per-token loss: response tokens of the whole batch, or
    (not token-level) the number of responses. Computed once, before microbatching."""
    if token_level:
        return jnp.maximum(jnp.sum(batch["loss_mask"].astype(jnp.float32)), 1.0)
    _, n = response_spans(batch["loss_mask"], batch["segment_ids"])
    return jnp.maximum(n.astype(jnp.float32), 1.0)


def common_stats(logp_BT, ent_BT, mask_BT, sampler_logp_BT, expert_counts_LE) -> dict:
    """Additive diagnostics shared by the RL steps (keys ending in `_max` combine by max)."""
    mask = mask_BT.astype(jnp.float32)
    gap_BT = jnp.abs(jax.lax.stop_gradient(logp_BT) - sampler_logp_BT) * mask
    return {
        "tokens": jnp.sum(mask),
        "entropy_sum": jnp.sum(jax.lax.stop_gradient(ent_BT) * mask),
        "logp_gap_sum": jnp.sum(gap_BT),
        "logp_gap_max": jnp.max(gap_BT),
        "expert_counts": expert_counts_LE.astype(jnp.float32),
    }


def _combine(a: dict, b: dict) -> dict:
    return {k: (jnp.maximum(a[k], b[k]) if k.endswith("_max") else a[k] + b[k]) for k in a}


def accumulate_with_stats(loss_fn: Callable, params, model_state, batch: Batch, num_micro: int):
    """`(sum of loss, combined stats, sum of grads)` of `loss_fn(params, model_state, mb) ->
    (loss, stats)` over `num_micro` equal microbatches (`lax.scan`; differentiated in params).

    As `optim.accumulate_gradients`, except that stats keys ending in `_max` are maxed, not
    summed (e.g. the largest train/sampler log-prob gap).
    """
    grad_fn = jax.value_and_grad(loss_fn, has_aux=True)
    if num_micro == 1:
        (loss, stats), grads = grad_fn(params, model_state, batch)
        return loss, stats, grads
    lead = batch["input_ids"].shape[0]
    if lead % num_micro:
        raise ValueError(f"batch size {lead} is not divisible by grad_accum_steps={num_micro}")
    micro = jax.tree.map(lambda x: x.reshape((num_micro, lead // num_micro) + x.shape[1:]), batch)
    (loss0, stats0), grads0 = grad_fn(params, model_state, jax.tree.map(lambda x: x[0], micro))

    def body(carry, mb):
        loss_acc, stats_acc, grads_acc = carry
        (loss, stats), grads = grad_fn(params, model_state, mb)
        return (
            loss_acc + loss,
            _combine(stats_acc, stats),
            jax.tree.map(jnp.add, grads_acc, grads),
        ), None

    (loss, stats, grads), _ = jax.lax.scan(
        body, (loss0, stats0, grads0), jax.tree.map(lambda x: x[1:], micro)
    )
    return loss, stats, grads


def step_metrics(state: TrainState, stats: dict, lr_fn: Callable | None) -> dict:
    """Means over response tokens of the common stats, MoE load and (with `lr_fn`) the lr."""
    tokens = jnp.maximum(stats["tokens"], 1.0)
    out = {
        "entropy": stats["entropy_sum"] / tokens,
        "tokens": stats["tokens"],
        "logp_gap_mean": stats["logp_gap_sum"] / tokens,
        "logp_gap_max": stats["logp_gap_max"],
    }
    if stats["expert_counts"].shape[0]:
        out["moe_max_violation"] = jnp.max(
            load_metrics(stats["expert_counts"])["moe/max_violation"]
        )
    if lr_fn is not None:
        out["lr"] = lr_fn(schedule_count(state.opt_state))
    return out


# ============================================================================ GRPO step
def grpo_loss(
    params: nnx.State,
    model_state: nnx.State,
    batch: Batch,
    *,
    graphdef: nnx.GraphDef,
    cfg: GRPOConfig,
    denom: jax.Array,
    aux_loss_coef: float = 0.0,
    num_micro: int = 1,
):
    """`(loss, stats)` of one (micro)batch: summed per-token loss / `denom` (the whole batch's
    divisor, `loss_denominator`) + aux_loss_coef * MoE aux loss / num_micro; differentiable."""
    model = nnx.merge(graphdef, params, model_state)
    logp_BT, ent_BT, aux = losses.model_token_logprobs(
        model, batch, chunk_size=cfg.logprob_chunk, with_entropy=cfg.compute_entropy
    )
    mask_BT = batch["loss_mask"].astype(jnp.float32)
    loss_BT, diag = policy_loss_terms(logp_BT, batch, cfg)
    num, _ = aggregate(loss_BT, mask_BT, batch["segment_ids"], cfg.token_level)
    loss = num / denom
    if aux_loss_coef:
        loss = loss + aux_loss_coef * aux["aux_loss"] / num_micro
    _, n_resp = response_spans(mask_BT, batch["segment_ids"])
    stats = common_stats(
        logp_BT, ent_BT, mask_BT, batch["sampler_logprobs"], aux["expert_counts"]
    ) | {
        "pg_sum": jax.lax.stop_gradient(num),
        "responses": n_resp.astype(jnp.float32),
        "clipped_sum": jnp.sum(diag["clipped"] * mask_BT),
        "kl_sum": jnp.sum(jax.lax.stop_gradient(diag["kl"]) * mask_BT),
    }
    return loss, stats


def grpo_train_step(
    state: TrainState,
    batch: Batch,
    *,
    graphdef: nnx.GraphDef,
    tx: optax.GradientTransformation,
    cfg: GRPOConfig,
    lr_fn: Callable | None = None,
    aux_loss_coef: float = 0.0,
    moe_bias_rate: float = 0.0,
) -> tuple[TrainState, dict[str, jax.Array]]:
    """One GRPO update on a rollout batch. Pure once the keywords are bound (jit it).

    batch: input_ids, targets, loss_mask (1 on response targets), segment_ids [B, T];
    advantages [B] (one response per row) or [B, T] (per token, e.g. rows packing several
    responses); sampler_logprobs [B, T] (aligned with targets); optional
    ref_logprobs [B, T] (k3 penalty, `cfg.kl_coef`). NaN/Inf loss or gradient skips the update.
    metrics: loss (the policy objective incl. KL, without the MoE aux loss), entropy (mean over
    response tokens), clip_fraction, kl (k3, mean), response_length (tokens per response),
    tokens, logp_gap_mean / logp_gap_max (|logp_train - logp_sampler| on sampled tokens),
    grad_norm (before clipping), skipped; moe_max_violation with MoE layers; lr with `lr_fn`.
    """
    check_batch(batch, REQUIRED_KEYS, "grpo_train_step")
    denom = loss_denominator(batch, cfg.token_level)
    loss_fn = functools.partial(
        grpo_loss,
        graphdef=graphdef,
        cfg=cfg,
        denom=denom,
        aux_loss_coef=aux_loss_coef,
        num_micro=cfg.grad_accum_steps,
    )
    _, stats, grads = accumulate_with_stats(
        loss_fn, state.params, state.model_state, batch, cfg.grad_accum_steps
    )
    loss = stats["pg_sum"] / denom
    new_state, grad_norm, skipped = optim.apply_update(
        state, loss, grads, stats["expert_counts"], tx=tx, moe_bias_rate=moe_bias_rate
    )
    tokens = jnp.maximum(stats["tokens"], 1.0)
    metrics = step_metrics(state, stats, lr_fn) | {
        "loss": loss,
        "clip_fraction": stats["clipped_sum"] / tokens,
        "kl": stats["kl_sum"] / tokens,
        "response_length": stats["tokens"] / jnp.maximum(stats["responses"], 1.0),
        "grad_norm": grad_norm,
        "skipped": skipped,
    }
    return new_state, metrics
