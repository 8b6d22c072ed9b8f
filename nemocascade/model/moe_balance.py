"""MoE load balancing as in Nemotron-3-Nano / Megatron-Core: pure functions.

* Aux-loss-free balancing (DeepSeek-V3): each MoE layer's router adds a correction bias to the
  scores it uses to *choose* experts. After every step, outside the optimizer,

      bias_E += rate * sign(mean(counts_E) - counts_E)          (Megatron `get_updated_expert_bias`)

  where `counts_E` are the routed assignments of the step's whole global batch. Inside `jax.jit`
  over sharded arrays a plain `jnp.sum` over the token axis already is the global (all-reduced)
  count; under `shard_map` the caller must `psum` the per-device counts over the batch axes
  (see `moe_ep.global_expert_counts`). Default rate 1e-3 (Megatron nano-v3 golden config).
* Sequence-level auxiliary loss (DeepSeek-V3 eq. 17-20, Megatron `seq_aux_loss`): per sequence
  f_i = E / (K T) * #{t : expert i among the K chosen for token t},
  P_i = (1/T) sum_t s_ti / sum_j s_tj  (s = sigmoid scores),  loss = sum_i f_i P_i,
  averaged over sequences; f is a constant (no gradient). Uniform routing gives 1. The coefficient
  (Megatron default 1e-4) is applied by the caller.
* The correction bias is an `ExpertBias` variable (defined here), not an `nnx.Param`: the
  optimizer never sees it, so it keeps following the rule above also when the router weights
  are frozen (`train.optim.freeze_router`, done during RL).
* `load_metrics`: per-layer expert-load statistics for logging.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

from nemocascade.model.layers import path_names

DEFAULT_BIAS_UPDATE_RATE = 1e-3


class ExpertBias(nnx.Variable):
    """A MoE router's `e_score_correction_bias` [E] (updated by rule, outside the optimizer)."""


def expert_counts(
    idx_TK: jax.Array, num_experts: int, valid_T: jax.Array | None = None
) -> jax.Array:
    """[E] fp32 number of (token, k) assignments routed to each expert (invalid tokens excluded).

    `idx_TK` may have any leading shape (`[..., K]`); `valid_T` broadcasts over it without K.
    Out-of-range ids (dropped / no expert) are not counted.
    """
    onehot = jax.nn.one_hot(idx_TK, num_experts, dtype=jnp.float32)  # [..., K, E]
    if valid_T is not None:
        onehot = onehot * valid_T.astype(jnp.float32)[..., None, None]
    return jnp.sum(onehot.reshape(-1, num_experts), axis=0)


def update_expert_bias(
    bias_E: jax.Array, counts_E: jax.Array, rate: float = DEFAULT_BIAS_UPDATE_RATE
) -> jax.Array:
    """`bias + rate * sign(mean(counts) - counts)` (works on [E] or stacked [L, E] counts).

    Under-loaded experts get a larger bias (chosen more often), over-loaded ones a smaller one.
    `counts_E` must be the global-batch counts (see the module docstring).
    """
    counts = counts_E.astype(jnp.float32)
    step = jnp.sign(jnp.mean(counts, axis=-1, keepdims=True) - counts)
    return (bias_E.astype(jnp.float32) + rate * step).astype(bias_E.dtype)


def sequence_aux_loss(
    scores_BTE: jax.Array,
    idx_BTK: jax.Array,
    num_experts: int,
    top_k: int,
    valid_BT: jax.Array | None = None,
) -> jax.Array:
    """Sequence-wise balance loss (unscaled), mean over sequences; padding tokens excluded.

    scores_BTE: fp32 sigmoid router scores (without the correction bias); idx_BTK: chosen experts.
    """
    B, T, E = scores_BTE.shape
    if E != num_experts or idx_BTK.shape != (B, T, top_k):
        raise ValueError(
            f"moe_balance.sequence_aux_loss: scores {scores_BTE.shape} / idx "
            f"{idx_BTK.shape} do not match num_experts={num_experts}, top_k={top_k}"
        )
    v_BT = jnp.ones((B, T), jnp.float32) if valid_BT is None else valid_BT.astype(jnp.float32)
    n_B = jnp.maximum(jnp.sum(v_BT, axis=1), 1.0)
    chosen_BE = jnp.einsum("btke,bt->be", jax.nn.one_hot(idx_BTK, E, dtype=jnp.float32), v_BT)
    f_BE = jax.lax.stop_gradient(chosen_BE * (E / top_k) / n_B[:, None])
    s = scores_BTE.astype(jnp.float32)
    p_BE = jnp.einsum("bte,bt->be", s / jnp.sum(s, axis=-1, keepdims=True), v_BT) / n_B[:, None]
    return jnp.mean(jnp.sum(f_BE * p_BE, axis=-1))


