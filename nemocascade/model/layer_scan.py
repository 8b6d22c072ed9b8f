"""Scan over layers (`ModelConfig.scan_layers=True`): the block pattern as a few `lax.scan` bodies.

`layer_segments` cuts the pattern into segments. A segment is `repeats` copies of a unit of block
kinds (pattern letters), optionally with one unit position that only some copies have: the
52-layer Nemotron-3-Nano pattern is 23 copies of `M*E` whose attention block is present in 6 of
them, one segment with three block bodies (the scan body runs the attention block under
`lax.cond` on the copy's flag). A segment with repeats >= 2 keeps each unit position's parameters
stacked on a leading logical axis "layers" (the optional position stacked over the copies that
have it, read by a dynamic index inside the body) and runs as one `lax.scan` (remat per block
inside the body, as unrolled); a segment with one repeat runs unrolled.

The numbers are those of the unrolled model: the same initial parameters (blocks are built in
layer order from the same rngs, then stacked), the same MoE statistics in layer order, the same
Hugging Face tensors (`layer_location` maps a layer to its stacked row). Compile time grows with
the number of distinct block bodies: 3 for the 52 layers here, against 14 when each repeated
run of a unit is its own scan and 52 unrolled (benchmarks/compile_time.py).
"""

from __future__ import annotations

import functools
from collections.abc import Iterator
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from nemocascade.model.block import Block, run_block
from nemocascade.model.config import ModelConfig
from nemocascade.model.moe_balance import ExpertBias

LAYER_AXIS = "layers"  # logical axis of the repeats of a scanned segment (sharding.LOGICAL_RULES)
MAX_GAPPED_UNIT = 8  # longest unit searched for a segment with an optional position


class Segment(NamedTuple):
    """Layers from `start`: `repeats` copies of `unit` (pattern letters) in a row. When
    `optional` is a unit position, copy r has that block only if `present[r]`."""

    start: int
    unit: str
    repeats: int
    optional: int | None = None
    present: tuple[bool, ...] = ()

    def layers(self) -> list[tuple[int, int, int]]:
        """(layer, unit position j, row of j's stacked parameters) in layer order."""
        out, layer, rows = [], self.start, [0] * len(self.unit)
        for r in range(self.repeats):
            for j in range(len(self.unit)):
                if j == self.optional and not self.present[r]:
                    continue
                out.append((layer, j, rows[j]))
                layer, rows[j] = layer + 1, rows[j] + 1
        return out

    @property
    def num_layers(self) -> int:
        return len(self.unit) * self.repeats - self.present.count(False)

    def rows(self, j: int) -> int:
        """How many layers unit position j holds (its stacked axis when repeats >= 2)."""
        return sum(self.present) if j == self.optional else self.repeats

    @property
    def letters(self) -> str:
        """The segment's part of the pattern."""
        return "".join(self.unit[j] for _, j, _ in self.layers())


def _plain_run(pattern: str, unit: str, s: int, hi: int) -> Segment | None:
    r = 1
    while (
        s + (r + 1) * len(unit) <= hi
        and pattern[s + r * len(unit) : s + (r + 1) * len(unit)] == unit
    ):
        r += 1
    return Segment(s, unit, r) if r >= 2 else None


def _gapped_run(pattern: str, unit: str, opt: int, s: int, hi: int) -> Segment | None:
    """Greedy parse of copies of `unit` from s, unit[opt] taken when the next letter is it."""
    pos, present = s, []
    while True:
        p, has = pos, False
        for j, c in enumerate(unit):
            if p < hi and pattern[p] == c:
                p, has = p + 1, has or j == opt
            elif j != opt:
                break
        else:
            pos = p
            present.append(has)
            continue
        break
    if len(present) < 2 or all(present) or not any(present):
        return None  # a plain run (or none) covers it
    return Segment(s, unit, len(present), opt, tuple(present))


def _run_key(run: Segment) -> tuple:
    """The most block bodies saved (layers covered - bodies compiled), then the shortest unit,
    then no optional position, then the earliest start."""
    return (run.num_layers - len(run.unit), -len(run.unit), run.optional is None, -run.start)


