"""Tile sizes (tm, tk, tn) for the grouped-matmul kernels.

`tm` tiles the rows (tokens), `tk` the contraction, `tn` the output columns.
Per-generation maxima are chosen so that the double-buffered bf16 input blocks,
the output block and the fp32 accumulator fit the default scoped VMEM limit of
that chip (16 MiB on v4/v5e/v5p, 32 MiB on v6e and later). They are not tuned
on hardware yet; pass `tiling=` to override.

`tm` adapts to the average group size: every group boundary inside a row tile
costs one extra (partially wasted) tile visit, so with many small groups a
smaller `tm` wastes less. It never goes below 128 (one MXU pass) on TPU.
"""

from __future__ import annotations

import re

import jax

# generation -> (tm_max, tk, tn). VMEM at bf16, double-buffered inputs/outputs:
# 2*(tm*tk + tk*tn)*2 B + 2*tm*tn*2 B + tm*tn*4 B.
_TPU_TILES = {
    4: (512, 512, 512),  # ~4.5 MiB of 16 MiB
    5: (512, 1024, 512),  # v5e/v5p: ~7 MiB of 16 MiB
    6: (512, 1024, 1024),  # v6e: ~10 MiB of 32 MiB; 256-wide MXU
    7: (512, 1024, 1024),
}
_INTERPRET_TILES = (256, 1024, 1024)  # interpret mode: each grid step costs ~ms, so few, big ones
_MIN_TM_TPU = 128


def tpu_generation() -> int | None:
    """The TPU generation of the default device ("TPU v5 lite" -> 5, "TPU7x" -> 7), else None."""
    device = jax.devices()[0]
    if device.platform != "tpu":
        return None
    match = re.match(r"TPU\s*v?(\d+)", device.device_kind)
    return int(match.group(1)) if match else None


def _pow2_at_least(x: int) -> int:
    return 1 << max(0, (x - 1).bit_length())


def _fit(dim: int, tile: int) -> int:
    """A tile for `dim`: the full dim if it fits, else a multiple of 128 in [tile/2, tile]
    that divides dim (no ragged last tile) when there is one, else `tile`."""
    if dim <= tile:
        return dim
    for cand in range(tile, tile // 2 - 1, -128):
        if cand > 0 and cand % 128 == 0 and dim % cand == 0:
            return cand
    return tile


def default_tiling(
    m: int, k: int, n: int, num_groups: int, *, native: bool, generation: int | None = None
) -> tuple[int, int, int]:
    """Default (tm, tk, tn) for an [m, k] x [G, k, n] grouped matmul (see module docstring).

    `native=False` gives the interpret-mode tiles; for native, `generation` (TPU v4 -> 4,
    ...) defaults to the attached chip's.
    """
    if native and generation is None:
        generation = tpu_generation()
    if not native:
        generation = None
    if generation is None:
        tm_max, tk, tn = _INTERPRET_TILES
        tm_min = 8
    else:
        tm_max, tk, tn = _TPU_TILES[min(max(generation, 4), 7)]
        tm_min = _MIN_TM_TPU
    tm = min(tm_max, max(tm_min, _pow2_at_least(-(-m // max(num_groups, 1)))))
    return min(m, tm), _fit(k, tk), _fit(n, tn)


def resolve_tiling(
    tiling, m: int, k: int, n: int, num_groups: int, *, native: bool
) -> tuple[int, int, int]:
    """`tiling` (None or a 3-tuple of positive ints) clamped to the problem dims."""
    if tiling is None:
        return default_tiling(m, k, n, num_groups, native=native)
    if (
        not isinstance(tiling, (tuple, list))
        or len(tiling) != 3
        or not all(isinstance(t, int) and t > 0 for t in tiling)
    ):
        raise ValueError(
            f"gmm: tiling must be None or 3 positive ints (tm, tk, tn), got {tiling!r}"
        )
    tm, tk, tn = tiling
    return min(tm, m), min(tk, k), min(tn, n)
