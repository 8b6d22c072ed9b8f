"""GRPO (Cascade 2 §4.1.2, Eq. 1): the policy-gradient train step.

`grpo_train_step(state, batch, *, graphdef, tx, cfg) -> (state, metrics)`; the advantages in the
batch come from the host side (`nemocascade.rl.advantages`: group mean/std or leave-one-out
baselines, dynamic and overlong filtering), whose settings share the `loss` section
(`GRPOConfig`).

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
import warnings
from collections.abc import Callable, Mapping
from typing import Any

import jax
import jax.numpy as jnp
import optax
from flax import nnx

from nemocascade.train import losses, optim
from nemocascade.train.state import TrainState
from nemocascade.train.steps import (
    accumulate,
    check_batch,
    common_stats,
    loss_denominator,
    replay_stats,
    response_spans,
    step_metrics,
)
from nemocascade.typed_config import from_mapping

Batch = Mapping[str, jax.Array]
REQUIRED_KEYS = (
    "input_ids",
    "targets",
    "loss_mask",
    "segment_ids",
    "advantages",
    "sampler_logprobs",
)


CORRECTIONS = ("none", "tis", "icepop")


@dataclasses.dataclass(frozen=True)
class GRPOConfig:
    """Hyperparameters of the GRPO step and of the host-side advantages (`rl.advantages`): the
    `loss` section of a GRPO stage."""

    eps_low: float = 0.2  # ratio clip 1 - eps_low
    eps_high: float = 0.28  # ratio clip 1 + eps_high (clip-higher; 0.2 for symmetric PPO)
    kl_coef: float = 0.0  # k3 penalty to `ref_logprobs`; Cascade: 0 except RLHF (0.03)
    token_level: bool = True  # divide by total response tokens (paper) vs per-response mean
    normalize_std: bool = True  # divide advantages by the group std (paper: yes)
    # a name of `rl.advantages.ESTIMATORS`: group_mean_std (paper) or leave_one_out (RLOO)
    advantage_estimator: str = "group_mean_std"
    leave_one_out: bool = False  # deprecated: advantage_estimator="leave_one_out"
    adv_eps: float = 1e-6
    std_ddof: int = 1
    dynamic_filtering: bool = False  # drop groups with all-equal rewards (IF-RL)
    overlong_filtering: bool = False  # truncated responses leave the loss, stay in the baseline
    compute_entropy: bool = True  # entropy metric (an extra term in the lm_head backward)
    logprob_chunk: int = losses.DEFAULT_CHUNK
    grad_accum_steps: int = 1
    # Off-policy correction against the sampler's log-probs (for asynchronous / stale rollouts):
    # "none" (strictly on-policy, the paper), "tis" (token-level truncated importance sampling,
    # weight min(pi_train / pi_sampler, tis_cap)) or "icepop" (tokens whose ratio leaves
    # [icepop_low, icepop_high] are masked out of the loss).
    importance_correction: str = "none"
    tis_cap: float = 2.0
    icepop_low: float = 0.5
    icepop_high: float = 2.0

    def __post_init__(self):
        if not (0 <= self.eps_low < 1 and self.eps_high >= 0 and self.kl_coef >= 0):
            raise ValueError(f"grpo: need 0 <= eps_low < 1, eps_high >= 0, kl_coef >= 0: {self}")
        if self.importance_correction not in CORRECTIONS:
            raise ValueError(
                f"grpo: importance_correction {self.importance_correction!r} not in {CORRECTIONS}"
            )
        if not (self.tis_cap >= 1 and 0 <= self.icepop_low <= 1 <= self.icepop_high):
            raise ValueError(f"grpo: need tis_cap >= 1 and icepop_low <= 1 <= icepop_high: {self}")
        if self.logprob_chunk < 1 or self.grad_accum_steps < 1 or self.std_ddof not in (0, 1):
            raise ValueError(f"grpo: bad logprob_chunk/grad_accum_steps/std_ddof in {self}")
        if self.leave_one_out:
            warnings.warn(
                "loss.leave_one_out is deprecated; use loss.advantage_estimator='leave_one_out'",
                DeprecationWarning,
                stacklevel=3,
            )
            object.__setattr__(self, "advantage_estimator", "leave_one_out")
            object.__setattr__(self, "leave_one_out", False)

    @classmethod
    def from_mapping(cls, cfg: Mapping[str, Any]) -> GRPOConfig:
        """From a config section; unknown keys raise, naming the valid ones."""
        return from_mapping(cls, cfg, "grpo")


# ============================================================================ per-token loss
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


def correction_weights(old_BT: jax.Array, sampler_BT: jax.Array, cfg: GRPOConfig) -> jax.Array:
    """Per-token off-policy weights (no gradient) from r = pi_old / pi_sampler: 1 ("none"),
    min(r, tis_cap) ("tis"), or 1[icepop_low <= r <= icepop_high] ("icepop")."""
    if cfg.importance_correction == "none":
        return jnp.ones_like(old_BT)
    r_BT = jnp.exp(jax.lax.stop_gradient(old_BT) - sampler_BT.astype(jnp.float32))
    if cfg.importance_correction == "tis":
        return jnp.minimum(r_BT, cfg.tis_cap)
    return ((r_BT >= cfg.icepop_low) & (r_BT <= cfg.icepop_high)).astype(jnp.float32)


def policy_loss_terms(logp_BT: jax.Array, batch: Batch, cfg: GRPOConfig) -> tuple[jax.Array, dict]:
    """(per-token loss [B, T], per-token diagnostics) of the clipped policy gradient + k3 KL.

    The ratio is pi_train / pi_old with pi_old the log-probs of the policy the update starts
    from: `batch["old_logprobs"]` when given (several updates per batch), else the trainer's own
    forward with the gradient stopped, so the ratio is exactly 1 and the gradient is REINFORCE's
    (the paper's strictly on-policy GRPO). The sampler's log-probs never enter the ratio; they
    only weight tokens under `cfg.importance_correction`.
    """
    adv = batch["advantages"].astype(jnp.float32)
    adv_BT = adv[:, None] if adv.ndim == 1 else adv
    if "old_logprobs" in batch:
        old_BT = batch["old_logprobs"].astype(jnp.float32)
    else:
        old_BT = jax.lax.stop_gradient(logp_BT)
    ratio_BT = jnp.exp(logp_BT - old_BT)
    hi = (adv_BT > 0) & (ratio_BT > 1.0 + cfg.eps_high)
    lo = (adv_BT < 0) & (ratio_BT < 1.0 - cfg.eps_low)
    clipped_BT = hi | lo
    bound_BT = jnp.where(hi, 1.0 + cfg.eps_high, 1.0 - cfg.eps_low)
    weight_BT = correction_weights(old_BT, batch["sampler_logprobs"], cfg)
    loss_BT = -adv_BT * weight_BT * jnp.where(clipped_BT, bound_BT, ratio_BT)
    kl_BT = jnp.zeros_like(logp_BT)
    if "ref_logprobs" in batch:
        kl_BT = k3_kl(logp_BT, batch["ref_logprobs"].astype(jnp.float32))
        if cfg.kl_coef:
            loss_BT = loss_BT + cfg.kl_coef * kl_BT
    elif cfg.kl_coef:
        raise KeyError("grpo: kl_coef > 0 needs batch['ref_logprobs'] [B, T] or a ref_state")
    diag = {"clipped": clipped_BT.astype(jnp.float32), "kl": kl_BT, "ratio": ratio_BT}
    return loss_BT, diag | {"weight": weight_BT}


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
    temperature: float = 1.0,
    ref_state: tuple | None = None,
):
    """`(loss, stats)` of one (micro)batch: summed per-token loss / `denom` (the whole batch's
    divisor, `loss_denominator`) + aux_loss_coef * MoE aux loss / num_micro; differentiable.

    Log-probs are those of the sampled distribution's temperature (logits / `temperature`).
    With `ref_state` (the reference policy's `(params, model_state)`), its log-probs are computed
    here (no gradient, chunked over the vocabulary) for the k3 KL penalty. With
    `batch["routes"]` the policy's forward replays the sampler's experts (R3); the reference
    routes by its own router (it is not the policy that sampled)."""
    model = nnx.merge(graphdef, params, model_state)
    logp_BT, ent_BT, aux = losses.model_token_logprobs(
        model,
        batch,
        chunk_size=cfg.logprob_chunk,
        with_entropy=cfg.compute_entropy,
        temperature=temperature,
        routes_BTLK=batch.get("routes"),
    )
    if ref_state is not None:
        ref_logp_BT = losses.model_token_logprobs(
            nnx.merge(graphdef, *ref_state),
            batch,
            chunk_size=cfg.logprob_chunk,
            temperature=temperature,
        )[0]
        batch = dict(batch, ref_logprobs=jax.lax.stop_gradient(ref_logp_BT))
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
        "is_weight_sum": jnp.sum(diag["weight"] * mask_BT),
    }
    return loss, stats | replay_stats(batch, aux)


def grpo_train_step(
    state: TrainState,
    batch: Batch,
    ref_state: tuple | None = None,
    *,
    graphdef: nnx.GraphDef,
    tx: optax.GradientTransformation,
    cfg: GRPOConfig,
    lr_fn: Callable | None = None,
    aux_loss_coef: float = 0.0,
    moe_bias_rate: float = 0.0,
    temperature: float = 1.0,
) -> tuple[TrainState, dict[str, jax.Array]]:
    """One GRPO update on a rollout batch. Pure once the keywords are bound (jit it).

    batch: input_ids, targets, loss_mask (1 on response targets), segment_ids [B, T];
    advantages [B] (one response per row) or [B, T] (per token, e.g. rows packing several
    responses); sampler_logprobs [B, T] (the log-prob of each sampled token under the
    distribution it was drawn from: mismatch metrics and `cfg.importance_correction`); optional
    old_logprobs [B, T] (see `policy_loss_terms`; default: ratio exactly 1) and ref_logprobs
    [B, T] (k3 penalty) — or `ref_state`, the reference policy's `(params, model_state)`, whose
    log-probs are then computed in this step. `temperature`: the stage's sampling temperature
    (training log-probs are those of logits / temperature). NaN/Inf loss or gradient skips the
    update.
    metrics: loss (the policy objective incl. KL, without the MoE aux loss), entropy (mean over
    response tokens), clip_fraction, kl (k3, mean), response_length (tokens per response),
    tokens, the sampler / trainer mismatch (logp_gap_mean / logp_gap_max: |logp_train -
    logp_sampler| on sampled tokens; logp_off_band_frac: tokens with the ratio outside [0.5, 2];
    with batch["routes"], replayed by the policy's forward, route_change_frac: the fraction of
    (position, MoE layer) pairs where the policy's router would now choose other experts),
    is_weight_mean (mean off-policy correction weight), grad_norm (before clipping), skipped;
    moe_max_violation with MoE layers; lr with `lr_fn`.
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
        temperature=temperature,
        ref_state=ref_state,
    )
    _, stats, grads = accumulate(
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
        "is_weight_mean": stats["is_weight_sum"] / tokens,
        "response_length": stats["tokens"] / jnp.maximum(stats["responses"], 1.0),
        "grad_norm": grad_norm,
        "skipped": skipped,
    }
    return new_state, metrics
