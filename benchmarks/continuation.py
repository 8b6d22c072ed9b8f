"""Continuing a cached conversation vs re-prefilling it, for multi-turn rollouts (`rl.episodes`).

    python benchmarks/continuation.py                        # tiny, contexts 1K and 4K (~2 min)
    python benchmarks/continuation.py --configs tiny small   # also the 98.8M model (slow on CPU)

After a turn, an episode's conversation (context C tokens) grows by N new tokens (the model's
last token, the tool results, the template). Two ways to get the logits of the next token:

    continue    `slots.extend` runs only the N new tokens on top of the slot's cached state
                (KV rows of the attention layers, conv + SSM states of the Mamba layers), what
                `rl.episodes` does;
    re-prefill  all C + N tokens again from an empty cache (what a driver without continuation
                would run every turn), through the same `slots.extend` (power-of-two pieces:
                1024 + 16, ...), so both sides run the same compiled programs and the difference
                is only the work.

Measured: wall seconds of each (compiles excluded: a warm-up call per shape), median of
`--repeats`; the continuation starts from a copy of the cached context made outside the timing.
`per_new_token_ms` = continue / N: the continuation's cost grows with N (a fixed dispatch
overhead aside) and, through attention over the cached positions, linearly with C per new token,
while the re-prefill's grows with C + N tokens and quadratically with C in attention;
`speedup` = re-prefill / continue. Models: `tiny` (default) and `small` (98.8M parameters),
random weights, fp32, CPU, batch 1. Writes benchmarks/results/continuation.json.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from results_io import write_result

from nemocascade.generate import slots as sl
from nemocascade.model import ModelConfig, NemotronH

RESULTS = Path(__file__).resolve().parent / "results" / "continuation.json"
CONFIGS = {
    "tiny": lambda: ModelConfig.tiny(moe_backend="sorted"),
    "small": lambda: ModelConfig.small(moe_backend="sorted"),
}


def _timed(fn, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        args = fn.prepare() if hasattr(fn, "prepare") else ()
        t0 = time.perf_counter()
        jax.block_until_ready(fn(*args))
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


class _Extend:
    """Times `slots.extend` of `ids` on a copy of the cache `base` (made before the clock)."""

    def __init__(self, parts, base, ids):
        self.parts, self.base, self.ids = parts, base, ids

    def prepare(self):
        return (jax.block_until_ready(jax.tree.map(jnp.copy, self.base)),)

    def __call__(self, cache):
        return sl.extend(self.parts, cache, [0], self.ids)[0]


def bench_config(name: str, contexts, news, repeats: int) -> dict:
    cfg = CONFIGS[name]()
    model = NemotronH(cfg, rngs=nnx.Rngs(0))
    graphdef, state = nnx.split(model)
    parts = (graphdef, state)
    rng = np.random.default_rng(0)
    out = {"params_m": sum(x.size for x in jax.tree.leaves(state)) / 1e6, "contexts": {}}
    for c in contexts:
        length = c + max(news)
        ids = rng.integers(3, cfg.vocab_size, (1, length)).astype(np.int32)
        empty = sl.init_slots(model, 1, length)
        _, base = sl.extend(parts, jax.tree.map(jnp.copy, empty), [0], ids[:, :c])  # context
        rows = {}
        for n in news:
            cont = _Extend(parts, base, ids[:, c : c + n])
            reprefill = _Extend(parts, empty, ids[:, : c + n])
            _timed(cont, 1)  # compiles
            _timed(reprefill, 1)
            t_cont = _timed(cont, repeats)
            t_full = _timed(reprefill, repeats)
            rows[str(n)] = {
                "continue_s": t_cont,
                "reprefill_s": t_full,
                "speedup": t_full / t_cont,
                "per_new_token_ms": 1e3 * t_cont / n,
            }
            print(
                f"{name} C={c} N={n}: continue {t_cont * 1e3:.1f} ms, re-prefill "
                f"{t_full * 1e3:.1f} ms ({t_full / t_cont:.1f}x)",
                flush=True,
            )
        out["contexts"][str(c)] = rows
    return out


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--configs", nargs="+", default=["tiny"], choices=sorted(CONFIGS))
    ap.add_argument("--contexts", type=int, nargs="+", default=[1024, 4096])
    ap.add_argument("--new", type=int, nargs="+", default=[16, 64, 256])
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--json", type=Path, default=RESULTS)
    args = ap.parse_args(argv)
    result = {
        "backend": jax.default_backend(),
        "repeats": args.repeats,
        "configs": {
            name: bench_config(name, args.contexts, args.new, args.repeats) for name in args.configs
        },
    }
    write_result(result, args.json)
    return result


if __name__ == "__main__":
    main()
