"""Continuous batching vs the static engine at equal memory, on long-tailed rollout lengths.

    python benchmarks/continuous_batching.py           # tiny and small, 128 rows, <= 256 tokens
    python benchmarks/continuous_batching.py --quick   # tiny and small, 64 rows, <= 128 tokens
    python benchmarks/continuous_batching.py --sweep   # also chunk_steps x refill_at on tiny

Equal memory: both engines hold B rows' caches. The static engine generates the R rows in R/B
consecutive `generate` calls of B prompts (each decodes until its longest row has finished); the
continuous engine makes one call with `slots=B` (a finished row's slot takes the next row).

Lengths: row r's length L_r is drawn from a log-normal (median `--median`, sigma `--sigma`),
capped at `max_new`, and forced by a per-prompt token budget (`max_new_tokens=[L_0, L_1, ...]`):
on device a row at its budget finishes ("length") exactly as one that samples its eos, in both
engines, so both do the same work (checked: same `.lengths`, same tokens; decoding is greedy).
A stop-id rule was tried first and rejected: random-weight models send all greedy rows along the
same token trajectories (the next token is mostly a function of the current one), so a stop set
made of each row's token at its target length cut the rows to a mean of 14 tokens instead of 52
(max 50 of 128); with sampling the rows stay apart, but a row's key folds its index within the
call, so the static engine's batches of B would not sample the continuous run's tokens.

Measured: new tokens / s = sum of generated lengths / wall time of the whole generation
(prefills + decode, compiles excluded: one untimed warm-up run per engine on the same inputs, so
every program the timed runs use is compiled), median of `--repeats` interleaved repetitions
(`speedup`; `speedup_best_times` from the fastest of each). `continuous_batching_speedup` is
`speedup` on the mid-size config (`small`; tiny when only tiny runs), in `--quick` too: a tiny
decode step takes ~0.4 ms on a CPU, so there the ~2-4 ms of a refill round (a host round trip,
two dispatches and the prompts' prefill) weighs like ten steps, a regime no real model is in
(a `small` step: ~40-70 ms). `decode_step_ratio` =
static / continuous decode steps (batched model calls) is the part that does not depend on the
machine's load; `packed_steps` is the floor (every slot busy every step). Models: `tiny` and
`small` (98.8M parameters), random weights, MoE backend `sorted`, fp32, CPU. Writes
benchmarks/results/continuous_batching.json; `run(quick)` is what `benchmarks/run_all.py` can
call.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from pathlib import Path

import jax
import numpy as np
from flax import nnx

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from results_io import write_result

from nemocascade.generate import generate
from nemocascade.generate.continuous import CHUNK_STEPS
from nemocascade.model import ModelConfig, NemotronH

RESULTS = Path(__file__).resolve().parent / "results" / "continuous_batching.json"
CONFIGS = {
    "tiny": lambda: ModelConfig.tiny(moe_backend="sorted"),
    "small": lambda: ModelConfig.small(moe_backend="sorted"),
}


def target_lengths(rng, rows: int, median: float, sigma: float, max_new: int) -> np.ndarray:
    """[rows] lengths from a log-normal(log(median), sigma), rounded, in [1, max_new]."""
    raw = np.exp(rng.normal(np.log(median), sigma, rows))
    return np.clip(np.round(raw), 1, max_new).astype(np.int64)


def _stats(x: np.ndarray) -> dict:
    return {
        "mean": float(np.mean(x)),
        "median": float(np.median(x)),
        "p90": float(np.percentile(x, 90)),
        "max": int(np.max(x)),
    }


def run_static(model, prompts, budgets, *, batch: int):
    """The R rows in consecutive static calls of `batch` prompts; returns (tokens [R, max] in
    one array, lengths, wall seconds, decode steps)."""
    toks = np.zeros((len(prompts), int(max(budgets))), np.int32)
    lengths, steps = [], 0
    t0 = time.perf_counter()
    for i in range(0, len(prompts), batch):
        res = generate(model, prompts[i : i + batch], max_new_tokens=budgets[i : i + batch])
        toks[i : i + batch, : res.tokens.shape[1]] = res.tokens
        lengths.append(res.lengths)
        steps += res.timings["decode_steps"]
    return toks, np.concatenate(lengths), time.perf_counter() - t0, steps


def run_continuous(model, prompts, budgets, *, slots: int, chunk_steps, refill_at):
    t0 = time.perf_counter()
    res = generate(
        model,
        prompts,
        max_new_tokens=budgets,
        slots=slots,
        chunk_steps=chunk_steps,
        refill_at=refill_at,
    )
    return res, time.perf_counter() - t0


def bench_config(
    name: str,
    *,
    rows: int,
    batch: int,
    max_new: int,
    median: float,
    sigma: float,
    repeats: int,
    chunk_steps: int,
    refill_at: int | None,
    sweep: bool,
    seed: int = 0,
) -> dict:
    cfg = CONFIGS[name]()
    model = NemotronH(cfg, rngs=nnx.Rngs(seed))
    rng = np.random.default_rng(seed)
    prompts = [rng.integers(3, cfg.vocab_size, rng.integers(8, 33)).tolist() for _ in range(rows)]
    targets = target_lengths(rng, rows, median, sigma, max_new).tolist()
    print(f"[{name}] lengths {_stats(np.array(targets))}", flush=True)

    def static():
        return run_static(model, prompts, targets, batch=batch)

    def cont(k=chunk_steps, at=refill_at):
        return run_continuous(model, prompts, targets, slots=batch, chunk_steps=k, refill_at=at)

    t0 = time.perf_counter()
    st_toks, st_len, _, _ = static()  # warm-up: compiles the static programs
    warm, _ = cont()  # compiles the continuous programs this input needs
    warmup_s = time.perf_counter() - t0
    static_s, cont_s, last = [], [], None
    for _ in range(repeats):  # interleaved
        _, _, s, static_steps = static()
        static_s.append(s)
        last, c = cont()
        cont_s.append(c)
        print(f"[{name}] static {s:.2f}s  continuous {c:.2f}s", flush=True)
    tokens = int(st_len.sum())
    static_tps = tokens / statistics.median(static_s)
    cont_tps = tokens / statistics.median(cont_s)
    cont_steps = last.timings["decode_steps"]
    result = {
        "config": name,
        "rows": rows,
        "batch_equals_slots": batch,
        "max_new_tokens": max_new,
        "lognormal": {"median": median, "sigma": sigma},
        "lengths": _stats(st_len),
        "generated_tokens": tokens,
        "lengths_as_drawn": bool(np.array_equal(st_len, targets)),
        "same_lengths": bool(np.array_equal(last.lengths, st_len)),
        "same_tokens": bool(np.array_equal(last.tokens, st_toks)),
        "static": {
            "seconds": static_s,
            "tokens_per_s": static_tps,
            "decode_steps": static_steps,
        },
        "continuous": {
            "seconds": cont_s,
            "tokens_per_s": cont_tps,
            "chunk_steps": chunk_steps,
            "refill_at": refill_at,
            "timings": last.timings,
        },
        "packed_steps": int(np.ceil((tokens - rows) / batch)),
        "decode_step_ratio": static_steps / cont_steps,
        "speedup": cont_tps / static_tps,
        "speedup_best_times": min(static_s) / min(cont_s),
        "warmup_s": warmup_s,
        "warm_continuous_timings": warm.timings,
    }
    print(
        f"[{name}] static {static_tps:.1f} tok/s ({static_steps} steps), continuous "
        f"{cont_tps:.1f} tok/s ({last.timings['decode_steps']} steps, "
        f"{last.timings['chunks']} chunks, utilization {last.timings['slot_utilization']:.2f})"
        f" -> {result['speedup']:.2f}x",
        flush=True,
    )
    if sweep:
        result["sweep"] = []
        for k in (8, 32, 128):
            for at in (1, max(1, batch // 8), max(1, batch // 4)):
                cont(k, at)  # warm-up: this schedule's refill shapes
                times = [cont(k, at)[1] for _ in range(repeats)]
                res = cont(k, at)[0]
                row = {
                    "chunk_steps": k,
                    "refill_at": at,
                    "seconds": times,
                    "tokens_per_s": tokens / statistics.median(times),
                    "chunks": res.timings["chunks"],
                    "decode_steps": res.timings["decode_steps"],
                    "slot_utilization": res.timings["slot_utilization"],
                }
                result["sweep"].append(row)
                print(f"[{name}] sweep {row}", flush=True)
    return result


def run(
    quick: bool = True,
    configs: tuple[str, ...] | None = None,
    rows: int | None = None,
    batch: int = 16,
    max_new: int | None = None,
    median: float = 40.0,
    sigma: float = 1.0,
    repeats: int = 3,
    chunk_steps: int = CHUNK_STEPS,
    refill_at: int | None = None,
    sweep: bool = False,
    write: bool = True,
) -> dict:
    configs = configs or ("tiny", "small")
    rows = rows or (64 if quick else 128)
    max_new = max_new or (128 if quick else 256)
    results = [
        bench_config(
            name,
            rows=rows,
            batch=batch,
            max_new=max_new,
            median=median,
            sigma=sigma,
            repeats=repeats,
            chunk_steps=chunk_steps,
            refill_at=refill_at,
            sweep=sweep and name == "tiny",
        )
        for name in configs
    ]
    by_name = {r["config"]: r for r in results}
    headline = by_name.get("small", results[0])
    out = {
        "backend": jax.default_backend(),
        "cpu_count": os.cpu_count(),
        "load_average_at_end": os.getloadavg(),
        "configs": results,
        "continuous_batching_speedup": headline["speedup"],
        "continuous_batching_speedup_config": headline["config"],
    }
    for r in results:
        out[f"continuous_batching_speedup_{r['config']}"] = r["speedup"]
    if write:
        write_result(out, RESULTS.with_name("continuous_batching_quick.json") if quick else RESULTS)
    return out


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--configs", default=None, help="comma-separated: tiny,small")
    ap.add_argument("--rows", type=int, default=None)
    ap.add_argument("--batch", type=int, default=16, help="static batch = number of slots")
    ap.add_argument("--max_new", type=int, default=None)
    ap.add_argument("--median", type=float, default=40.0)
    ap.add_argument("--sigma", type=float, default=1.0)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--chunk_steps", type=int, default=CHUNK_STEPS)
    ap.add_argument("--refill_at", type=int, default=None)
    ap.add_argument("--sweep", action="store_true")
    a = ap.parse_args(argv)
    run(
        quick=a.quick,
        configs=tuple(a.configs.split(",")) if a.configs else None,
        rows=a.rows,
        batch=a.batch,
        max_new=a.max_new,
        median=a.median,
        sigma=a.sigma,
        repeats=a.repeats,
        chunk_steps=a.chunk_steps,
        refill_at=a.refill_at,
        sweep=a.sweep,
    )


if __name__ == "__main__":
    main()
