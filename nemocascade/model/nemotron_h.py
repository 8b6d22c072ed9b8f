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

from nemocascade.model.attention import Attention, KVCache
from nemocascade.model.config import ModelConfig
from nemocascade.model.layers import MLP, RMSNorm, dtype_of, param
from nemocascade.model.mamba2 import Mamba2, MambaCache
from nemocascade.model.moe import MoE

REMAT_POLICIES = {
    "block": None,  # save nothing inside a block: recompute it in the backward pass
    "matmuls": jax.checkpoint_policies.dots_with_no_batch_dims_saveable,
}


class Block(nnx.Module):

    def __init__(self, cfg: ModelConfig, kind: str, *, rngs: nnx.Rngs):
        self.kind = kind
        self.norm = RMSNorm(cfg.hidden_size, cfg.layer_norm_epsilon, dtype=cfg.param_dtype)
        if kind == "mamba":
            self.mixer = Mamba2(cfg, rngs=rngs)
        elif kind == "attention":
            self.mixer = Attention(cfg, rngs=rngs)
        elif kind == "moe":
            self.mixer = MoE(cfg, rngs=rngs)
        elif kind == "mlp":
            self.mixer = MLP(cfg, cfg.intermediate_size, rngs=rngs)
        else:
            raise ValueError(f"unknown block kind {kind!r}")

    def __call__(self, x_BTD, segment_ids_BT, cache=None):
        h = self.norm(x_BTD)
        if self.kind in ("mamba", "attention"):
            h, cache = self.mixer(h, segment_ids_BT, cache)
        else:
            h = self.mixer(h)
        return x_BTD + h.astype(x_BTD.dtype), cache


class NemotronH(nnx.Module):

    def __init__(self, cfg: ModelConfig, *, rngs: nnx.Rngs):
        self.cfg = cfg
        pd, std = cfg.param_dtype, cfg.initializer_range
        self.embed_VD = param(rngs, (cfg.vocab_size, cfg.hidden_size), ("vocab", "embed"), std=std, dtype=pd)
        self.layers = nnx.List([Block(cfg, kind, rngs=rngs) for kind in cfg.block_types])
        self.norm_f = RMSNorm(cfg.hidden_size, cfg.layer_norm_epsilon, dtype=pd)
        if not cfg.tie_word_embeddings:
            self.lm_head_DV = param(rngs, (cfg.hidden_size, cfg.vocab_size), ("embed", "vocab"), std=std,
                                    dtype=pd)

    # ------------------------------------------------------------------ forward
    def hidden_states(self, input_ids_BT, segment_ids_BT=None, cache=None):
        """Final normalised hidden states [B, T, D] (before lm_head), and the updated cache."""
        cfg = self.cfg
        cd = dtype_of(cfg.compute_dtype)
        if segment_ids_BT is None:
            segment_ids_BT = jnp.ones(input_ids_BT.shape, jnp.int32)
        x = jnp.take(self.embed_VD[...], input_ids_BT, axis=0).astype(cd)
        new_cache = []
        for i, block in enumerate(self.layers):
            layer_cache = None if cache is None else cache[i]
            if cfg.remat != "none" and cache is None:
                x, _ = nnx.remat(lambda blk, y, s: blk(y, s), policy=REMAT_POLICIES[cfg.remat])(
                    block, x, segment_ids_BT)
                layer_cache = None
            else:
                x, layer_cache = block(x, segment_ids_BT, layer_cache)
            new_cache.append(layer_cache)
        return self.norm_f(x), (None if cache is None else new_cache)

    def lm_head_weight(self) -> jax.Array:
        """[D, V] output projection (the transposed embedding when tied)."""
        if self.cfg.tie_word_embeddings:
            return self.embed_VD[...].T
        return self.lm_head_DV[...]

    def logits(self, h_BTD) -> jax.Array:
        cd = dtype_of(self.cfg.compute_dtype)
        return jnp.einsum("btd,dv->btv", h_BTD.astype(cd), self.lm_head_weight().astype(cd),
                          preferred_element_type=jnp.float32)

    def __call__(self, input_ids_BT, segment_ids=None, positions=None, cache=None):
        del positions  # NoPE
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
