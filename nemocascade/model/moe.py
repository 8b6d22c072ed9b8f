"""Mixture-of-Experts layer (NemotronH `E` blocks), DeepSeek-V3 style routing.

route:   fp32 sigmoid scores; the correction bias is added only to *choose* experts
         (group-limited: groups ranked by the sum of their top-2 biased scores, keep `topk_group`);
         weights are the unbiased scores of the chosen experts, renormalised, times
         `routed_scaling_factor`.
experts: non-gated squared-ReLU MLPs computed by a backend from `moe_backends` (config-selected).
shared:  one always-on squared-ReLU MLP added to the routed output.

The correction bias is an `ExpertBias` variable, not an `nnx.Param`: the optimizer never touches
it; the aux-loss-free balancing update (`moe_balance`) changes it from the step's expert counts.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from nemocascade.model.config import ModelConfig
from nemocascade.model.layers import MLP, dtype_of, param
from nemocascade.model.moe_backends import expert_mlp


class ExpertBias(nnx.Variable):
    """The router's `e_score_correction_bias` (updated outside the optimizer)."""


class ExpertLoad(nnx.Variable):
    """Per-expert token counts of the last forward pass (a statistic, not a parameter)."""


def route(x_TD, router_DE, bias_E, cfg: ModelConfig):
    """Returns (idx_TK int32, w_TK fp32, scores_TE fp32) for tokens `x_TD`."""
    logits_TE = jnp.einsum("td,de->te", x_TD.astype(jnp.float32), router_DE.astype(jnp.float32),
                           precision=jax.lax.Precision.HIGHEST)
    scores_TE = jax.nn.sigmoid(logits_TE)
    choice_TE = scores_TE + bias_E.astype(jnp.float32)
    if cfg.n_group > 1:
        t, e = choice_TE.shape
        grouped = choice_TE.reshape(t, cfg.n_group, e // cfg.n_group)
        group_score = jnp.sum(jax.lax.top_k(grouped, 2)[0], axis=-1)              # [T, n_group]
        _, keep_idx = jax.lax.top_k(group_score, cfg.topk_group)
        keep = jnp.any(jax.nn.one_hot(keep_idx, cfg.n_group, dtype=bool), axis=1)  # [T, n_group]
        keep_TE = jnp.repeat(keep, e // cfg.n_group, axis=1)
        choice_TE = jnp.where(keep_TE, choice_TE, -jnp.inf)
    _, idx_TK = jax.lax.top_k(choice_TE, cfg.num_experts_per_tok)
    w_TK = jnp.take_along_axis(scores_TE, idx_TK, axis=1)
    if cfg.norm_topk_prob:
        w_TK = w_TK / (jnp.sum(w_TK, axis=-1, keepdims=True) + 1e-20)
    w_TK = w_TK * cfg.routed_scaling_factor
    return idx_TK.astype(jnp.int32), w_TK, scores_TE


class MoE(nnx.Module):

    def __init__(self, cfg: ModelConfig, *, rngs: nnx.Rngs):
        self.cfg = cfg
        d, e, f = cfg.hidden_size, cfg.n_routed_experts, cfg.moe_intermediate_size
        std, pd = cfg.initializer_range, cfg.param_dtype
        self.router_DE = param(rngs, (d, e), ("embed", None), std=std, dtype="float32")
        self.bias_E = ExpertBias(jnp.zeros((e,), jnp.float32), axes=(None,))
        self.up_EDF = param(rngs, (e, d, f), ("experts", "embed", "mlp"), std=std, dtype=pd)
        self.down_EFD = param(rngs, (e, f, d), ("experts", "mlp", "embed"), std=std, dtype=pd)
        self.shared = MLP(cfg, cfg.moe_shared_expert_intermediate_size, rngs=rngs)
        self.load_E = ExpertLoad(jnp.zeros((e,), jnp.float32), axes=(None,))

    def __call__(self, x_BTD):
        cfg = self.cfg
        cd = dtype_of(cfg.compute_dtype)
        b, t, d = x_BTD.shape
        x_TD = x_BTD.reshape(b * t, d).astype(cd)
        idx_TK, w_TK, _ = route(x_TD, self.router_DE[...], self.bias_E[...], cfg)
        self.load_E[...] = jnp.sum(jax.nn.one_hot(idx_TK, cfg.n_routed_experts, dtype=jnp.float32),
                                   axis=(0, 1))
        y_TD = expert_mlp(x_TD, idx_TK, w_TK, self.up_EDF[...].astype(cd),
                          self.down_EFD[...].astype(cd), backend=cfg.moe_backend)
        return y_TD.reshape(b, t, d) + self.shared(x_BTD)
