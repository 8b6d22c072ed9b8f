"""Grouped-matmul benchmark: pallas_kernels.gmm vs megablox, lax.ragged_dot and the jnp reference.

    python benchmarks/gmm.py                   # CPU: small config; TPU/GPU: the real config in bf16
    python benchmarks/gmm.py --quick           # one small shape, a few seconds
    python benchmarks/gmm.py --config=nano --rows=4096,16384 --impls=pallas,megablox,ragged_dot

Shapes come from the model presets (rows M = tokens * top_k routed rows, sorted by expert):
`up` is [M, D] x [E, D, F], `down` is [M, F] x [E, F, D]. Group sizes are a random routing
with a Zipf-like skew (some experts empty), and `--drop` rows left over at the end
(sum(group_sizes) < M). Each impl is timed forward (`fwd`) and forward+backward of
<gmm(lhs, rhs), cot> w.r.t. both operands (`fwd_bwd`); TFLOP/s counts useful work only
(2 * routed_rows * K * N per matmul, 3 matmuls for fwd_bwd).

Impls: `pallas` (ours; interpret mode off TPU), `megablox` (jax's TPU kernel; interpret mode off
TPU; needs M divisible by its tm, so it gets the same rows padded to a multiple),
`ragged_dot` (lax.ragged_dot: a grouped GEMM on GPU), `reference` (the jnp oracle: a scan
over experts, E times the useful work), `dense` (one plain [M, K] x [K, N] matmul: the
speed of light for the same useful FLOPs; different math, so no error). On CPU the interpreted
kernels are reported but are not meaningful speeds. `max_err` is
max |impl - ragged_dot| / max |ragged_dot| over the routed rows of the forward; `tail_rows_zero`
says whether the rows after the last group came out 0.
Writes benchmarks/results/gmm.json.
"""

from __future__ import annotations

import argparse
import importlib
import json
import sys
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import pallas_kernels

CONFIGS = {  # hidden D, expert width F, experts E (nemocascade/model/config.py presets)
    "small": (512, 256, 32),
    "nano": (2688, 1856, 128),
}
IMPLS = ("pallas", "megablox", "ragged_dot", "reference", "dense")
RESULTS = Path(__file__).resolve().parent / "results" / "gmm.json"


def routed_group_sizes(rows: int, experts: int, drop: int, seed: int = 0) -> np.ndarray:
    """Rows per expert: `rows - drop` rows spread with a Zipf-like skew (1/(rank+1))."""
    rng = np.random.default_rng(seed)
    p = 1.0 / (1.0 + rng.permutation(experts))
    return np.bincount(rng.choice(experts, rows - drop, p=p / p.sum()), minlength=experts)


