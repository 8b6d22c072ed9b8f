"""Step machinery shared by the SFT, GRPO, distillation and reward-model steps.

check_batch        names a missing batch key or a mismatching shape (at trace time)
response_spans     one id per response (contiguous masked run within a segment)
loss_denominator   the global divisor of a summed per-token loss (computed before
                   microbatching, so microbatches sum to the full-batch loss)
accumulate         value, stats and gradients summed over equal microbatches (`lax.scan`);
                   stats keys ending in `_max` combine by max (e.g. the largest log-prob gap)
common_stats       the RL steps' additive diagnostics (tokens, entropy, sampler gap, expert
                   counts); `step_metrics` turns them into means, MoE load and the lr
schedule_count     the optimizer's update count (the lr schedule's argument)
update_metrics     grad_norm, lr, skipped and MoE load of an update (SFT, reward model)
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax

from nemocascade.model.moe_balance import load_metrics
from nemocascade.train.state import TrainState

Batch = Mapping[str, jax.Array]
OFF_BAND_LOG = float(np.log(2.0))  # |log pi_train - log pi_sampler| beyond this: ratio off [0.5, 2]


def schedule_count(opt_state: optax.OptState) -> jax.Array:
    """The update count of the (single) learning-rate schedule inside an optax state."""
    found = [
        leaf.count
        for leaf in jax.tree.leaves(
            opt_state, is_leaf=lambda x: isinstance(x, optax.ScaleByScheduleState)
        )
        if isinstance(leaf, optax.ScaleByScheduleState)
    ]
    if len(found) != 1:
        raise ValueError(
            f"expected one ScaleByScheduleState in the optimizer state, found {len(found)}"
        )
    return found[0]


def response_spans(mask_BT: jax.Array, segment_ids_BT: jax.Array) -> tuple[jax.Array, jax.Array]:
    """(span id [B, T] (0 off the mask, 1.. for each contiguous masked run within a segment),
    number of spans). A response is one such span, also in packed rows."""
    m = mask_BT > 0
    prev_m = jnp.pad(m, ((0, 0), (1, 0)))[:, :-1]
    prev_seg = jnp.pad(segment_ids_BT, ((0, 0), (1, 0)), constant_values=-1)[:, :-1]
    start = m & ~(prev_m & (prev_seg == segment_ids_BT))
    ids = jnp.cumsum(start.reshape(-1)).reshape(m.shape) * m
    return ids.astype(jnp.int32), jnp.sum(start)


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
        # ratio pi_train / pi_sampler outside [0.5, 2]
        "off_band_sum": jnp.sum((gap_BT > OFF_BAND_LOG) * mask),
        "expert_counts": expert_counts_LE.astype(jnp.float32),
    }


def replay_stats(batch: Batch, aux: dict) -> dict:
    """With routing replay (`batch["routes"]`): the (position, MoE layer) pairs whose replayed
    experts differ from the router's own choice, and all such pairs; else nothing."""
    if "routes" not in batch:
        return {}
    positions = jnp.sum(batch["segment_ids"] > 0, dtype=jnp.float32)
    return {
        "route_changes_sum": aux["route_changes"],
        "routed_sum": positions * aux["expert_counts"].shape[0],
    }


def combine_stats(a: Any, b: Any) -> Any:
    """Leafwise sum of two stats pytrees, except dict keys ending in `_max` (combined by max)."""
    if isinstance(a, Mapping):
        return {
            k: (jnp.maximum(a[k], b[k]) if k.endswith("_max") else combine_stats(a[k], b[k]))
            for k in a
        }
    return jax.tree.map(jnp.add, a, b)


def accumulate(loss_fn: Callable, params, model_state, batch: Batch, num_micro: int):
    """`(sum of loss, combined stats, sum of grads)` of `loss_fn(params, model_state, mb) ->
    (loss, stats)` over `num_micro` equal microbatches, differentiated in `params` only.

    The batch's leading axis is split into equal microbatches processed sequentially
    (`lax.scan`), which bounds activation memory; `stats` must be additive (sums, counts) or
    maxima under keys ending in `_max` (`combine_stats`). With num_micro == 1 this is one
    `value_and_grad`. Each microbatch's token losses are divided by the whole batch's token count
    (`loss_denominator`), so the summed update equals the full-batch one (which
    `optax.MultiSteps`' mean of per-microbatch means is not).
    """
    grad_fn = jax.value_and_grad(loss_fn, has_aux=True)
    if num_micro == 1:
        (loss, stats), grads = grad_fn(params, model_state, batch)
        return loss, stats, grads
    lead = next(iter(batch.values())).shape[0]
    if lead % num_micro:
        raise ValueError(f"batch size {lead} is not divisible by grad_accum_steps={num_micro}")
    micro = jax.tree.map(lambda x: x.reshape((num_micro, lead // num_micro) + x.shape[1:]), batch)
    (loss0, stats0), grads0 = grad_fn(params, model_state, jax.tree.map(lambda x: x[0], micro))

    def body(carry, mb):
        loss_acc, stats_acc, grads_acc = carry
        (loss, stats), grads = grad_fn(params, model_state, mb)
        return (
            loss_acc + loss,
            combine_stats(stats_acc, stats),
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
        "logp_off_band_frac": stats["off_band_sum"] / tokens,
    }
    if stats["expert_counts"].shape[0]:
        out["moe_max_violation"] = jnp.max(
            load_metrics(stats["expert_counts"])["moe/max_violation"]
        )
    if "routed_sum" in stats:  # routing replay (`replay_stats`)
        out["route_change_frac"] = stats["route_changes_sum"] / jnp.maximum(
            stats["routed_sum"], 1.0
        )
    if lr_fn is not None:
        out["lr"] = lr_fn(schedule_count(state.opt_state))
    return out


def update_metrics(
    state: TrainState, counts_LE: jax.Array, grad_norm, skipped, lr_fn: Callable
) -> dict:
    """What every update reports beside its loss: grad_norm (before clipping), the lr of this
    update (`state` is the state before it), skipped, and with MoE layers moe_max_violation (max
    over layers of max/mean expert load - 1)."""
    out = {"grad_norm": grad_norm, "lr": lr_fn(schedule_count(state.opt_state)), "skipped": skipped}
    if counts_LE.shape[0]:
        out["moe_max_violation"] = jnp.max(load_metrics(counts_LE)["moe/max_violation"])
    return out
