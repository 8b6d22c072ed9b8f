"""Compiled temporary memory of naive vs chunked large-vocabulary losses (value + gradient).

    python benchmarks/logprob_memory.py            # V=131072, tokens 8x4096, hidden 2688
    python benchmarks/logprob_memory.py --quick    # same shape, the `logprob` case only
    python benchmarks/logprob_memory.py --chunk=2048 --dtype=float32

Nothing is executed: each function is `jax.jit(...).lower(ShapeDtypeStructs).compile()` and the
table reports `memory_analysis().temp_size_in_bytes` (XLA's peak scratch for the program,
excluding arguments and outputs). Every case differentiates w.r.t. the hidden states and the
lm_head weight, so both include the `[D, V]` fp32 gradient accumulation.

Cases: `logprob` = sum of masked target log-probs (the GRPO / MOPD loss core), `logprob+entropy`,
and `reverse_kl` = full-vocabulary KL(student || teacher) with a second `[D, V]` head. Writes
benchmarks/results/logprob_memory.json. `run(quick)` is what `benchmarks/run_all.py` calls; its
`logprob_peak_memory_reduction` is naive / chunked temp memory of the `logprob` case.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import jax
import jax.numpy as jnp

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from nemocascade.train import losses

RESULTS = Path(__file__).resolve().parent / "results" / "logprob_memory.json"
SHAPE = {"batch": 8, "seq": 4096, "hidden": 2688, "vocab": 131072}


def _cases(chunk: int):
    """name -> (naive loss fn, chunked loss fn, needs_teacher)."""

    def lp_naive(h, w, t, m):
        return jnp.sum(losses.naive_logprobs_and_entropy(h, w, t)[0] * m)

    def lp_chunk(h, w, t, m):
        return jnp.sum(losses.token_logprobs(h, w, t, chunk_size=chunk) * m)

    def ent_naive(h, w, t, m):
        lp, ent = losses.naive_logprobs_and_entropy(h, w, t)
        return jnp.sum((lp + 0.01 * ent) * m)

    def ent_chunk(h, w, t, m):
        lp, ent = losses.token_logprobs_and_entropy(h, w, t, chunk_size=chunk)
        return jnp.sum((lp + 0.01 * ent) * m)

    def kl_naive(h, w, ht, wt, m):
        return jnp.sum(losses.naive_reverse_kl(h, w, ht, wt) * m)

    def kl_chunk(h, w, ht, wt, m):
        return jnp.sum(losses.reverse_kl_per_token(h, w, ht, wt, chunk_size=chunk) * m)

    return {
        "logprob": (lp_naive, lp_chunk, False),
        "logprob+entropy": (ent_naive, ent_chunk, False),
        "reverse_kl": (kl_naive, kl_chunk, True),
    }


def _temp_bytes(fn, args) -> tuple[int, float]:
    t0 = time.perf_counter()
    compiled = jax.jit(jax.value_and_grad(fn, argnums=(0, 1))).lower(*args).compile()
    mem = compiled.memory_analysis()
    return int(mem.temp_size_in_bytes), time.perf_counter() - t0


def measure(shape: dict, *, chunk: int, dtype: str, cases: list[str] | None = None) -> dict:
    B, T, D, V = (shape[k] for k in ("batch", "seq", "hidden", "vocab"))
    dt = jnp.dtype(dtype)
    h = jax.ShapeDtypeStruct((B, T, D), dt)
    w = jax.ShapeDtypeStruct((D, V), dt)
    t = jax.ShapeDtypeStruct((B, T), jnp.int32)
    m = jax.ShapeDtypeStruct((B, T), jnp.float32)
    rows = {}
    for name, (naive, chunked, teacher) in _cases(chunk).items():
        if cases and name not in cases:
            continue
        args = (h, w, h, w, m) if teacher else (h, w, t, m)
        naive_b, naive_s = _temp_bytes(naive, args)
        chunk_b, chunk_s = _temp_bytes(chunked, args)
        rows[name] = {
            "naive_temp_bytes": naive_b,
            "chunked_temp_bytes": chunk_b,
            "reduction": naive_b / max(chunk_b, 1),
            "compile_s": round(naive_s + chunk_s, 2),
        }
    return {
        "shape": shape,
        "chunk_size": chunk,
        "dtype": dtype,
        "backend": jax.default_backend(),
        "cases": rows,
    }


def _print(result: dict) -> None:
    s = result["shape"]
    print(
        f"B x T = {s['batch']} x {s['seq']}, D = {s['hidden']}, V = {s['vocab']}, "
        f"chunk = {result['chunk_size']}, {result['dtype']} on {result['backend']}"
    )
    print(f"{'case':<18}{'naive GiB':>12}{'chunked GiB':>14}{'reduction':>12}")
    for name, r in result["cases"].items():
        print(
            f"{name:<18}{r['naive_temp_bytes'] / 2**30:>12.2f}"
            f"{r['chunked_temp_bytes'] / 2**30:>14.2f}{r['reduction']:>11.1f}x"
        )


def run(quick: bool = True, chunk: int = 1024, dtype: str = "bfloat16", write: bool = True) -> dict:
    """Measure, print, write the JSON; returns it with `logprob_peak_memory_reduction` added."""
    result = measure(SHAPE, chunk=chunk, dtype=dtype, cases=["logprob"] if quick else None)
    result["logprob_peak_memory_reduction"] = result["cases"]["logprob"]["reduction"]
    _print(result)
    if write:
        RESULTS.parent.mkdir(parents=True, exist_ok=True)
        RESULTS.write_text(json.dumps(result, indent=2) + "\n")
    return result


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--chunk", type=int, default=1024)
    ap.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float32"])
    args = ap.parse_args(argv)
    run(quick=args.quick, chunk=args.chunk, dtype=args.dtype)


if __name__ == "__main__":
    main()