def _megablox_gmm(lhs, rhs, sizes, tiling, interpret):
    """megablox's differentiable gmm with M padded to a multiple of its tm (it requires that)."""
    ops = importlib.import_module("jax.experimental.pallas.ops.tpu.megablox.ops")
    m = lhs.shape[0]
    tm = tiling[0]
    padded = -(-m // tm) * tm
    lhs_p = jnp.pad(lhs, ((0, padded - m), (0, 0)))
    return ops.gmm(lhs_p, rhs, sizes, lhs.dtype, tiling, None, None, False, interpret)[:m]


def make_fn(impl: str, interpret: bool | None, tiling):
    """(lhs, rhs, sizes) -> [M, N] for `impl`."""
    if impl == "pallas":
        return lambda a, b, s: pallas_kernels.gmm(
            a, b, s, interpret=interpret, tiling=tiling, impl="pallas"
        )
    if impl == "ragged_dot":
        return lambda a, b, s: pallas_kernels.gmm(a, b, s, impl="ragged_dot")
    if impl == "reference":
        return pallas_kernels.gmm_reference
    if impl == "dense":  # speed of light: one plain [M, K] x [K, N] matmul, fp32 accumulation
        return lambda a, b, s: jnp.dot(a, b[0], preferred_element_type=jnp.float32).astype(a.dtype)
    if impl == "megablox":
        mb_interpret = jax.default_backend() != "tpu" if interpret is None else interpret

        def mb(a, b, s):
            m, k, n = a.shape[0], a.shape[1], b.shape[2]
            tm, tk, tn = tiling or _same_tiles_as_ours(m, k, n, b.shape[0], mb_interpret)
            return _megablox_gmm(a, b, s, (tm, tk, tn), mb_interpret)

        return mb
    raise ValueError(f"benchmarks/gmm.py: unknown impl {impl!r}; choose from {IMPLS}")


def _same_tiles_as_ours(m, k, n, g, interpret):
    from pallas_kernels.gmm.tiling import default_tiling

    tm, tk, tn = default_tiling(m, k, n, g, native=not interpret)
    return max(8, tm - tm % 8), tk, tn


def time_fn(fn, args, repeats: int) -> float:
    """Median wall time in ms of a jitted call (after one compile+warm-up call)."""
    jax.block_until_ready(fn(*args))
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        jax.block_until_ready(fn(*args))
        times.append(time.perf_counter() - t0)
    return 1e3 * float(np.median(times))


def bench_shape(
    cfg: str, proj: str, rows: int, dtype, impls, *, drop, repeats, interpret, tiling, modes
):
    d, f, e = CONFIGS[cfg]
    k, n = (d, f) if proj == "up" else (f, d)
    sizes = jnp.asarray(routed_group_sizes(rows, e, drop), jnp.int32)
    rng = np.random.default_rng(1)
    lhs = jnp.asarray(rng.standard_normal((rows, k), np.float32), dtype)
    rhs = jnp.asarray(rng.standard_normal((e, k, n), np.float32) / np.sqrt(k), dtype)
    cot = jnp.asarray(rng.standard_normal((rows, n), np.float32), dtype)
    useful = 2.0 * float(sizes.sum()) * k * n
    routed = int(sizes.sum())
    baseline = jax.jit(make_fn("ragged_dot", None, None))(lhs, rhs, sizes).astype(jnp.float32)
    scale = float(jnp.abs(baseline).max())
    records = []
    for impl in impls:
        fn = make_fn(impl, interpret, tiling)
        fwd = jax.jit(fn)

        def loss(a, b, s, fn=fn):
            return jnp.sum(fn(a, b, s).astype(jnp.float32) * cot)

        fwd_bwd = jax.jit(jax.grad(loss, argnums=(0, 1)))
        out = fwd(lhs, rhs, sizes).astype(jnp.float32)
        if impl == "dense":  # different math: no error, no tail
            err, tail_zero = None, True
        else:
            err = float(jnp.abs(out[:routed] - baseline[:routed]).max()) / scale
            tail_zero = bool((out[routed:] == 0).all())  # megablox leaves these uninitialised
        for mode in modes:
            ms = time_fn(fwd if mode == "fwd" else fwd_bwd, (lhs, rhs, sizes), repeats)
            flops = useful * (1 if mode == "fwd" else 3)
            interpreted = impl in ("pallas", "megablox") and (
                jax.default_backend() != "tpu" if interpret is None else interpret
            )
            records.append(
                {
                    "config": cfg,
                    "proj": proj,
                    "rows": rows,
                    "routed_rows": routed,
                    "K": k,
                    "N": n,
                    "G": e,
                    "dtype": jnp.dtype(dtype).name,
                    "impl": impl,
                    "mode": mode,
                    "ms": ms,
                    "tflops": flops / ms / 1e9,
                    "max_err": err,
                    "tail_rows_zero": tail_zero,
                    "interpreted": interpreted,
                }
            )
            print(
                f"{cfg:5s} {proj:4s} M={rows:6d} K={k:5d} N={n:5d} G={e:3d} {impl:10s} {mode:7s} "
                f"{ms:10.2f} ms {records[-1]['tflops']:8.3f} TFLOP/s  err "
                f"{'   -   ' if err is None else f'{err:.1e}'}"
                f"{'' if tail_zero else '  tail rows NOT zero'}",
                flush=True,
            )
    return records


def run(quick: bool = False, argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    on_cpu = jax.default_backend() == "cpu"
    p.add_argument("--config", choices=sorted(CONFIGS), default="small" if on_cpu else "nano")
    p.add_argument("--rows", default=None, help="comma-separated M values (routed rows)")
    p.add_argument("--dtype", choices=["bfloat16", "float32"], default=None)
    p.add_argument("--impls", default=None, help=f"comma-separated subset of {IMPLS}")
    p.add_argument("--modes", default="fwd,fwd_bwd")
    p.add_argument("--drop", type=int, default=7, help="rows after the last group")
    p.add_argument("--repeats", type=int, default=None)
    p.add_argument("--tiling", default=None, help="tm,tk,tn (default: per generation)")
    p.add_argument("--quick", action="store_true", default=quick)
    p.add_argument("--out", default=str(RESULTS))
    args = p.parse_args(argv)
    if args.quick:
        rows, projs, cfg = [256], ["up"], "small"
    else:
        cfg = args.config
        rows = [512, 2048] if on_cpu else [4096, 16384, 65536]
        projs = ["up", "down"]
    if args.rows:
        rows = [int(r) for r in args.rows.split(",")]
    dtype = jnp.dtype(args.dtype or ("float32" if on_cpu else "bfloat16"))
    impls = (
        args.impls.split(",")
        if args.impls
        # the reference does E x the useful work: skip it on accelerators (memory/time)
        else (list(IMPLS) if on_cpu else ["pallas", "megablox", "ragged_dot", "dense"])
    )
    if jax.default_backend() == "gpu" and not args.impls:
        impls = [
            "ragged_dot",
            "dense",
        ]  # the TPU kernels would run interpreted: not a GPU measurement
    tiling = tuple(int(t) for t in args.tiling.split(",")) if args.tiling else None
    repeats = args.repeats or (3 if on_cpu else 20)
    records = []
    for proj in projs:
        for m in rows:
            records += bench_shape(
                cfg,
                proj,
                m,
                dtype,
                impls,
                drop=args.drop,
                repeats=repeats,
                interpret=None,
                tiling=tiling,
                modes=args.modes.split(","),
            )
    result = {
        "backend": jax.default_backend(),
        "device_kind": jax.devices()[0].device_kind,
        "jax_version": jax.__version__,
        "records": records,
    }
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=1))
    print(f"wrote {out}")
    return result


if __name__ == "__main__":
    run()
