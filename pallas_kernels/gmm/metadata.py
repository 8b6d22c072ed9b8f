"""Group -> tile metadata for the grouped-matmul kernels (passed by scalar prefetch).

The kernels walk a 1-D list of *visits*. A visit is a pair (group g, row tile t)
such that group g has rows inside row tile t (rows [t*tm, (t+1)*tm)). Visits are
ordered by group, then by tile; since groups own consecutive row ranges, the
tile index never decreases along the list, so all visits to one output tile
are consecutive (which the TPU pipeline needs: a block stays resident while
its index does not change).

* gmm:  a tile shared by two groups is visited twice, each visit writing only
  its own rows. Empty groups get no visit. Rows after the last group form a
  *tail* pseudo-group with id G: its visits skip the matmul and write zeros, so
  `sum(group_sizes) < M` needs no extra pass over the output.
* tgmm: every real group gets at least one visit (an empty group gets one
  visit that stores zeros), because every [K, N] output slab must be written.

Bound: non-empty groups span at most tiles_m + (#groups - 1) visits, empty
groups (tgmm) add one each, so tiles_m + G visits always suffice. That is the
static length of the arrays; the number actually used is `num_visits` and
becomes the (dynamic) grid extent.
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp

from pallas_kernels.gmm.reference import group_boundaries


class GroupMetadata(NamedTuple):
    """Scalar-prefetch operands of the kernels.

    offsets: [G + 2] int32. Group g owns rows [offsets[g], offsets[g+1]); the tail
      pseudo-group G owns [offsets[G], offsets[G+1] = M).
    group_ids: [V] int32, group of each visit (G = tail, only in gmm).
    m_tile_ids: [V] int32, row tile of each visit.
    num_visits: [] int32, how many leading entries of the lists are used.
    """

    offsets: jax.Array
    group_ids: jax.Array
    m_tile_ids: jax.Array
    num_visits: jax.Array


def cdiv(a: int, b: int) -> int:
    return -(-a // b)


def make_group_metadata(
    group_sizes_G: jax.Array, *, m: int, tm: int, for_tgmm: bool
) -> GroupMetadata:
    """Builds the visit list for `m` rows tiled by `tm` (see the module docstring)."""
    num_groups = group_sizes_G.shape[0]
    tiles_m = cdiv(m, tm)
    starts_G, ends_G = group_boundaries(group_sizes_G, m)
    offsets = jnp.concatenate([starts_G, ends_G[-1:], jnp.full((1,), m, jnp.int32)])
    if for_tgmm:  # real groups only; empty groups still get one visit
        starts, ends = starts_G, ends_G
    else:  # real groups + the tail pseudo-group
        starts, ends = offsets[:-1], offsets[1:]
    sizes = ends - starts
    first_tile = jnp.minimum(starts // tm, tiles_m - 1)
    last_tile = (ends - 1) // tm
    visits = jnp.where(sizes > 0, last_tile - first_tile + 1, 1 if for_tgmm else 0)

    visit_ends = jnp.cumsum(visits).astype(jnp.int32)
    num_visits = visit_ends[-1]
    length = tiles_m + num_groups
    v = jnp.arange(length, dtype=jnp.int32)
    group_ids = jnp.searchsorted(visit_ends, v, side="right").astype(jnp.int32)
    group_ids = jnp.minimum(group_ids, starts.shape[0] - 1)  # unused trailing entries
    local = v - (visit_ends - visits)[group_ids]
    m_tile_ids = jnp.clip(first_tile[group_ids] + local, 0, tiles_m - 1).astype(jnp.int32)
    return GroupMetadata(offsets, group_ids, m_tile_ids, num_visits)