@functools.lru_cache(maxsize=64)
def layer_segments(pattern: str) -> tuple[Segment, ...]:
    """Cuts a block pattern into segments, deterministically:

    In the span [lo, hi) (first the whole pattern) choose the run with repeats >= 2 that saves
    the most block bodies (layers covered minus the unit's length): copies of a unit, or copies
    of a unit (at most MAX_GAPPED_UNIT letters) one of whose positions only some copies have
    (not an MoE position: its statistics are per layer; the optional letter differs from the
    one after it, so the parse is unique). Among equals the shortest unit, then a run without
    an optional position, then the earliest start, then the first unit in sorted order. Then
    cut the spans left and right of it the same way. A span with no repeat left is one segment
    with repeats 1 (run unrolled). The 52-layer Nemotron-3-Nano pattern is one segment: 23
    copies of M*E, the attention in 6 of them.
    """

    def best_run(lo: int, hi: int) -> Segment | None:
        runs = [  # copies of a unit
            _plain_run(pattern, pattern[s : s + u], s, hi)
            for u in range(1, (hi - lo) // 2 + 1)
            for s in range(lo, hi - 2 * u + 1)
        ]
        units = {
            pattern[t : t + u] for u in range(2, MAX_GAPPED_UNIT + 1) for t in range(lo, hi - u + 1)
        }
        runs += [  # copies of a unit with an optional position
            _gapped_run(pattern, unit, j, s, hi)
            for unit in sorted(units)  # sorted: ties go to the first run, on any machine
            for j in range(len(unit))
            if unit[j] != "E" and unit[j] != unit[(j + 1) % len(unit)]
            for s in range(lo, hi - 2)
        ]
        return max((r for r in runs if r is not None), key=_run_key, default=None)

    def cut(lo: int, hi: int) -> list[Segment]:
        if lo >= hi:
            return []
        run = best_run(lo, hi)
        if run is None:
            return [Segment(lo, pattern[lo:hi], 1)]
        return cut(lo, run.start) + [run] + cut(run.start + run.num_layers, hi)

    return tuple(cut(0, len(pattern)))


def layer_location(cfg: ModelConfig, layer: int) -> tuple[tuple, int | None]:
    """Where layer `layer`'s block lives in the model's state: (path, row). Unrolled:
    (("layers", i), None). Scanned: (("segments", s, "blocks", j), r) with r the row on the
    leading stacked axis, or None when the segment has one repeat (no stacked axis)."""
    if not 0 <= layer < cfg.num_layers:
        raise IndexError(f"layer {layer} not in [0, {cfg.num_layers})")
    if not cfg.scan_layers:
        return ("layers", layer), None
    for s, seg in enumerate(layer_segments(cfg.pattern)):
        if layer < seg.start + seg.num_layers:
            _, j, row = seg.layers()[layer - seg.start]
            return ("segments", s, "blocks", j), (row if seg.repeats > 1 else None)
    raise AssertionError("unreachable: the segments cover the pattern")


def _stack_variables(variables: list[nnx.Variable], layer_ids: tuple[int, ...], stack: bool):
    """One Variable for the same parameter of several layers: with `stack`, values stacked on a
    new leading axis named LAYER_AXIS (else the single layer's Variable as it is). ExpertBias
    variables record the layers of their rows (`layer_ids` metadata, read by
    `moe_balance.update_model_biases`)."""
    first = variables[0]
    meta = dict(first.get_metadata())
    if stack:
        value = jnp.stack([v.get_value() for v in variables])
        meta["axes"] = (LAYER_AXIS,) + tuple(meta.get("axes") or (None,) * (value.ndim - 1))
    else:
        value = first.get_value()
    if isinstance(first, ExpertBias):
        meta["layer_ids"] = tuple(layer_ids)
    return type(first)(value, **meta)


def _rows(state, row):
    return jax.tree.map(lambda a: a[row], state)


class BlockGroup(nnx.Module):
    """One `Segment` of a scanned model: `blocks[j]` is the unit's j-th block with its parameters
    stacked over the layers at that position (leading axis LAYER_AXIS; none when repeats == 1)."""

    def __init__(self, segment: Segment, layer_blocks: list[Block]):
        layers = segment.layers()
        if len(layer_blocks) != len(layers):
            raise ValueError(f"segment {segment}: {len(layer_blocks)} blocks, want {len(layers)}")
        self.segment = segment
        stacked = []
        for j in range(len(segment.unit)):
            at_j = [(layer, i) for i, (layer, jj, _) in enumerate(layers) if jj == j]
            parts = [nnx.split(layer_blocks[i]) for _, i in at_j]
            graphdef = parts[0][0]
            if any(g != graphdef for g, _ in parts):
                raise ValueError(f"segment {segment}: unit position {j} differs between repeats")
            ids = tuple(layer for layer, _ in at_j)
            state = jax.tree.map(
                lambda *vs, ids=ids: _stack_variables(list(vs), ids, segment.repeats > 1),
                *[st for _, st in parts],
                is_leaf=lambda x: isinstance(x, nnx.Variable),
            )
            stacked.append(nnx.merge(graphdef, state))
        self.blocks = nnx.List(stacked)

    def __call__(self, x_BTD, segment_ids_BT, remat: str, routes=None):
        """Returns (x_BTD, per-MoE-layer aux dicts in layer order). `routes`: None, or the
        experts to replay for the segment's MoE layers in layer order ([n_moe, B, T, K])."""
        seg = self.segment
        if seg.repeats == 1:
            auxes = []
            for block in self.blocks:
                moe = routes is not None and block.kind == "moe"
                replay = routes[len(auxes)] if moe else None
                x_BTD, _, aux = run_block(block, x_BTD, segment_ids_BT, remat, replay)
                if aux is not None:
                    auxes.append(aux)
            return x_BTD, auxes
        parts = [nnx.split(b) for b in self.blocks]
        scanned = [st for j, (_, st) in enumerate(parts) if j != seg.optional]
        moe_at = [j for j, b in enumerate(self.blocks) if b.kind == "moe"]
        if routes is not None:  # [R, B, T, K] per MoE unit position (MoE is never optional)
            per_copy = routes.reshape((seg.repeats, len(moe_at)) + routes.shape[1:])
            routes = [per_copy[:, m] for m in range(len(moe_at))]
        xs = (scanned, routes)
        if seg.optional is not None:  # its flag and its row (of the copies that have it) per copy
            present = np.asarray(seg.present)
            rows = np.maximum(np.cumsum(present) - 1, 0).astype(np.int32)
            xs += (jnp.asarray(present), jnp.asarray(rows))

        def optional_block(x, present, row):
            graphdef, state = parts[seg.optional]

            def run(x, st):
                return run_block(nnx.merge(graphdef, st), x, segment_ids_BT, remat)[0]

            state = jax.tree.map(lambda a: jax.lax.dynamic_index_in_dim(a, row, 0, False), state)
            return jax.lax.cond(present, run, lambda x, st: x, x, state)

        def body(x, xs):
            states, auxes = list(xs[0]), []
            for j, (graphdef, _) in enumerate(parts):
                if j == seg.optional:
                    x = optional_block(x, *xs[2:])
                    continue
                replay = xs[1][moe_at.index(j)] if xs[1] is not None and j in moe_at else None
                block = nnx.merge(graphdef, states.pop(0))
                x, _, aux = run_block(block, x, segment_ids_BT, remat, replay)
                if aux is not None:
                    auxes.append(aux)
            return x, auxes

        x_BTD, stacked_aux = jax.lax.scan(body, x_BTD, xs)  # leaves [R, ...]
        auxes = [_rows(aux, r) for r in range(seg.repeats) for aux in stacked_aux]
        return x_BTD, auxes

    def layer_blocks(self) -> Iterator[tuple[int, Block]]:
        """(layer index, Block) in layer order; stacked parameters are sliced per layer."""
        if self.segment.repeats == 1:
            yield from enumerate(self.blocks, start=self.segment.start)
            return
        parts = [nnx.split(b) for b in self.blocks]
        for layer, j, row in self.segment.layers():
            graphdef, state = parts[j]
            yield layer, nnx.merge(graphdef, _rows(state, row))
