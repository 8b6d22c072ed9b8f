"""MoE expert-layer benchmark: forward+backward time of each backend vs an equal-FLOP dense matmul.

    python benchmarks/moe.py            # small + large shapes -> benchmarks/results/moe.json
    python benchmarks/moe.py --quick    # the small shape, fast backends only (~30 s on CPU)
    python benchmarks/moe.py --backends=sorted,ragged_dot --shapes=small

For each shape, every backend computes `sum(expert_mlp(x) * r)` and its gradients w.r.t. x, the
routing weights and both expert weight tensors (one jitted function). The reference
"equal_flop_dense" does the same active FLOPs as plain matmuls: `[T*K, D] @ [D, F] -> relu^2 ->
@ [F, D]` with the same gradients, i.e. the practical limit of any dropless grouped matmul.
Also recorded: the compiled temporary memory (`compiled.memory_analysis().temp_size_in_bytes`).

`run(quick=True)` is what `benchmarks/run_all.py` calls; it returns a dict that includes
`moe_best_vs_equal_flop_dense` (best dropless non-oracle backend time / equal-FLOP dense time).
On CPU, backends whose cost is far above the useful work (the one-hot `dense`, `ragged_dot`,
`pallas` in interpret mode) are timed once, on the small shape of a full run only, unless named
with --backends. The `quick` shape (--shapes=quick) is a smaller smoke test.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from nemocascade.model import moe_backends

SHAPES = {
    # name: tokens, hidden, experts, top_k, width
    "quick": {"tokens": 1024, "hidden": 256, "experts": 16, "top_k": 4, "width": 128},
    "small": {"tokens": 4096, "hidden": 512, "experts": 32, "top_k": 4, "width": 256},
    "large": {"tokens": 8192, "hidden": 1024, "experts": 64, "top_k": 6, "width": 512},
}
# Backends that do (close to) E/K or E times the useful work on CPU, or run the Pallas
# interpreter: measured on the quick/small shapes only unless named explicitly.
SLOW_ON_CPU = ("dense", "ragged_dot", "pallas")


def _inputs(shape: dict, dtype=jnp.float32, seed: int = 0):
    T, D, E, K, F = (shape[k] for k in ("tokens", "hidden", "experts", "top_k", "width"))
    ks = jax.random.split(jax.random.key(seed), 5)
    x_TD = jax.random.normal(ks[0], (T, D), dtype)
    up_EDF = (jax.random.normal(ks[1], (E, D, F)) / np.sqrt(D)).astype(dtype)
    down_EFD = (jax.random.normal(ks[2], (E, F, D)) / np.sqrt(F)).astype(dtype)
    logits_TE = jax.random.normal(ks[3], (T, E))
    w_TK, idx_TK = jax.lax.top_k(jax.nn.sigmoid(logits_TE), K)
    r_TD = jax.random.normal(ks[4], (T, D), dtype)
    return x_TD, idx_TK.astype(jnp.int32), w_TK, up_EDF, down_EFD, r_TD


def _moe_step(backend: str):
    fn = moe_backends.get_backend(backend)

    def loss(x_TD, w_TK, up_EDF, down_EFD, idx_TK, r_TD):
        return jnp.sum(fn(x_TD, idx_TK, w_TK, up_EDF, down_EFD).astype(jnp.float32) * r_TD)

    return jax.jit(jax.value_and_grad(loss, argnums=(0, 1, 2, 3)))


def _equal_flop_step():
    def loss(x_AD, w1_DF, w2_FD, r_AD):
        y = moe_backends.relu2(x_AD @ w1_DF) @ w2_FD
        return jnp.sum(y.astype(jnp.float32) * r_AD)

    return jax.jit(jax.value_and_grad(loss, argnums=(0, 1, 2)))


def _compile(fn, args):
    compiled = fn.lower(*args).compile()
    mem = compiled.memory_analysis()
    temp = int(getattr(mem, "temp_size_in_bytes", -1)) if mem is not None else -1
    jax.block_until_ready(compiled(*args))  # warm-up
    return compiled, temp


def _interleaved_min_times(jobs: dict, rounds: int) -> dict:
    """Min wall time per job over `rounds` rounds, the jobs interleaved within each round (the
    machine is shared; the min of interleaved runs is the least noisy estimate)."""
    best = {k: float("inf") for k in jobs}
    for _ in range(rounds):
        for k, (compiled, args) in jobs.items():
            t0 = time.perf_counter()
            jax.block_until_ready(compiled(*args))
            best[k] = min(best[k], time.perf_counter() - t0)
    return best


def bench_shape(
    name: str, backends: list[str], iters: int, explicit: bool, skip_slow: bool
) -> dict:
    shape = SHAPES[name]
    x_TD, idx_TK, w_TK, up_EDF, down_EFD, r_TD = _inputs(shape)
    T, D, K, F = (shape[k] for k in ("tokens", "hidden", "top_k", "width"))
    A = T * K
    ks = jax.random.split(jax.random.key(1), 2)
    eq_args = (
        jax.random.normal(ks[0], (A, D)),
        up_EDF[0],
        down_EFD[0],
        jax.random.normal(ks[1], (A, D)),
    )
    flops = 3 * 2 * 2 * A * D * F  # fwd (2 matmuls) + bwd (2x that), 2 flops per MAC
    rows, fast, slow = {}, {}, {}
    fast["equal_flop_dense"] = (*_compile(_equal_flop_step(), eq_args), eq_args)
    moe_args = (x_TD, w_TK, up_EDF, down_EFD, idx_TK, r_TD)
    for b in backends:
        if b in SLOW_ON_CPU and skip_slow and not explicit and jax.default_backend() == "cpu":
            rows[b] = {
                "skipped": "estimated >= E/K x the useful work on CPU; pass --backends to force"
            }
            continue
        try:
            entry = (*_compile(_moe_step(b), moe_args), moe_args)
        except Exception as e:  # noqa: BLE001  (e.g. the Pallas kernel not available here)
            rows[b] = {"skipped": f"{type(e).__name__}: {e}"[:200]}
            continue
        (slow if b in SLOW_ON_CPU and jax.default_backend() == "cpu" else fast)[b] = entry
    times = _interleaved_min_times({k: (c, a) for k, (c, _, a) in fast.items()}, iters)
    times.update(_interleaved_min_times({k: (c, a) for k, (c, _, a) in slow.items()}, 1))
    t_ref = times["equal_flop_dense"]
    for k, (_, temp, _) in {**fast, **slow}.items():
        rows[k] = {
            "time_s": times[k],
            "temp_bytes": temp,
            "vs_equal_flop_dense": times[k] / t_ref,
            "gflops": flops / times[k] / 1e9,
        }
    order = ["equal_flop_dense"] + [b for b in backends]
    return {"shape": shape, "results": {k: rows[k] for k in order if k in rows}}


def _best_ratio(shape_result: dict) -> tuple[str | None, float | None]:
    best = None
    for b, r in shape_result["results"].items():
        if b in ("equal_flop_dense", "dense") or "time_s" not in r:
            continue
        if best is None or r["vs_equal_flop_dense"] < best[1]:
            best = (b, r["vs_equal_flop_dense"])
    return best if best else (None, None)


def run(
    quick: bool = True,
    backends: list[str] | None = None,
    shapes: list[str] | None = None,
    iters: int = 8,
) -> dict:
    """Benchmark; returns a dict with 'platform', 'shapes' (per-shape tables), 'best_per_shape',
    'moe_best_backend' and 'moe_best_vs_equal_flop_dense'.

    `moe_best_vs_equal_flop_dense` is taken from the last shape measured (`large` in a full run,
    `small` with quick=True); `best_per_shape` has it for every shape.
    """
    explicit = backends is not None
    backends = backends or list(moe_backends.available_backends())
    shapes = shapes or (["small"] if quick else ["small", "large"])
    out = {
        "platform": jax.default_backend(),
        "device": str(jax.devices()[0]),
        "cpu_count": os.cpu_count(),
        "loadavg_before": os.getloadavg(),
        "shapes": {},
    }
    for name in shapes:
        out["shapes"][name] = bench_shape(
            name, backends, iters, explicit, skip_slow=quick or name == "large"
        )
    out["loadavg_after"] = os.getloadavg()  # a shared machine: other processes skew the times
    out["best_per_shape"] = {
        name: dict(zip(("backend", "vs_equal_flop_dense"), _best_ratio(sr), strict=True))
        for name, sr in out["shapes"].items()
    }
    best_b, best_r = _best_ratio(out["shapes"][shapes[-1]])
    out["moe_best_backend"] = best_b
    out["moe_best_vs_equal_flop_dense"] = best_r
    return out


def _print_table(res: dict) -> None:
    print(
        f"platform: {res['platform']} ({res['device']}), {res['cpu_count']} cpus, load average "
        f"{res['loadavg_before'][0]:.1f} -> {res['loadavg_after'][0]:.1f}"
    )
    for name, sr in res["shapes"].items():
        print(f"\n== {name}: {sr['shape']}")
        print(f"{'backend':<18}{'time ms':>10}{'x eq-FLOP':>11}{'GFLOP/s':>10}{'temp MiB':>10}")
        for b, r in sr["results"].items():
            if "time_s" not in r:
                print(f"{b:<18}  skipped: {r['skipped']}")
                continue
            print(
                f"{b:<18}{1e3 * r['time_s']:>10.1f}{r['vs_equal_flop_dense']:>11.2f}"
                f"{r['gflops']:>10.1f}{r['temp_bytes'] / 2**20:>10.1f}"
            )
    print(
        f"\nbest dropless backend: {res['moe_best_backend']} at "
        f"{res['moe_best_vs_equal_flop_dense']} x the equal-FLOP dense matmul"
    )


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--quick", action="store_true")
    p.add_argument("--backends", default=None, help="comma list (default: all registered)")
    p.add_argument("--shapes", default=None, help="comma list of " + ",".join(SHAPES))
    p.add_argument("--iters", type=int, default=8, help="interleaved timing rounds (min is kept)")
    p.add_argument("--out", default=str(Path(__file__).resolve().parent / "results" / "moe.json"))
    a = p.parse_args()
    res = run(
        quick=a.quick,
        backends=a.backends.split(",") if a.backends else None,
        shapes=a.shapes.split(",") if a.shapes else None,
        iters=a.iters,
    )
    _print_table(res)
    os.makedirs(os.path.dirname(a.out), exist_ok=True)
    with open(a.out, "w") as f:
        json.dump(res, f, indent=2)
    print(f"wrote {a.out}")


if __name__ == "__main__":
    main()
