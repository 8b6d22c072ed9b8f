"""NemotronH: embeddings -> pre-norm residual blocks (one mixer each) -> norm_f -> lm_head.

    x = embed(ids)
    for block: x = x + mixer(rms_norm(x))      # mixer in {Mamba2, Attention, MoE, MLP}
    logits = lm_head(rms_norm_f(x))            # fp32

No positional encoding anywhere (NoPE). `segment_ids` [B, T] isolate packed documents (0 marks
padding); `positions` are accepted for API symmetry with packed data and are unused by the math.
With a `cache` (see `init_cache`) the call continues a sequence: attention appends to its KV cache,
Mamba layers carry their conv and SSM states; the result is `(logits, new_cache)`.

Scan over layers (`cfg.scan_layers=True`): the pattern is cut into segments by `layer_segments`
(a unit of block kinds repeated R times); a segment with R >= 2 keeps each unit position's
parameters stacked over the repeats (leading logical axis "layers") and runs as one `lax.scan`
whose body is the unit (remat per block inside the body, as unrolled); R == 1 segments run
unrolled. The numbers are those of the unrolled model: the same initial parameters (blocks are
built in layer order from the same rngs, then stacked), the same MoE statistics in layer order,
the same Hugging Face tensors (`hf_io`). With a cache (generation) the stacked parameters are
sliced per layer and the layers run unrolled, so the cache stays a per-layer list of batch-major
arrays.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
from flax import nnx
from jax.sharding import Mesh, NamedSharding

from nemocascade.model import context_parallel
from nemocascade.model.attention import Attention, KVCache
from nemocascade.model.config import ModelConfig
from nemocascade.model.layers import MLP, RMSNorm, dtype_of, param
from nemocascade.model.mamba2 import Mamba2, MambaCache
from nemocascade.model.moe import MoE
from nemocascade.model.moe_balance import ExpertBias

REMAT_POLICIES = {
    "block": None,  # save nothing inside a block: recompute it in the backward pass
    "matmuls": jax.checkpoint_policies.dots_with_no_batch_dims_saveable,
}


LAYER_AXIS = "layers"  # logical axis of the repeats of a scanned segment (sharding.LOGICAL_RULES)


def _remat_block(block, x_BTD, segment_ids_BT, policy: str):
    """Runs `block` under `jax.checkpoint` as a pure function of its state (no NNX state writes)."""
    graphdef, state = nnx.split(block)

    def run(st, x, seg):
        return nnx.merge(graphdef, st)(x, seg)

    return jax.checkpoint(run, policy=REMAT_POLICIES[policy])(state, x_BTD, segment_ids_BT)


def _run_block(block, x_BTD, segment_ids_BT, remat: str):
    """One block without a cache (under `jax.checkpoint` unless remat is "none")."""
    if remat != "none":
        return _remat_block(block, x_BTD, segment_ids_BT, remat)
    return block(x_BTD, segment_ids_BT)


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


# ---------------------------------------------------------------------------- layer segments
class Segment(NamedTuple):
    """Layers `start + r * len(unit) + j` (r < repeats) have block kind `unit[j]` (pattern
    letters)."""

    start: int
    unit: str
    repeats: int


def layer_segments(pattern: str) -> tuple[Segment, ...]:
    """Cuts a block pattern into runs of a repeated unit, deterministically:

    In the span [lo, hi) (first the whole pattern) choose the run (unit, start, repeats >= 2) that
    covers the most layers; among equals the shortest unit, then the earliest start. Then cut the
    spans left and right of it the same way. A span with no repeat left is one segment with
    repeats 1 (run unrolled). E.g. the 52-layer Nemotron-3-Nano pattern gives
    MEMEM*E x5, ME x3, M* x1, EM x4, E x1 (14 block bodies in the program instead of 52).
    """

    def best_run(lo: int, hi: int) -> Segment | None:
        best, best_key = None, None
        for u in range(1, (hi - lo) // 2 + 1):
            for s in range(lo, hi - 2 * u + 1):
                unit, r = pattern[s : s + u], 1
                while s + (r + 1) * u <= hi and pattern[s + r * u : s + (r + 1) * u] == unit:
                    r += 1
                key = (r * u, -u, -s)
                if r >= 2 and (best_key is None or key > best_key):
                    best, best_key = Segment(s, unit, r), key
        return best

    def cut(lo: int, hi: int) -> list[Segment]:
        if lo >= hi:
            return []
        run = best_run(lo, hi)
        if run is None:
            return [Segment(lo, pattern[lo:hi], 1)]
        end = run.start + run.repeats * len(run.unit)
        return cut(lo, run.start) + [run] + cut(end, hi)

    return tuple(cut(0, len(pattern)))


def layer_location(cfg: ModelConfig, layer: int) -> tuple[tuple, int | None]:
    """Where layer `layer`'s block lives in the model's state: (path, row). Unrolled:
    (("layers", i), None). Scanned: (("segments", s, "blocks", j), r) with r the index on the
    leading stacked axis, or None when the segment has one repeat (no stacked axis)."""
    if not 0 <= layer < cfg.num_layers:
        raise IndexError(f"layer {layer} not in [0, {cfg.num_layers})")
    if not cfg.scan_layers:
        return ("layers", layer), None
    for s, seg in enumerate(layer_segments(cfg.pattern)):
        u = len(seg.unit)
        if layer < seg.start + seg.repeats * u:
            r, j = divmod(layer - seg.start, u)
            return ("segments", s, "blocks", j), (r if seg.repeats > 1 else None)
    raise AssertionError("unreachable: the segments cover the pattern")


def _stack_variables(variables: list[nnx.Variable], layer_ids: tuple[int, ...]) -> nnx.Variable:
    """One Variable for the same parameter of several layers: values stacked on a new leading
    axis named LAYER_AXIS (a single layer is kept as it is). ExpertBias variables record the
    layers of their rows (`layer_ids` metadata, read by `moe_balance.update_model_biases`)."""
    first = variables[0]
    meta = dict(first.get_metadata())
    if len(variables) > 1:
        value = jnp.stack([v.get_value() for v in variables])
        meta["axes"] = (LAYER_AXIS,) + tuple(meta.get("axes") or (None,) * (value.ndim - 1))
    else:
        value = first.get_value()
    if isinstance(first, ExpertBias):
        meta["layer_ids"] = tuple(layer_ids)
    return type(first)(value, **meta)


class BlockGroup(nnx.Module):
    """One `Segment` of a scanned model: `blocks[j]` is the unit's j-th block with its parameters
    stacked over the repeats (leading axis LAYER_AXIS; none when repeats == 1)."""

    def __init__(self, segment: Segment, layer_blocks: list[Block]):
        u, r = len(segment.unit), segment.repeats
        if len(layer_blocks) != u * r:
            raise ValueError(f"segment {segment}: {len(layer_blocks)} blocks, want {u * r}")
        self.start, self.unit, self.repeats = segment.start, segment.unit, r
        stacked = []
        for j in range(u):
            copies = [layer_blocks[i * u + j] for i in range(r)]
            parts = [nnx.split(b) for b in copies]
            graphdef = parts[0][0]
            if any(g != graphdef for g, _ in parts):
                raise ValueError(f"segment {segment}: unit position {j} differs between repeats")
            layer_ids = tuple(segment.start + i * u + j for i in range(r))
            state = jax.tree.map(
                lambda *vs, ids=layer_ids: _stack_variables(list(vs), ids),
                *[st for _, st in parts],
                is_leaf=lambda x: isinstance(x, nnx.Variable),
            )
            stacked.append(nnx.merge(graphdef, state))
        self.blocks = nnx.List(stacked)

    def __call__(self, x_BTD, segment_ids_BT, remat: str):
        """Returns (x_BTD, per-MoE-layer aux dicts in layer order)."""
        if self.repeats == 1:
            auxes = []
            for block in self.blocks:
                x_BTD, _, aux = _run_block(block, x_BTD, segment_ids_BT, remat)
                if aux is not None:
                    auxes.append(aux)
            return x_BTD, auxes
        graphdef, state = nnx.split(self.blocks)

        def body(x, st):
            auxes = []
            for block in nnx.merge(graphdef, st):
                x, _, aux = _run_block(block, x, segment_ids_BT, remat)
                if aux is not None:
                    auxes.append(aux)
            return x, auxes

        x_BTD, stacked_aux = jax.lax.scan(body, x_BTD, state)  # leaves [R, ...]
        auxes = [
            jax.tree.map(lambda a, r=r: a[r], aux)
            for r in range(self.repeats)
            for aux in stacked_aux
        ]
        return x_BTD, auxes

    def layer_blocks(self) -> Iterator[tuple[int, Block]]:
        """(layer index, Block) in layer order; stacked parameters are sliced per repeat."""
        u = len(self.unit)
        if self.repeats == 1:
            for j, block in enumerate(self.blocks):
                yield self.start + j, block
            return
        graphdef, state = nnx.split(self.blocks)
        for r in range(self.repeats):
            blocks = nnx.merge(graphdef, jax.tree.map(lambda a, r=r: a[r], state))
            for j, block in enumerate(blocks):
                yield self.start + r * u + j, block


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
                    BlockGroup(seg, blocks[seg.start : seg.start + seg.repeats * len(seg.unit)])
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
    def hidden_states(self, input_ids_BT, segment_ids_BT=None, cache=None, return_aux=False):
        """Final normalised hidden states [B, T, D] (before lm_head), the updated cache, and (with
        `return_aux`) the MoE statistics:
        {"expert_counts": [n_moe_layers, E], "aux_loss": scalar}."""
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
        new_cache, auxes = None, []  # auxes: the MoE layers' statistics, in layer order
        if cache is not None:
            new_cache = []
            for i, block in self.layer_blocks():
                x, layer_cache, aux = block(x, segment_ids_BT, cache[i])
                new_cache.append(layer_cache)
                auxes += [] if aux is None else [aux]
        elif cfg.scan_layers:
            for group in self.segments:
                x, group_auxes = group(x, segment_ids_BT, cfg.remat)
                auxes += group_auxes
        else:
            for block in self.layers:
                x, _, aux = _run_block(block, x, segment_ids_BT, cfg.remat)
                auxes += [] if aux is None else [aux]
        h = self.norm_f(x)
        if not return_aux:
            return h, new_cache
        counts = [aux["expert_counts"] for aux in auxes]
        aux_loss = jnp.zeros((), jnp.float32)
        for aux in auxes:  # summed in layer order
            aux_loss = aux_loss + aux.get("aux_loss", 0.0)
        stats = {
            "expert_counts": jnp.stack(counts) if counts else jnp.zeros((0, cfg.n_routed_experts)),
            "aux_loss": aux_loss,
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
