"""Mixture-of-Experts layer (NemotronH `E` blocks), DeepSeek-V3 style routing.

route:   fp32 sigmoid scores; the correction bias is added only to *choose* experts
         (group-limited: groups ranked by the sum of their top-2 biased scores, keep `topk_group`);
         weights are the unbiased scores of the chosen experts, renormalised, times
         `routed_scaling_factor`.
experts: non-gated squared-ReLU MLPs computed by a backend from `moe_backends` (config-selected).
shared:  one always-on squared-ReLU MLP added to the routed output.

The correction bias is a `moe_balance.ExpertBias` variable, not an `nnx.Param`: the optimizer
never touches it; the aux-loss-free balancing update (`moe_balance`) changes it from the step's
expert counts.

Expert parallelism: the layer is given the device mesh when it is built (`MoE(cfg, mesh=...)`,
passed down from `NemotronH(cfg, mesh=...)`; a static attribute, part of the graph definition).
With an `expert` axis > 1 the routed experts run through `moe_ep.expert_parallel_mlp` (tokens
exchanged with all_to_all, capacity from `cfg.moe_capacity_factor`) and aux["dropped_tokens"]
counts dropped assignments; without a mesh, or with an expert axis of 1, the single-device backend.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx
from jax.sharding import Mesh

from nemocascade.model import moe_balance, moe_ep
from nemocascade.model.config import ModelConfig
from nemocascade.model.layers import MLP, dtype_of, param
from nemocascade.model.moe_backends import expert_mlp
from nemocascade.model.moe_balance import ExpertBias

# parameter names (last path element) of the router weights: frozen during RL
ROUTER_PARAM_NAMES = ("router_DE",)


def route(x_TD, router_DE, bias_E, cfg: ModelConfig, replay_TK=None):
    """Returns (idx_TK int32, w_TK fp32, scores_TE fp32, own_TK int32) for tokens `x_TD`:
    the experts used, their weights, the router's scores and its own top-k choice (= idx_TK
    without replay).

    `replay_TK` (routing replay, R3): the experts to use, e.g. those the sampler chose; the
    weights are recomputed from this router's scores of those experts (so gradients reach the
    router as with a fresh choice). A token whose row of `replay_TK` starts with a negative id
    (-1: nothing recorded, e.g. a position the sampler never ran) chooses afresh."""
    logits_TE = jnp.einsum(
        "td,de->te",
        x_TD.astype(jnp.float32),
        router_DE.astype(jnp.float32),
        precision=jax.lax.Precision.HIGHEST,
    )
    scores_TE = jax.nn.sigmoid(logits_TE)
    own_TK = idx_TK = _choose(scores_TE, bias_E, cfg)
    if replay_TK is not None:
        replay_TK = replay_TK.astype(jnp.int32)
        idx_TK = jnp.where(replay_TK[:, :1] >= 0, replay_TK, own_TK)
    w_TK = jnp.take_along_axis(scores_TE, idx_TK, axis=1)
    if cfg.norm_topk_prob:
        w_TK = w_TK / (jnp.sum(w_TK, axis=-1, keepdims=True) + 1e-20)
    w_TK = w_TK * cfg.routed_scaling_factor
    return idx_TK, w_TK, scores_TE, own_TK


def _choose(scores_TE, bias_E, cfg: ModelConfig):
    """The top-k experts by biased score, group-limited (DeepSeek-V3): [T, K] int32."""
    choice_TE = scores_TE + bias_E.astype(jnp.float32)
    if cfg.n_group > 1:
        t, e = choice_TE.shape
        grouped = choice_TE.reshape(t, cfg.n_group, e // cfg.n_group)
        group_score = jnp.sum(jax.lax.top_k(grouped, 2)[0], axis=-1)  # [T, n_group]
        _, keep_idx = jax.lax.top_k(group_score, cfg.topk_group)
        keep = jnp.any(jax.nn.one_hot(keep_idx, cfg.n_group, dtype=bool), axis=1)  # [T, n_group]
        keep_TE = jnp.repeat(keep, e // cfg.n_group, axis=1)
        choice_TE = jnp.where(keep_TE, choice_TE, -jnp.inf)
    _, idx_TK = jax.lax.top_k(choice_TE, cfg.num_experts_per_tok)
    return idx_TK.astype(jnp.int32)


class MoE(nnx.Module):
    def __init__(self, cfg: ModelConfig, *, rngs: nnx.Rngs, mesh: Mesh | None = None):
        self.cfg = cfg
        d, e, f = cfg.hidden_size, cfg.n_routed_experts, cfg.moe_intermediate_size
        std, pd = cfg.initializer_range, cfg.param_dtype
        self.router_DE = param(rngs, (d, e), ("embed", None), std=std, dtype="float32")
        self.bias_E = ExpertBias(jnp.zeros((e,), jnp.float32), axes=(None,))
        self.up_EDF = param(rngs, (e, d, f), ("experts", "embed", "mlp"), std=std, dtype=pd)
        self.down_EFD = param(rngs, (e, f, d), ("experts", "mlp", "embed"), std=std, dtype=pd)
        self.shared = MLP(cfg, cfg.moe_shared_expert_intermediate_size, rngs=rngs)
        self.ep_mesh = moe_ep.expert_mesh(mesh)  # None: the single-device backend

    def __call__(self, x_BTD, valid_BT=None, routes_BTK=None):
        """Returns (y_BTD, aux): aux["expert_counts"] [E] counts the routed assignments of valid
        tokens (the input of the balancing bias update); aux["routes"] [B, T, K] int32 are the
        experts each token used (to record for routing replay); aux["route_changes"] counts
        the valid tokens whose replayed experts differ (as a set) from this router's own choice
        (0 without replay); aux["aux_loss"] is the sequence-level balance loss (unscaled),
        present when `cfg.moe_aux_loss_coef > 0`.
        `routes_BTK`: replay these experts instead of choosing (see `route`)."""
        cfg = self.cfg
        cd = dtype_of(cfg.compute_dtype)
        b, t, d = x_BTD.shape
        if valid_BT is None:
            valid_BT = jnp.ones((b, t), bool)
        x_TD = x_BTD.reshape(b * t, d).astype(cd)
        e, k = cfg.n_routed_experts, cfg.num_experts_per_tok
        replay = None if routes_BTK is None else routes_BTK.reshape(b * t, k)
        idx_TK, w_TK, scores_TE, own_TK = route(
            x_TD, self.router_DE[...], self.bias_E[...], cfg, replay
        )
        # balancing statistics (moe_balance): global counts under jit over sharded tokens
        aux = {
            "expert_counts": moe_balance.expert_counts(idx_TK, e, valid_BT.reshape(b * t)),
            "routes": idx_TK.reshape(b, t, k),
            "route_changes": jnp.zeros((), jnp.float32),
        }
        if replay is not None:  # replayed experts the router would not choose now
            changed_T = jnp.any(jnp.sort(own_TK, -1) != jnp.sort(idx_TK, -1), axis=-1)
            aux["route_changes"] = jnp.sum(changed_T & valid_BT.reshape(b * t), dtype=jnp.float32)
        if cfg.moe_aux_loss_coef > 0:
            aux["aux_loss"] = moe_balance.sequence_aux_loss(
                scores_TE.reshape(b, t, e), idx_TK.reshape(b, t, k), e, k, valid_BT
            )
        up_EDF, down_EFD = self.up_EDF[...].astype(cd), self.down_EFD[...].astype(cd)
        if self.ep_mesh is not None:  # expert parallel (moe_ep)
            # tokens as [B, T] when sequences are sharded over `context`: each device sends its own
            tokens = (b, t) if self.ep_mesh.shape.get("context", 1) > 1 else (b * t,)
            y_TD, aux["dropped_tokens"] = moe_ep.expert_parallel_mlp(
                x_TD.reshape(tokens + (d,)),
                idx_TK.reshape(tokens + (k,)),
                w_TK.reshape(tokens + (k,)),
                up_EDF,
                down_EFD,
                mesh=self.ep_mesh,
                capacity_factor=cfg.moe_capacity_factor,
                backend=cfg.moe_backend,
            )
        else:
            y_TD = expert_mlp(x_TD, idx_TK, w_TK, up_EDF, down_EFD, backend=cfg.moe_backend)
        return y_TD.reshape(b, t, d) + self.shared(x_BTD), aux
