"""NemotronH: embeddings -> pre-norm residual blocks (one mixer each) -> norm_f -> lm_head.

    x = embed(ids)
    for block: x = x + mixer(rms_norm(x))      # mixer in {Mamba2, Attention, MoE, MLP}
    logits = lm_head(rms_norm_f(x))            # fp32

No positional encoding anywhere (NoPE). `segment_ids` [B, T] isolate packed documents (0 marks
padding); `positions` are accepted for API symmetry with packed data and are unused by the math.
With a `cache` (see `init_cache`) the call continues a sequence: attention appends to its KV cache,
Mamba layers carry their conv and SSM states; the result is `(logits, new_cache)`.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx
from jax.sharding import Mesh

from nemocascade.model.attention import Attention, KVCache
from nemocascade.model.config import ModelConfig
from nemocascade.model.layers import MLP, RMSNorm, dtype_of, param
from nemocascade.model.mamba2 import Mamba2, MambaCache
from nemocascade.model.moe import MoE

REMAT_POLICIES = {
    "block": None,  # save nothing inside a block: recompute it in the backward pass
    "matmuls": jax.checkpoint_policies.dots_with_no_batch_dims_saveable,
}


def _remat_block(block, x_BTD, segment_ids_BT, policy: str):
    """Runs `block` under `jax.checkpoint` as a pure function of its state (no NNX state writes)."""
    graphdef, state = nnx.split(block)

    def run(st, x, seg):
        return nnx.merge(graphdef, st)(x, seg)

    return jax.checkpoint(run, policy=REMAT_POLICIES[policy])(state, x_BTD, segment_ids_BT)


class Block(nnx.Module):
    def __init__(self, cfg: ModelConfig, kind: str, *, rngs: nnx.Rngs, mesh: Mesh | None = None):
        self.kind = kind
        self.norm = RMSNorm(cfg.hidden_size, cfg.layer_norm_epsilon, dtype=cfg.param_dtype)
        if kind == "mamba":
            self.mixer = Mamba2(cfg, rngs=rngs)
        elif kind == "attention":
            self.mixer = Attention(cfg, rngs=rngs)
        elif kind == "moe":
            self.mixer = MoE(cfg, rngs=rngs, mesh=mesh)
        elif kind == "mlp":
            self.mixer = MLP(cfg, cfg.intermediate_size, rngs=rngs)
        else:
            raise ValueError(f"unknown block kind {kind!r}")

    def __call__(self, x_BTD, segment_ids_BT, cache=None):
        """Returns (x_BTD, cache, aux); aux is the MoE statistics dict or None."""
        h = self.norm(x_BTD)
        aux = None
        if self.kind in ("mamba", "attention"):
            h, cache = self.mixer(h, segment_ids_BT, cache)
        elif self.kind == "moe":
            h, aux = self.mixer(h, segment_ids_BT > 0)
        else:
            h = self.mixer(h)
        return x_BTD + h.astype(x_BTD.dtype), cache, aux


class NemotronH(nnx.Module):
    """`mesh`: the device mesh the model runs on; MoE layers run expert-parallel over its
    `expert` axis when that axis has more than one device (`moe_ep`). None: single-device MoE."""

    def __init__(self, cfg: ModelConfig, *, rngs: nnx.Rngs, mesh: Mesh | None = None):
        self.cfg = cfg
        pd, std = cfg.param_dtype, cfg.initializer_range
        self.embed_VD = param(
            rngs, (cfg.vocab_size, cfg.hidden_size), ("vocab", "embed"), std=std, dtype=pd
        )
        self.layers = nnx.List([Block(cfg, kind, rngs=rngs, mesh=mesh) for kind in cfg.block_types])
        self.norm_f = RMSNorm(cfg.hidden_size, cfg.layer_norm_epsilon, dtype=pd)
        if not cfg.tie_word_embeddings:
            self.lm_head_DV = param(
                rngs, (cfg.hidden_size, cfg.vocab_size), ("embed", "vocab"), std=std, dtype=pd
            )

    # ------------------------------------------------------------------ forward
    def hidden_states(self, input_ids_BT, segment_ids_BT=None, cache=None, return_aux=False):
        """Final normalised hidden states [B, T, D] (before lm_head), the updated cache, and (with
        `return_aux`) the MoE statistics:
        {"expert_counts": [n_moe_layers, E], "aux_loss": scalar}."""
        cfg = self.cfg
        cd = dtype_of(cfg.compute_dtype)
        if segment_ids_BT is None:
            segment_ids_BT = jnp.ones(input_ids_BT.shape, jnp.int32)
        x = jnp.take(self.embed_VD[...], input_ids_BT, axis=0).astype(cd)
        new_cache, counts, aux_loss = [], [], jnp.zeros((), jnp.float32)
        for i, block in enumerate(self.layers):
            layer_cache = None if cache is None else cache[i]
            if cfg.remat != "none" and cache is None:
                x, layer_cache, aux = _remat_block(block, x, segment_ids_BT, cfg.remat)
            else:
                x, layer_cache, aux = block(x, segment_ids_BT, layer_cache)
            new_cache.append(layer_cache)
            if aux is not None:
                counts.append(aux["expert_counts"])
                aux_loss = aux_loss + aux.get("aux_loss", 0.0)
        h = self.norm_f(x)
        new_cache = None if cache is None else new_cache
        if not return_aux:
            return h, new_cache
        stats = {
            "expert_counts": jnp.stack(counts) if counts else jnp.zeros((0, cfg.n_routed_experts)),
            "aux_loss": aux_loss,
        }
        return h, new_cache, stats

    def lm_head_weight(self) -> jax.Array:
        """[D, V] output projection (the transposed embedding when tied)."""
        if self.cfg.tie_word_embeddings:
            return self.embed_VD[...].T
        return self.lm_head_DV[...]

    def logits(self, h_BTD) -> jax.Array:
        cd = dtype_of(self.cfg.compute_dtype)
        return jnp.einsum(
            "btd,dv->btv",
            h_BTD.astype(cd),
            self.lm_head_weight().astype(cd),
            preferred_element_type=jnp.float32,
        )

    def __call__(
        self, input_ids_BT, segment_ids=None, positions=None, cache=None, return_aux=False
    ):
        """Logits [B, T, V] fp32.

        `(logits, cache)` with a cache; `(logits, aux)` with return_aux.
        """
        del positions  # NoPE
        if return_aux:
            h, _, aux = self.hidden_states(input_ids_BT, segment_ids, None, return_aux=True)
            return self.logits(h), aux
        h, new_cache = self.hidden_states(input_ids_BT, segment_ids, cache)
        logits = self.logits(h)
        return logits if cache is None else (logits, new_cache)

    # ------------------------------------------------------------------ caches
    def init_cache(self, batch: int, max_len: int, dtype: Any = None) -> list:
        """Per-layer caches: KVCache for attention, MambaCache for Mamba, None otherwise."""
        dtype = dtype or dtype_of(self.cfg.compute_dtype)
        out = []
        for kind in self.cfg.block_types:
            if kind == "attention":
                out.append(KVCache.init(self.cfg, batch, max_len, dtype))
            elif kind == "mamba":
                out.append(MambaCache.init(self.cfg, batch, dtype))
            else:
                out.append(None)
        return out
