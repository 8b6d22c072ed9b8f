"""One residual block of the stack: `x + mixer(rms_norm(x))`, the mixer one of Mamba-2, attention,
the routed MoE or a dense MLP (pattern letters M, *, E, -), and `run_block`, the block without a
cache under the configured rematerialisation."""

from __future__ import annotations

import jax
from flax import nnx
from jax.sharding import Mesh

from nemocascade.model.attention import Attention
from nemocascade.model.config import ModelConfig
from nemocascade.model.layers import MLP, RMSNorm
from nemocascade.model.mamba2 import Mamba2
from nemocascade.model.moe import MoE

REMAT_POLICIES = {
    "block": None,  # save nothing inside a block: recompute it in the backward pass
    "matmuls": jax.checkpoint_policies.dots_with_no_batch_dims_saveable,
}


class Block(nnx.Module):
    def __init__(self, cfg: ModelConfig, kind: str, *, rngs: nnx.Rngs, mesh: Mesh | None = None):
        self.kind = kind
        self.norm = RMSNorm(cfg.hidden_size, cfg.layer_norm_epsilon, dtype=cfg.param_dtype)
        if kind == "mamba":
            self.mixer = Mamba2(cfg, rngs=rngs, mesh=mesh)
        elif kind == "attention":
            self.mixer = Attention(cfg, rngs=rngs, mesh=mesh)
        elif kind == "moe":
            self.mixer = MoE(cfg, rngs=rngs, mesh=mesh)
        elif kind == "mlp":
            self.mixer = MLP(cfg, cfg.intermediate_size, rngs=rngs)
        else:
            raise ValueError(f"unknown block kind {kind!r}")

    def __call__(self, x_BTD, segment_ids_BT, cache=None, routes_BTK=None):
        """Returns (x_BTD, cache, aux); aux is the MoE statistics dict or None. `routes_BTK`:
        an MoE block's experts to replay (`moe.route`)."""
        h = self.norm(x_BTD)
        aux = None
        if self.kind in ("mamba", "attention"):
            h, cache = self.mixer(h, segment_ids_BT, cache)
        elif self.kind == "moe":
            h, aux = self.mixer(h, segment_ids_BT > 0, routes_BTK)
        else:
            h = self.mixer(h)
        return x_BTD + h.astype(x_BTD.dtype), cache, aux


def _remat_block(block: Block, x_BTD, segment_ids_BT, routes_BTK, policy: str):
    """Runs `block` under `jax.checkpoint` as a pure function of its state (no NNX state writes)."""
    graphdef, state = nnx.split(block)

    def run(st, x, seg, routes):
        return nnx.merge(graphdef, st)(x, seg, None, routes)

    ckpt = jax.checkpoint(run, policy=REMAT_POLICIES[policy])
    return ckpt(state, x_BTD, segment_ids_BT, routes_BTK)


def run_block(block: Block, x_BTD, segment_ids_BT, remat: str, routes_BTK=None):
    """One block without a cache (under `jax.checkpoint` unless remat is "none"): (x, None, aux).
    `routes_BTK`: an MoE block's experts to replay."""
    if remat != "none":
        return _remat_block(block, x_BTD, segment_ids_BT, routes_BTK, remat)
    return block(x_BTD, segment_ids_BT, None, routes_BTK)
