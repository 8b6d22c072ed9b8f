"""Optimizer: AdamW with a decay mask, linear warmup then cosine to a floor, global-norm clipping.

Defaults are the Cascade-2 SFT recipe (paper Table 7): AdamW beta1 0.9, beta2 0.98, weight decay
0.1, lr 5e-5 -> 5e-6 cosine after 200 warmup steps. Weight decay skips norms, biases and every
parameter with fewer than two dimensions (Mamba `A_log`, `D`, `dt_bias`); the MoE correction bias
is not a Param at all, so the optimizer never sees it.

Gradient accumulation (`grad_accum_steps`) is done inside the train step (`steps.accumulate`).
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import optax
from flax import nnx

from nemocascade.model.layers import path_names
from nemocascade.model.moe import ROUTER_PARAM_NAMES
from nemocascade.model.moe_balance import update_model_biases
from nemocascade.train.state import TrainState
from nemocascade.typed_config import from_mapping

NO_DECAY_NAME_PARTS = ("norm", "bias")


@dataclasses.dataclass(frozen=True)
class OptimConfig:
    """Hyperparameters of `make_optimizer` (names match the `optim` section of a config)."""

    lr: float = 5e-5  # peak learning rate
    min_lr: float = 5e-6  # cosine floor
    warmup_steps: int = 200
    decay_steps: int = 0  # where the cosine reaches min_lr; 0 means at the run's last step
    b1: float = 0.9
    b2: float = 0.98
    eps: float = 1e-8
    weight_decay: float = 0.1
    clip_norm: float = 1.0  # global-norm clipping; 0 disables
    grad_accum_steps: int = 1
    # aux-loss-free MoE balancing: correction bias += rate * sign(mean load - load) after each
    # step (outside the optimizer; Megatron nano-v3 uses 1e-3); 0 freezes the bias
    moe_bias_rate: float = 1e-3

    def __post_init__(self):
        if self.lr <= 0 or self.min_lr < 0 or self.min_lr > self.lr:
            raise ValueError(
                f"optim: need 0 <= min_lr <= lr and lr > 0, got lr={self.lr}, min_lr={self.min_lr}"
            )
        if (
            self.warmup_steps < 0
            or self.decay_steps < 0
            or self.grad_accum_steps < 1
            or self.clip_norm < 0
            or self.moe_bias_rate < 0
        ):
            raise ValueError(f"optim: bad warmup_steps/grad_accum_steps/clip_norm in {self}")

    @classmethod
    def from_mapping(cls, cfg: Mapping[str, Any]) -> OptimConfig:
        """From a config section; unknown keys raise, naming the valid ones."""
        return from_mapping(cls, cfg, "optim")


def lr_schedule(cfg: OptimConfig, total_steps: int) -> Callable[[jax.Array], jax.Array]:
    """lr(s) = lr*(s+1)/warmup for s < warmup, then cosine from lr to min_lr at step
    `cfg.decay_steps` (or `total_steps` if that is 0), min_lr after.

    Step s is the 0-based optimizer update count; the first update already uses a non-zero lr.
    """
    warmup, total = cfg.warmup_steps, int(cfg.decay_steps or total_steps)
    decay = max(total - warmup, 1)

    def schedule(step):
        s = jnp.asarray(step, jnp.float32)
        warm = cfg.lr * jnp.minimum((s + 1.0) / max(warmup, 1), 1.0)
        frac = jnp.clip((s - warmup) / decay, 0.0, 1.0)
        cosine = cfg.min_lr + 0.5 * (cfg.lr - cfg.min_lr) * (1.0 + jnp.cos(math.pi * frac))
        return jnp.where(s < warmup, warm, cosine)

    return schedule


def decay_mask(params: Any) -> Any:
    """True where weight decay applies: >= 2-D params whose path names no norm or bias."""

    def decide(path, leaf):
        value = leaf.get_value() if isinstance(leaf, nnx.Variable) else leaf
        names = [n.lower() for n in path_names(path)]
        if getattr(value, "ndim", 0) < 2:
            return False
        return not any(part in name for name in names for part in NO_DECAY_NAME_PARTS)

    return jax.tree_util.tree_map_with_path(
        decide, params, is_leaf=lambda x: isinstance(x, nnx.Variable)
    )


def make_optimizer(cfg: OptimConfig, total_steps: int) -> optax.GradientTransformation:
    """clip_by_global_norm (if clip_norm > 0) then AdamW with `lr_schedule` and `decay_mask`."""
    adamw = optax.adamw(
        learning_rate=lr_schedule(cfg, total_steps),
        b1=cfg.b1,
        b2=cfg.b2,
        eps=cfg.eps,
        weight_decay=cfg.weight_decay,
        mask=decay_mask,
    )
    if cfg.clip_norm > 0:
        return optax.chain(optax.clip_by_global_norm(cfg.clip_norm), adamw)
    return adamw


def router_labels(params: Any, router_names: Sequence[str] = ROUTER_PARAM_NAMES) -> Any:
    """Label tree for `optax.multi_transform`: 'router' for router weights, else 'trainable'."""

    def label(path, _):
        names = path_names(path)
        return "router" if names and names[-1] in router_names else "trainable"

    return jax.tree_util.tree_map_with_path(
        label, params, is_leaf=lambda x: isinstance(x, nnx.Variable)
    )


def freeze_router(
    tx: optax.GradientTransformation, router_names: Sequence[str] = ROUTER_PARAM_NAMES
) -> optax.GradientTransformation:
    """`tx` for every parameter except the router weights, whose updates are exactly zero.

    Used by RL stages (router frozen, as in Nemotron-3 RL). The MoE correction bias is not a
    Param (`moe_balance.ExpertBias`), so it keeps balancing the load through
    `update_model_biases` after each step. The optimizer state of the router is not allocated.
    """

    def labels(params: Any) -> Any:
        return router_labels(params, router_names)

    return optax.multi_transform({"trainable": tx, "router": optax.set_to_zero()}, labels)


def _select(pred, on_true, on_false):
    """Elementwise `pred ? on_true : on_false` over two pytrees of the same structure."""
    return jax.tree.map(lambda a, b: jnp.where(pred, a, b), on_true, on_false)


def apply_update(
    state: TrainState,
    loss: jax.Array,
    grads,
    expert_counts_LE: jax.Array,
    *,
    tx: optax.GradientTransformation,
    moe_bias_rate: float = 0.0,
):
    """The optimizer update shared by the SFT, GRPO and distillation steps.

    NaN guard: if the loss or the gradient norm is not finite, params, optimizer and model state
    stay unchanged (`step` still advances). Otherwise the MoE correction biases follow
    `moe_balance.update_model_biases` from this batch's expert counts (if `moe_bias_rate` > 0).
    Returns (new_state, grad_norm, skipped)."""
    grad_norm = optax.tree.norm(grads)
    finite = jnp.isfinite(loss) & jnp.isfinite(grad_norm)
    updates, new_opt = tx.update(grads, state.opt_state, state.params)
    new_params = optax.apply_updates(state.params, updates)
    new_ms = state.model_state
    if moe_bias_rate and expert_counts_LE.shape[0]:
        new_ms = update_model_biases(state.model_state, expert_counts_LE, moe_bias_rate)
    rng, _ = jax.random.split(state.rng)
    new_state = TrainState(
        step=state.step + 1,
        params=_select(finite, new_params, state.params),
        model_state=_select(finite, new_ms, state.model_state),
        opt_state=_select(finite, new_opt, state.opt_state),
        rng=rng,
    )
    return new_state, grad_norm, (~finite).astype(jnp.int32)
