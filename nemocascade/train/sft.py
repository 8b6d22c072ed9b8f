"""Supervised fine-tuning: token-level cross-entropy over the loss mask, and the pure train step.

A batch is a dict of `[B, T]` arrays (the layout `nemocascade.data` produces):
    input_ids   int32   tokens fed to the model
    targets     int32   the next token for each position
    loss_mask   bool/0-1 which targets count (assistant tokens, not padding)
    segment_ids int32   document index within a packed row (0 = padding)
    positions   int32   position within the document

The loss is sum over masked targets of -log p(target) divided by the number of masked targets in
the *global* batch (token-level, as in the paper), computed from fp32 logits. Packed documents
give the same loss and gradients as the documents run one by one, provided the model resets its
attention and Mamba state at segment boundaries.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Mapping

import jax
import jax.numpy as jnp
import optax
from flax import nnx

from nemocascade.train.losses import model_hidden_and_head, token_cross_entropy_sum
from nemocascade.train.optim import apply_update
from nemocascade.train.state import TrainState
from nemocascade.train.steps import accumulate, update_metrics

Batch = Mapping[str, jax.Array]


def token_nll_sum(
    logits_BTV: jax.Array, targets_BT: jax.Array, loss_mask_BT: jax.Array
) -> tuple[jax.Array, jax.Array]:
    """(sum of -log softmax(logits)[target] over masked tokens, number of masked tokens), fp32."""
    logits_BTV = logits_BTV.astype(jnp.float32)
    lse_BT = jax.nn.logsumexp(logits_BTV, axis=-1)
    target_logit_BT = jnp.take_along_axis(logits_BTV, targets_BT[..., None], axis=-1)[..., 0]
    mask_BT = loss_mask_BT.astype(jnp.float32)
    return jnp.sum((lse_BT - target_logit_BT) * mask_BT), jnp.sum(mask_BT)


def sft_loss(
    params: nnx.State,
    model_state: nnx.State,
    batch: Batch,
    *,
    graphdef: nnx.GraphDef,
    denom: jax.Array,
    aux_loss_coef: float = 0.0,
    num_micro: int = 1,
    loss_chunk_size: int = 0,
):
    """`(loss, (nll_sum, num_tokens, expert_counts_LE))` of one (micro)batch; differentiable.

    loss = nll_sum / denom + aux_loss_coef * aux_loss / num_micro, where denom is the number of
    loss tokens of the whole batch, so summing over microbatches gives the full-batch loss.
    expert_counts_LE: routed assignments per MoE layer and expert ([0, E] without MoE layers).
    loss_chunk_size > 0 computes the cross-entropy `loss_chunk_size` tokens at a time
    (`losses.token_cross_entropy_sum`) instead of materialising `[B, T, V]` logits.
    """
    model = nnx.merge(graphdef, params, model_state)
    if loss_chunk_size:
        h_BTD, w_DV, aux = model_hidden_and_head(model, batch)
        nll_sum, count = token_cross_entropy_sum(
            h_BTD, w_DV, batch["targets"], batch["loss_mask"], chunk_size=loss_chunk_size
        )
    else:
        logits_BTV, aux = model(
            batch["input_ids"],
            segment_ids=batch.get("segment_ids"),
            positions=batch.get("positions"),
            return_aux=True,
        )
        nll_sum, count = token_nll_sum(logits_BTV, batch["targets"], batch["loss_mask"])
    loss = nll_sum / denom
    if aux_loss_coef:
        loss = loss + aux_loss_coef * aux["aux_loss"] / num_micro
    return loss, (nll_sum, count, aux["expert_counts"])


def sft_step(
    state: TrainState,
    batch: Batch,
    *,
    graphdef: nnx.GraphDef,
    tx: optax.GradientTransformation,
    lr_fn: Callable[[jax.Array], jax.Array],
    grad_accum_steps: int = 1,
    aux_loss_coef: float = 0.0,
    moe_bias_rate: float = 0.0,
    loss_chunk_size: int = 0,
) -> tuple[TrainState, dict[str, jax.Array]]:
    """One SFT update. Pure: `(state, batch) -> (state, metrics)` once the keywords are bound.

    After the optimizer update, each MoE layer's correction bias follows the aux-loss-free rule
    (`moe_balance.update_model_biases`) from this batch's expert counts. If the loss or the
    gradient norm is not finite the whole update is skipped (params, optimizer and model state
    unchanged) and `metrics["skipped"]` is 1; `step` still advances (the batch was consumed).
    `lr_fn` is the schedule, evaluated at the optimizer's update count.

    metrics: loss (token-mean NLL), tokens (loss tokens in the global batch), grad_norm (before
    clipping), lr (of this update), skipped, and with MoE layers moe_max_violation (max over
    layers of max/mean expert load - 1).
    """
    denom = jnp.maximum(jnp.sum(batch["loss_mask"].astype(jnp.float32)), 1.0)
    loss_fn = functools.partial(
        sft_loss,
        graphdef=graphdef,
        denom=denom,
        aux_loss_coef=aux_loss_coef,
        num_micro=grad_accum_steps,
        loss_chunk_size=loss_chunk_size,
    )
    _, (nll_sum, count, counts_LE), grads = accumulate(
        loss_fn, state.params, state.model_state, batch, grad_accum_steps
    )
    loss = nll_sum / denom
    new_state, grad_norm, skipped = apply_update(
        state, loss, grads, counts_LE, tx=tx, moe_bias_rate=moe_bias_rate
    )
    metrics = {"loss": loss, "tokens": count}
    return new_state, metrics | update_metrics(state, counts_LE, grad_norm, skipped, lr_fn)


def sft_eval_step(
    state: TrainState, batch: Batch, *, graphdef: nnx.GraphDef, loss_chunk_size: int = 0
) -> dict[str, jax.Array]:
    """`{"nll_sum", "tokens"}` of a batch under the state's params (no update)."""
    _, (nll_sum, count, _) = sft_loss(
        state.params,
        state.model_state,
        batch,
        graphdef=graphdef,
        denom=jnp.ones((), jnp.float32),
        loss_chunk_size=loss_chunk_size,
    )
    return {"nll_sum": nll_sum, "tokens": count}
