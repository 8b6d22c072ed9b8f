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
from typing import Any, Callable, Mapping

import jax
import jax.numpy as jnp
import optax
from flax import nnx

from nemocascade.train.optim import accumulate_gradients
from nemocascade.train.state import TrainState

Batch = Mapping[str, jax.Array]


def token_nll_sum(logits_BTV: jax.Array, targets_BT: jax.Array,
                  loss_mask_BT: jax.Array) -> tuple[jax.Array, jax.Array]:
    """(sum of -log softmax(logits)[target] over masked tokens, number of masked tokens), fp32."""
    logits_BTV = logits_BTV.astype(jnp.float32)
    lse_BT = jax.nn.logsumexp(logits_BTV, axis=-1)
    target_logit_BT = jnp.take_along_axis(logits_BTV, targets_BT[..., None], axis=-1)[..., 0]
    mask_BT = loss_mask_BT.astype(jnp.float32)
    return jnp.sum((lse_BT - target_logit_BT) * mask_BT), jnp.sum(mask_BT)


def model_logits(model: nnx.Module, batch: Batch) -> jax.Array:
    """The model's logits `[B, T, V]` for a batch (segment ids and positions if present)."""
    return model(batch["input_ids"], segment_ids=batch.get("segment_ids"),
                 positions=batch.get("positions"))


def sft_loss_sum(params: nnx.State, model_state: nnx.State, batch: Batch, *,
                 graphdef: nnx.GraphDef):
    """`(nll_sum, (num_tokens, new_model_state))` for one (micro)batch; differentiable in params.

    `new_model_state` is the model's non-Param variables after the forward pass (a model may
    record, e.g., MoE expert loads there).
    """
    # fresh Variable objects at this trace level, so the forward pass may write to them
    model_state = jax.tree.map(lambda x: x, model_state)
    model = nnx.merge(graphdef, params, model_state)
    nll_sum, count = token_nll_sum(model_logits(model, batch), batch["targets"], batch["loss_mask"])
    _, _, new_model_state = nnx.split(model, nnx.Param, ...)
    return nll_sum, (count, new_model_state)


def schedule_count(opt_state: optax.OptState) -> jax.Array:
    """The update count of the (single) learning-rate schedule inside an optax state."""
    found = [leaf.count for leaf in jax.tree.leaves(
        opt_state, is_leaf=lambda x: isinstance(x, optax.ScaleByScheduleState))
        if isinstance(leaf, optax.ScaleByScheduleState)]
    if len(found) != 1:
        raise ValueError(f"expected one ScaleByScheduleState in the optimizer state, found {len(found)}")
    return found[0]


def _select(pred: jax.Array, on_true: Any, on_false: Any) -> Any:
    return jax.tree.map(lambda a, b: jnp.where(pred, a, b), on_true, on_false)


def sft_step(state: TrainState, batch: Batch, *, graphdef: nnx.GraphDef,
             tx: optax.GradientTransformation, lr_fn: Callable[[jax.Array], jax.Array],
             grad_accum_steps: int = 1,
             update_model_state: Callable[[nnx.State, nnx.State], nnx.State] | None = None,
             ) -> tuple[TrainState, dict[str, jax.Array]]:
    """One SFT update. Pure: `(state, batch) -> (state, metrics)` once the keywords are bound.

    If the loss or the gradient norm is not finite the update is skipped (params, optimizer and
    model state unchanged) and `metrics["skipped"]` is 1; `step` still advances (the batch was
    consumed). `update_model_state(old, after_forward)` turns the model state seen after the
    forward pass into the next one (e.g. the MoE correction-bias rule); by default the
    post-forward state is kept. `lr_fn` is the schedule, evaluated at the optimizer's update count.

    metrics: loss (token mean), tokens (loss tokens in the global batch), grad_norm (before
    clipping), lr (of this update), skipped.
    """
    loss_fn = functools.partial(sft_loss_sum, graphdef=graphdef)
    nll_sum, count, grads_sum, forward_model_state = accumulate_gradients(
        loss_fn, state.params, state.model_state, batch, grad_accum_steps)
    denom = jnp.maximum(count, 1.0)
    loss = nll_sum / denom
    grads = jax.tree.map(lambda g: g / denom, grads_sum)
    grad_norm = optax.tree.norm(grads)
    finite = jnp.isfinite(loss) & jnp.isfinite(grad_norm)

    updates, new_opt_state = tx.update(grads, state.opt_state, state.params)
    new_params = optax.apply_updates(state.params, updates)
    if update_model_state is not None:
        new_model_state = update_model_state(state.model_state, forward_model_state)
    else:
        new_model_state = forward_model_state
    update_count = schedule_count(state.opt_state)
    rng, _ = jax.random.split(state.rng)
    new_state = TrainState(
        step=state.step + 1,
        params=_select(finite, new_params, state.params),
        model_state=_select(finite, new_model_state, state.model_state),
        opt_state=_select(finite, new_opt_state, state.opt_state),
        rng=rng,
    )
    metrics = {"loss": loss, "tokens": count, "grad_norm": grad_norm, "lr": lr_fn(update_count),
               "skipped": (~finite).astype(jnp.int32)}
    return new_state, metrics


def sft_eval_step(state: TrainState, batch: Batch, *, graphdef: nnx.GraphDef
                  ) -> dict[str, jax.Array]:
    """`{"nll_sum", "tokens"}` of a batch under the state's params (no update)."""
    nll_sum, (count, _) = sft_loss_sum(state.params, state.model_state, batch, graphdef=graphdef)
    return {"nll_sum": nll_sum, "tokens": count}
