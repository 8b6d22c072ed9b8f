"""NemotronH: embeddings -> pre-norm residual blocks (one mixer each) -> norm_f -> lm_head.

    x = embed(ids)
    for block: x = x + mixer(rms_norm(x))      # mixer in {Mamba2, Attention, MoE, MLP}
    logits = lm_head(rms_norm_f(x))            # fp32

No positional encoding anywhere (NoPE). `segment_ids` [B, T] isolate packed documents (0 marks
padding); `positions` are accepted for API symmetry with packed data and are unused by the math.
With a `cache` (see `init_cache`) the call continues a sequence: attention appends to its KV cache,
Mamba layers carry their conv and SSM states; the result is `(logits, new_cache)`.

Scan over layers (`cfg.scan_layers=True`): the pattern is cut into segments, each run as one
`lax.scan` over stacked parameters (`layer_scan`: the 52-layer pattern is one scan with three
block bodies), with the numbers of the unrolled model. With a cache (generation) the stacked
parameters are sliced per layer and the layers run unrolled, so the cache stays a per-layer list
of batch-major arrays.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx
from jax.sharding import Mesh, NamedSharding

from nemocascade.model import context_parallel
from nemocascade.model.attention import KVCache
from nemocascade.model.block import Block, run_block
from nemocascade.model.config import ModelConfig
from nemocascade.model.layer_scan import BlockGroup, layer_segments
from nemocascade.model.layers import RMSNorm, dtype_of, param
from nemocascade.model.mamba2 import MambaCache


class NemotronH(nnx.Module):
    """`mesh`: the device mesh the model runs on; MoE layers run expert-parallel over its
    `expert` axis when that axis has more than one device (`moe_ep`), and the attention and
    Mamba-2 layers context parallel over its `context` axis (`context_parallel`: the forward
    without a cache). None: single-device layers."""

    def __init__(self, cfg: ModelConfig, *, rngs: nnx.Rngs, mesh: Mesh | None = None):
        self.cfg = cfg
        pd, std = cfg.param_dtype, cfg.initializer_range
        self.embed_VD = param(
            rngs, (cfg.vocab_size, cfg.hidden_size), ("vocab", "embed"), std=std, dtype=pd
        )
        blocks = [Block(cfg, kind, rngs=rngs, mesh=mesh) for kind in cfg.block_types]
        self.cp_mesh = context_parallel.context_mesh(mesh)
        if cfg.scan_layers:  # same blocks (same rngs, layer order), stacked per segment
            self.segments = nnx.List(
                [
                    BlockGroup(seg, blocks[seg.start : seg.start + seg.num_layers])
                    for seg in layer_segments(cfg.pattern)
                ]
            )
        else:
            self.layers = nnx.List(blocks)
        self.norm_f = RMSNorm(cfg.hidden_size, cfg.layer_norm_epsilon, dtype=pd)
        if not cfg.tie_word_embeddings:
            self.lm_head_DV = param(
                rngs, (cfg.hidden_size, cfg.vocab_size), ("embed", "vocab"), std=std, dtype=pd
            )

    # ------------------------------------------------------------------ forward
    def hidden_states(
        self, input_ids_BT, segment_ids_BT=None, cache=None, return_aux=False, routes=None
    ):
        """Final normalised hidden states [B, T, D] (before lm_head), the updated cache, and (with
        `return_aux`) the MoE statistics: {"expert_counts": [n_moe_layers, E], "aux_loss":
        scalar, "routes": [n_moe_layers, B, T, K] int32, the experts every token used,
        "route_changes": (token, layer) pairs whose replayed experts differ from the router's
        own choice (0 without `routes`)}.

        `routes` ([n_moe_layers, B, T, K], e.g. the "routes" a sampling pass returned): routing
        replay (R3), every MoE layer uses these experts, with gates recomputed from its router."""
        cfg = self.cfg
        cd = dtype_of(cfg.compute_dtype)
        if segment_ids_BT is None:
            segment_ids_BT = jnp.ones(input_ids_BT.shape, jnp.int32)
        x = jnp.take(self.embed_VD[...], input_ids_BT, axis=0).astype(cd)
        if self.cp_mesh is not None and cache is None:  # every position-wise op on its slice
            context_parallel.local_length(x.shape[1], self.cp_mesh, "NemotronH")
            x = jax.lax.with_sharding_constraint(
                x, NamedSharding(self.cp_mesh, context_parallel.seq_spec(self.cp_mesh, 3))
            )
        n_moe = cfg.block_types.count("moe")
        if routes is not None and (routes.ndim != 4 or routes.shape[:3] != (n_moe,) + x.shape[:2]):
            raise ValueError(
                f"NemotronH: routes {routes.shape} do not match [n_moe_layers={n_moe}, "
                f"B, T, K] for input ids {input_ids_BT.shape}"
            )
        replay = [None] * n_moe if routes is None else list(routes)  # per MoE layer, in order
        new_cache, auxes = None, []  # auxes: the MoE layers' statistics, in layer order
        if cache is not None:
            new_cache = []
            for i, block in self.layer_blocks():
                r = replay[len(auxes)] if block.kind == "moe" else None
                x, layer_cache, aux = block(x, segment_ids_BT, cache[i], r)
                new_cache.append(layer_cache)
                auxes += [] if aux is None else [aux]
        elif cfg.scan_layers:
            for group in self.segments:
                n = group.segment.letters.count("E")
                mine = None if routes is None else routes[len(auxes) : len(auxes) + n]
                x, group_auxes = group(x, segment_ids_BT, cfg.remat, mine)
                auxes += group_auxes
        else:
            for block in self.layers:
                r = replay[len(auxes)] if block.kind == "moe" else None
                x, _, aux = run_block(block, x, segment_ids_BT, cfg.remat, r)
                auxes += [] if aux is None else [aux]
        h = self.norm_f(x)
        if not return_aux:
            return h, new_cache
        counts = [aux["expert_counts"] for aux in auxes]
        aux_loss = changes = jnp.zeros((), jnp.float32)
        for aux in auxes:  # summed in layer order
            aux_loss = aux_loss + aux.get("aux_loss", 0.0)
            changes = changes + aux["route_changes"]
        b, t = x.shape[:2]
        stats = {
            "expert_counts": jnp.stack(counts) if counts else jnp.zeros((0, cfg.n_routed_experts)),
            "aux_loss": aux_loss,
            "routes": (
                jnp.stack([aux["routes"] for aux in auxes])
                if auxes
                else jnp.zeros((0, b, t, cfg.num_experts_per_tok), jnp.int32)
            ),
            "route_changes": changes,
        }
        return h, new_cache, stats

    def layer_blocks(self) -> Iterator[tuple[int, Block]]:
        """(layer index, Block) for every layer in order; in a scanned model each block holds
        its layer's slice of the stacked parameters (per-layer use, e.g. the cached decode
        path)."""
        if not self.cfg.scan_layers:
            yield from enumerate(self.layers)
            return
        for group in self.segments:
            yield from group.layer_blocks()

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
        self,
        input_ids_BT,
        segment_ids=None,
        positions=None,
        cache=None,
        return_aux=False,
        routes=None,
    ):
        """Logits [B, T, V] fp32.

        `(logits, cache)` with a cache; `(logits, aux)` with return_aux; `(logits, cache, aux)`
        with both (a sampler recording the experts of each decoded token: aux["routes"]).
        `routes`: routing replay (see `hidden_states`).
        """
        del positions  # NoPE
        if return_aux:
            h, new_cache, aux = self.hidden_states(
                input_ids_BT, segment_ids, cache, return_aux=True, routes=routes
            )
            logits = self.logits(h)
            return (logits, aux) if cache is None else (logits, new_cache, aux)
        h, new_cache = self.hidden_states(input_ids_BT, segment_ids, cache, routes=routes)
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
