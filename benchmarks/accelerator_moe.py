"""MoE expert matmuls on an accelerator: achieved TFLOP/s of the gmm kernel, `lax.ragged_dot` and
the dense equal-FLOP matmul, in bf16, on the real Nemotron-3-Nano MoE shapes, against the chip's
peak.

    python benchmarks/accelerator_moe.py                 # on a TPU or GPU; about 2-4 minutes
    python benchmarks/accelerator_moe.py --tokens=8192,32768 --out=/tmp/moe_acc.json
    python benchmarks/accelerator_moe.py --smoke         # tiny shapes on CPU: checks the code path

NOT RUN YET: no accelerator was available when this was written (see benchmarks/README.md).
It is one prepared script, never run by the tests.

Shapes (nano_30b_a3b): hidden D = 2688, expert width F = 1856, E = 128 experts, top-k = 6.
For `tokens` routed tokens per device there are M = tokens * 6 rows, sorted by expert, with a
random routing (Zipf-like skew, so some experts are busy and some empty). Per `tokens`:

  up       [M, D] x [E, D, F] -> [M, F]
  down     [M, F] x [E, F, D] -> [M, D]
  layer    the whole routed-expert MLP of `moe_backends` (permute, up, relu^2, down,
           weighted unpermute) for backends `pallas` (our gmm kernel) and `ragged_dot`,
           vs `equal_flop_dense` ([M, D] @ [D, F] -> relu^2 -> @ [F, D], same useful FLOPs)

each forward (`fwd`) and forward + backward w.r.t. both operands (`fwd_bwd`, 3x the FLOPs).
Impls for up/down: `gmm` = `pallas_kernels.gmm` with its platform default (the Pallas TPU
kernel on TPU; on GPU it dispatches to ragged_dot, see pallas_kernels/gmm/README.md), `pallas` =
the Pallas kernel forced (TPU only; skipped elsewhere unless --smoke), `ragged_dot` =
`lax.ragged_dot`, `dense` = one plain [M, K] x [K, N] matmul (the speed of light for the same
useful FLOPs). TFLOP/s count useful work only (2 * routed rows * K * N per matmul).

Peak: the chip's bf16 dense spec (table below, by `device_kind`) and, measured in the same
run, the best bf16 `jnp.dot` on 8192^2 squares. Each program: one compile/warm-up call, then
the median of `--repeats` timed calls. Writes JSON (default
benchmarks/results/accelerator_moe.json).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import pallas_kernels
from nemocascade.model import moe_backends

NANO = {"hidden": 2688, "width": 1856, "experts": 128, "top_k": 6}
SMOKE = {"hidden": 128, "width": 64, "experts": 8, "top_k": 2}
# bf16 dense peak TFLOP/s per chip (vendor specs; H100/H200 SXM without sparsity)
PEAK_TFLOPS = {
    "TPU v4": 275.0,
    "TPU v5 lite": 197.0,
    "TPU v5e": 197.0,
    "TPU v5p": 459.0,
    "TPU v5": 459.0,
    "TPU v6 lite": 918.0,
    "TPU v6e": 918.0,
    "NVIDIA H100": 989.0,
    "NVIDIA H200": 989.0,
    "NVIDIA A100": 312.0,
}
RESULTS = Path(__file__).resolve().parent / "results" / "accelerator_moe.json"


def chip_peak_tflops(device) -> float | None:
    """The bf16 spec peak for `device.device_kind` (longest matching prefix), None if unknown."""
    kind = device.device_kind
    best = None
    for name, peak in PEAK_TFLOPS.items():
        if kind.startswith(name) and (best is None or len(name) > len(best[0])):
            best = (name, peak)
    return best[1] if best else None


def median_ms(fn, args, repeats: int) -> float:
    jax.block_until_ready(fn(*args))  # compile + warm-up
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        jax.block_until_ready(fn(*args))
        times.append(time.perf_counter() - t0)
    return 1e3 * statistics.median(times)


def measured_matmul_peak(n: int, repeats: int) -> float:
    """Best-case bf16 TFLOP/s of one [n, n] x [n, n] jnp.dot with fp32 accumulation."""
    a = jnp.ones((n, n), jnp.bfloat16)
    f = jax.jit(lambda x, y: jnp.dot(x, y, preferred_element_type=jnp.float32))
    return 2 * n**3 / median_ms(f, (a, a), repeats) / 1e9


def routing(tokens: int, experts: int, top_k: int, seed: int = 0):
    """(idx_TK int32, w_TK fp32, group_sizes_E int32): random top-k with a Zipf-like skew."""
    rng = np.random.default_rng(seed)
    p = 1.0 / (1.0 + rng.permutation(experts))
    p /= p.sum()
    idx = np.stack([rng.choice(experts, top_k, replace=False, p=p) for _ in range(tokens)])
    w = rng.random((tokens, top_k)).astype(np.float32)
    sizes = np.bincount(idx.reshape(-1), minlength=experts).astype(np.int32)
    return jnp.asarray(idx, jnp.int32), jnp.asarray(w), jnp.asarray(sizes)


def _gmm_fn(impl: str):
    if impl == "gmm":
        return lambda a, b, s: pallas_kernels.gmm(a, b, s)
    if impl == "pallas":
        return lambda a, b, s: pallas_kernels.gmm(a, b, s, impl="pallas")
    if impl == "ragged_dot":
        return lambda a, b, s: jax.lax.ragged_dot(
            a, b, s, preferred_element_type=jnp.float32
        ).astype(a.dtype)
    if impl == "dense":
        return lambda a, b, s: jnp.dot(a, b[0], preferred_element_type=jnp.float32).astype(a.dtype)
    raise ValueError(f"accelerator_moe: unknown impl {impl!r}")


def bench_projection(proj: str, m: int, shape: dict, sizes, impls, repeats: int) -> list[dict]:
    d, f, e = shape["hidden"], shape["width"], shape["experts"]
    k, n = (d, f) if proj == "up" else (f, d)
    ks = jax.random.split(jax.random.key(1), 3)
    lhs = jax.random.normal(ks[0], (m, k), jnp.bfloat16)
    rhs = (jax.random.normal(ks[1], (e, k, n), jnp.float32) / np.sqrt(k)).astype(jnp.bfloat16)
    cot = jax.random.normal(ks[2], (m, n), jnp.bfloat16)
    useful = 2.0 * m * k * n
    rows = []
    for impl in impls:
        fn = _gmm_fn(impl)

        def loss(a, b, s, fn=fn):
            return jnp.sum(fn(a, b, s).astype(jnp.float32) * cot)

        for mode, prog, mult in (
            ("fwd", jax.jit(fn), 1),
            ("fwd_bwd", jax.jit(jax.grad(loss, argnums=(0, 1))), 3),
        ):
            try:
                ms = median_ms(prog, (lhs, rhs, sizes), repeats)
            except Exception as err:  # noqa: BLE001  (e.g. the TPU kernel on a GPU)
                rows.append(
                    {
                        "proj": proj,
                        "M": m,
                        "K": k,
                        "N": n,
                        "impl": impl,
                        "mode": mode,
                        "error": f"{type(err).__name__}: {err}"[:300],
                    }
                )
                continue
            rows.append(
                {
                    "proj": proj,
                    "M": m,
                    "K": k,
                    "N": n,
                    "impl": impl,
                    "mode": mode,
                    "ms": ms,
                    "tflops": mult * useful / ms / 1e9,
                }
            )
    return rows


def bench_layer(tokens: int, shape: dict, idx, w, backends, repeats: int) -> list[dict]:
    d, f, e, k = shape["hidden"], shape["width"], shape["experts"], shape["top_k"]
    ks = jax.random.split(jax.random.key(2), 5)
    x = jax.random.normal(ks[0], (tokens, d), jnp.bfloat16)
    up = (jax.random.normal(ks[1], (e, d, f), jnp.float32) / np.sqrt(d)).astype(jnp.bfloat16)
    down = (jax.random.normal(ks[2], (e, f, d), jnp.float32) / np.sqrt(f)).astype(jnp.bfloat16)
    r = jax.random.normal(ks[3], (tokens, d), jnp.bfloat16)
    a = tokens * k
    useful = 2 * 2.0 * a * d * f
    rows = []

    def timed(name, fwd, grad, args):
        for mode, prog, mult in (("fwd", fwd, 1), ("fwd_bwd", grad, 3)):
            try:
                ms = median_ms(prog, args, repeats)
            except Exception as err:  # noqa: BLE001
                rows.append(
                    {
                        "layer": name,
                        "tokens": tokens,
                        "mode": mode,
                        "error": f"{type(err).__name__}: {err}"[:300],
                    }
                )
                continue
            rows.append(
                {
                    "layer": name,
                    "tokens": tokens,
                    "mode": mode,
                    "ms": ms,
                    "tflops": mult * useful / ms / 1e9,
                }
            )

    for b in backends:
        fn = moe_backends.get_backend(b)
        fwd = jax.jit(lambda x, w, u, dn, fn=fn: fn(x, idx, w, u, dn))

        def loss(x, w, u, dn, fn=fn):
            return jnp.sum(fn(x, idx, w, u, dn).astype(jnp.float32) * r)

        timed(b, fwd, jax.jit(jax.grad(loss, argnums=(0, 1, 2, 3))), (x, w, up, down))
    xa = jax.random.normal(ks[4], (a, d), jnp.bfloat16)
    ra = jnp.tile(r, (k, 1))

    def dense(x, u, dn):
        return moe_backends.relu2(x @ u) @ dn

    def dloss(x, u, dn):
        return jnp.sum(dense(x, u, dn).astype(jnp.float32) * ra)

    timed(
        "equal_flop_dense",
        jax.jit(dense),
        jax.jit(jax.grad(dloss, argnums=(0, 1, 2))),
        (xa, up[0], down[0]),
    )
    return rows


def run(tokens_list=(8192, 32768), repeats: int = 10, smoke: bool = False) -> dict:
    """Measures everything above; returns the JSON-ready dict (prints one line per program)."""
    dev = jax.devices()[0]
    shape = SMOKE if smoke else NANO
    on_tpu = dev.platform == "tpu"
    impls = ["gmm", "ragged_dot", "dense"] + (["pallas"] if (on_tpu or smoke) else [])
    backends = ["ragged_dot"] + (["pallas"] if (on_tpu or smoke) else [])
    res = {
        "device": str(dev),
        "device_kind": dev.device_kind,
        "platform": dev.platform,
        "dtype": "bfloat16",
        "shape": shape,
        "spec_peak_tflops": chip_peak_tflops(dev),
        "measured_matmul_peak_tflops": measured_matmul_peak(512 if smoke else 8192, repeats),
        "projections": [],
        "layers": [],
    }
    for tokens in tokens_list:
        idx, w, sizes = routing(tokens, shape["experts"], shape["top_k"])
        m = tokens * shape["top_k"]
        for proj in ("up", "down"):
            res["projections"] += bench_projection(proj, m, shape, sizes, impls, repeats)
        res["layers"] += bench_layer(tokens, shape, idx, w, backends, repeats)
    peak = res["spec_peak_tflops"] or res["measured_matmul_peak_tflops"]
    for row in res["projections"] + res["layers"]:
        if "tflops" in row:
            row["fraction_of_peak"] = row["tflops"] / peak
    return res


def print_table(res: dict) -> None:
    print(
        f"{res['device_kind']} ({res['platform']}): spec bf16 peak {res['spec_peak_tflops']} "
        f"TFLOP/s, measured dense matmul {res['measured_matmul_peak_tflops']:.1f} TFLOP/s"
    )
    for row in res["projections"]:
        tag = f"{row['proj']:<5} M={row['M']:<7} {row['impl']:<11}{row['mode']:<8}"
        print(
            tag
            + (
                f"{row['ms']:9.3f} ms {row['tflops']:8.1f} TFLOP/s "
                f"{100 * row['fraction_of_peak']:5.1f}% of peak"
                if "ms" in row
                else f" error: {row['error'][:90]}"
            )
        )
    for row in res["layers"]:
        tag = f"layer T={row['tokens']:<7} {row['layer']:<17}{row['mode']:<8}"
        print(
            tag
            + (
                f"{row['ms']:9.3f} ms {row['tflops']:8.1f} TFLOP/s "
                f"{100 * row['fraction_of_peak']:5.1f}% of peak"
                if "ms" in row
                else f" error: {row['error'][:90]}"
            )
        )


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--tokens", default="8192,32768", help="routed tokens per device, comma list")
    p.add_argument("--repeats", type=int, default=10)
    p.add_argument("--smoke", action="store_true", help="tiny shapes (CPU check of the code path)")
    p.add_argument("--out", default=str(RESULTS))
    a = p.parse_args()
    tokens = (64,) if a.smoke else tuple(int(t) for t in a.tokens.split(","))
    res = run(tokens, repeats=2 if a.smoke else a.repeats, smoke=a.smoke)
    print_table(res)
    Path(a.out).parent.mkdir(parents=True, exist_ok=True)
    Path(a.out).write_text(json.dumps(res, indent=2) + "\n")
    print(f"wrote {a.out}")


if __name__ == "__main__":
    main()
