"""Naive vs blockwise attention: compiled temporary memory (forward + backward), time per token
vs T on CPU, and one cached decode step.

    python benchmarks/attention_memory.py           # memory T = 1024..32768, time T = 512..16384
    python benchmarks/attention_memory.py --quick   # memory at T = 2048 and 8192 only

Memory: nothing is executed. `value_and_grad` of <attention(q, k, v), cot> w.r.t. q, k and v is
`jax.jit(...).lower(ShapeDtypeStructs).compile()`d and the table reports
`memory_analysis().temp_size_in_bytes` (XLA's peak scratch, excluding arguments and outputs), on
the `nano_30b_a3b` attention shape (32 query heads, 2 kv heads, head_dim 128), batch 1, bf16, one
document per row. `attention_peak_memory_reduction` is naive / blockwise temp bytes at T = 8192.

Time: the same function executed on the `small` config's heads (8 / 2 / 64), fp32, batch 1;
median of interleaved repetitions after a warm-up; naive runs only while its temp memory stays
under `--max_run_gib`. Decode: one query over a cache of `S_max` positions, of which `filled` are
written: the naive masked row over the whole cache vs `blockwise_attention` from the query's
position (which skips the cache blocks after it). Writes benchmarks/results/attention_memory.json.
`run(quick)` is what `benchmarks/run_all.py` calls.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import jax
import jax.numpy as jnp

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from results_io import write_result
from train_step import interleaved_medians

from nemocascade.model import ModelConfig
from nemocascade.model.attention import attention_weights_mask, blockwise_attention, gqa_attention

RESULTS = Path(__file__).resolve().parent / "results" / "attention_memory.json"
HEADLINE_T = 8192


def _heads(cfg: ModelConfig) -> tuple[int, int, int]:
    return cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim


def _impls(block: int):
    def naive(q, k, v, seg):
        pos = jnp.arange(q.shape[1])
        return gqa_attention(q, k, v, attention_weights_mask(seg, seg, pos, pos))

    def blockwise(q, k, v, seg):
        return blockwise_attention(q, k, v, seg, block_q=block, block_k=block)

    return {"naive": naive, "blockwise": blockwise}


def _fwd_bwd(attn):
    def loss(q, k, v, seg, cot):
        return jnp.sum(attn(q, k, v, seg).astype(jnp.float32) * cot)

    return jax.jit(jax.value_and_grad(loss, argnums=(0, 1, 2)))


def _args(b: int, t: int, heads, dtype):
    n, kv, h = heads
    return (
        jax.ShapeDtypeStruct((b, t, n, h), dtype),
        jax.ShapeDtypeStruct((b, t, kv, h), dtype),
        jax.ShapeDtypeStruct((b, t, kv, h), dtype),
        jax.ShapeDtypeStruct((b, t), jnp.int32),
        jax.ShapeDtypeStruct((b, t, n, h), jnp.float32),
    )


def memory_sweep(seqs, *, heads, dtype: str, block: int, batch: int = 1) -> list[dict]:
    rows = []
    for t in seqs:
        row = {"seq": t}
        for name, attn in _impls(block).items():
            t0 = time.perf_counter()
            compiled = _fwd_bwd(attn).lower(*_args(batch, t, heads, jnp.dtype(dtype))).compile()
            row[f"{name}_temp_bytes"] = int(compiled.memory_analysis().temp_size_in_bytes)
            row[f"{name}_compile_s"] = round(time.perf_counter() - t0, 2)
        row["reduction"] = row["naive_temp_bytes"] / max(row["blockwise_temp_bytes"], 1)
        rows.append(row)
        print(
            f"T={t:>6}  naive {row['naive_temp_bytes'] / 2**30:9.3f} GiB   blockwise "
            f"{row['blockwise_temp_bytes'] / 2**30:7.3f} GiB   {row['reduction']:8.1f}x",
            flush=True,
        )
    return rows


def _concrete(shapes, seed: int = 0):
    keys = jax.random.split(jax.random.key(seed), len(shapes))
    out = []
    for key, s in zip(keys, shapes, strict=True):
        if jnp.issubdtype(s.dtype, jnp.integer):
            out.append(jnp.ones(s.shape, s.dtype))
        else:
            out.append(jax.random.normal(key, s.shape, jnp.float32).astype(s.dtype))
    return out


def time_sweep(seqs, *, heads, block: int, repeats: int, max_run_gib: float) -> list[dict]:
    """fwd + bwd seconds per token (fp32, batch 1, one document) for blockwise and, while its
    temp memory stays under `max_run_gib`, naive."""
    rows = []
    for t in seqs:
        args = _concrete(_args(1, t, heads, jnp.float32))
        jobs, row = {}, {"seq": t}
        for name, attn in _impls(block).items():
            compiled = _fwd_bwd(attn).lower(*args).compile()
            temp = compiled.memory_analysis().temp_size_in_bytes
            if name == "naive" and temp > max_run_gib * 2**30:
                row["naive_skipped_temp_gib"] = round(temp / 2**30, 2)
                continue
            jobs[name] = lambda c=compiled, a=args: jax.block_until_ready(c(*a))
        for name, r in interleaved_medians(jobs, repeats).items():
            row[f"{name}_s"] = r["median_s"]
            row[f"{name}_us_per_token"] = r["median_s"] / t * 1e6
        rows.append(row)
        print(
            f"T={t:>6}  blockwise {row['blockwise_us_per_token']:9.1f} us/token"
            + (f"   naive {row['naive_us_per_token']:9.1f}" if "naive_s" in row else ""),
            flush=True,
        )
    return rows


def decode_step(*, heads, s_max: int, fills, block: int, repeats: int) -> list[dict]:
    """One query (fp32, batch 1) over a cache of s_max positions of which `filled` are written."""
    n, kv, h = heads
    q, k, v = _concrete(
        [
            jax.ShapeDtypeStruct((1, 1, n, h), jnp.float32),
            jax.ShapeDtypeStruct((1, s_max, kv, h), jnp.float32),
            jax.ShapeDtypeStruct((1, s_max, kv, h), jnp.float32),
        ]
    )

    @jax.jit
    def naive(q, k, v, start):
        seg_k = (jnp.arange(s_max) <= start).astype(jnp.int32)[None]
        pos_k = jnp.arange(s_max)
        mask = attention_weights_mask(jnp.ones((1, 1), jnp.int32), seg_k, start[None], pos_k)
        return gqa_attention(q, k, v, mask & (pos_k < start + 1)[None, None])

    @jax.jit
    def blockwise(q, k, v, start):
        seg_k = (jnp.arange(s_max) <= start).astype(jnp.int32)[None]
        seg_q = jnp.ones((1, 1), jnp.int32)
        return blockwise_attention(q, k, v, seg_q, seg_k, start, block_q=1, block_k=block)

    rows = []
    for filled in fills:
        start = jnp.int32(filled - 1)
        jobs = {
            "naive": lambda s=start: jax.block_until_ready(naive(q, k, v, s)),
            "blockwise": lambda s=start: jax.block_until_ready(blockwise(q, k, v, s)),
        }
        r = interleaved_medians(jobs, repeats)
        err = float(jnp.abs(naive(q, k, v, start) - blockwise(q, k, v, start)).max())
        row = {
            "s_max": s_max,
            "filled": filled,
            "naive_us": r["naive"]["median_s"] * 1e6,
            "blockwise_us": r["blockwise"]["median_s"] * 1e6,
            "max_abs_diff": err,
        }
        rows.append(row)
        print(
            f"decode S_max={s_max} filled={filled:>6}: naive {row['naive_us']:8.0f} us, "
            f"blockwise {row['blockwise_us']:8.0f} us (max |diff| {err:.1e})",
            flush=True,
        )
    return rows


def run(
    quick: bool = True,
    *,
    block: int = 512,
    dtype: str = "bfloat16",
    repeats: int = 3,
    max_run_gib: float = 4.0,
    write: bool = True,
) -> dict:
    """Measure, print, write the JSON; returns it with `attention_peak_memory_reduction`."""
    mem_heads, time_heads = _heads(ModelConfig.nano_30b_a3b()), _heads(ModelConfig.small())
    mem_seqs = [2048, HEADLINE_T] if quick else [1024, 2048, 4096, HEADLINE_T, 16384, 32768]
    result = {
        "backend": jax.default_backend(),
        "block": block,
        "memory": {"heads_n_kv_h": mem_heads, "dtype": dtype, "batch": 1},
        "time": {"heads_n_kv_h": time_heads, "dtype": "float32", "batch": 1},
    }
    print(f"compiled temp memory, fwd + bwd, heads {mem_heads}, {dtype}, block {block}")
    rows = memory_sweep(mem_seqs, heads=mem_heads, dtype=dtype, block=block)
    result["memory"]["rows"] = rows
    headline = next(r for r in rows if r["seq"] == HEADLINE_T)
    result["attention_peak_memory_reduction"] = headline["reduction"]
    if not quick:
        print(f"fwd + bwd time on {jax.default_backend()}, heads {time_heads}, fp32")
        result["time"]["rows"] = time_sweep(
            [512, 1024, 2048, 4096, 8192, 16384],
            heads=time_heads,
            block=block,
            repeats=repeats,
            max_run_gib=max_run_gib,
        )
        result["decode"] = decode_step(
            heads=time_heads, s_max=8192, fills=[512, 4096, 8192], block=block, repeats=20
        )
    print(f"attention_peak_memory_reduction (T={HEADLINE_T}): {headline['reduction']:.1f}x")
    if write:
        write_result(result, RESULTS.with_name("attention_memory_quick.json") if quick else RESULTS)
    return result


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--block", type=int, default=512)
    ap.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float32"])
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--max_run_gib", type=float, default=4.0)
    a = ap.parse_args(argv)
    run(
        quick=a.quick,
        block=a.block,
        dtype=a.dtype,
        repeats=a.repeats,
        max_run_gib=a.max_run_gib,
    )


if __name__ == "__main__":
    main()