def load_metrics(counts_LE: jax.Array, prefix: str = "moe/") -> dict[str, jax.Array]:
    """Expert-load statistics from per-layer counts [L, E] (or [E]).

    Per layer ([L] arrays): `max_violation` = max/mean - 1 (Megatron's name; 0 = balanced),
    `min_load` = min/mean, `unused_experts` (count of experts with no token). Scalars:
    `max_violation_mean` over layers and `tokens_per_expert_mean`.
    """
    c = jnp.atleast_2d(counts_LE.astype(jnp.float32))
    mean_L = jnp.maximum(jnp.mean(c, axis=-1), 1e-9)
    max_violation_L = jnp.max(c, axis=-1) / mean_L - 1.0
    return {
        f"{prefix}max_violation": max_violation_L,
        f"{prefix}min_load": jnp.min(c, axis=-1) / mean_L,
        f"{prefix}unused_experts": jnp.sum(c == 0, axis=-1).astype(jnp.float32),
        f"{prefix}max_violation_mean": jnp.mean(max_violation_L),
        f"{prefix}tokens_per_expert_mean": jnp.mean(c),
    }


def _is_bias_var(x) -> bool:
    return isinstance(x, ExpertBias)


def update_model_biases(
    model_state: Any, counts_LE: jax.Array, rate: float = DEFAULT_BIAS_UPDATE_RATE
) -> Any:
    """Apply `update_expert_bias` to every `ExpertBias` in an nnx state (or module-state pytree).

    The biases are matched to the rows of `counts_LE` ([n_moe_layers, E], the model's
    `expert_counts` statistic, in layer order). A bias [E] is one row; a stacked bias [R, E]
    (a scanned model, `layer_scan.BlockGroup`) is R rows. The rows' layer order is
      * the biases' `layer_ids` metadata when they carry it (one layer index per row; set by
        `NemotronH` with `scan_layers`, whose stacked rows interleave with the other unit
        positions of their segment), else
      * the order of their paths, integer parts compared as integers (layers/2 before
        layers/10), the R rows of a stacked bias consecutive.
    Returns a new state; other leaves are unchanged.
    """
    row_keys = {}  # path names -> one sort key per row
    for path, var in jax.tree_util.tree_leaves_with_path(model_state, is_leaf=_is_bias_var):
        if not _is_bias_var(var):
            continue
        names = tuple(path_names(path))
        shape = var.get_value().shape
        rows = 1 if len(shape) == 1 else shape[0]
        ids = var.get_metadata().get("layer_ids")
        if ids is not None and len(ids) != rows:
            raise ValueError(
                f"moe_balance.update_model_biases: {'/'.join(names)} has {rows} rows but "
                f"layer_ids {ids}"
            )
        row_keys[names] = [ids[r] if ids is not None else (names, r) for r in range(rows)]
    with_ids = {isinstance(k[0], int) for k in row_keys.values()}
    if len(with_ids) > 1:
        raise ValueError(
            "moe_balance.update_model_biases: some ExpertBias variables have layer_ids "
            "metadata and others do not"
        )

    def path_key(key):
        if isinstance(key, int):
            return (key,)
        names, r = key
        return tuple((0, int(n), "") if n.isdigit() else (1, 0, n) for n in names) + ((0, r, ""),)

    flat = sorted((k for keys in row_keys.values() for k in keys), key=path_key)
    if len(flat) != counts_LE.shape[0]:
        raise ValueError(
            f"moe_balance.update_model_biases: {len(flat)} ExpertBias rows "
            f"({len(row_keys)} variables) but counts for {counts_LE.shape[0]} layers"
        )
    row_of = {k: i for i, k in enumerate(flat)}

    def upd(path, x):
        if not _is_bias_var(x):
            return x
        rows = jnp.asarray([row_of[k] for k in row_keys[tuple(path_names(path))]], jnp.int32)
        counts = counts_LE[rows] if x.get_value().ndim > 1 else counts_LE[rows[0]]
        return x.replace(update_expert_bias(x.get_value(), counts, rate))

    return jax.tree_util.tree_map_with_path(upd, model_state, is_leaf=_is_bias_var)
