"""Where a decode step's time goes, block type by block type, against the time it takes just to
read the bytes the step must read (weights and recurrent state): how far decoding is from the
machine's memory-bandwidth floor, and what that floor allows against another implementation.

    python benchmarks/decode_profile.py              # small, batch 2 and 8
    python benchmarks/decode_profile.py --quick      # small, batch 2 (run_all --quick)
    python benchmarks/decode_profile.py --config=tiny --batches=2,32

At a small decode batch every weight matrix is read once per step for a handful of rows: the
step is bound by memory bandwidth, not FLOPs, on a CPU as on an accelerator. Measured, each in
this process, one after the other, greedy, no eos, MoE backend `sorted`:

  step          decode milliseconds per step of the static engine (`generate`), from the
                difference of two calls making 72 and 8 new tokens (`timings["decode_s"]`,
                the fastest of `--repeats` each), so prefill, dispatch and host work cancel.
  per block     the same for models of one attention block plus 8 blocks of one type (`M`
                Mamba-2, `E` MoE, `*` attention) against the one-attention-block model (`*`:
                embedding, one attention block, final norm, lm_head, sampling): the slope is
                one block's cost; the base is the `head` (lm_head and sampling, one attention).
  floor         bytes a step must read / streaming bandwidth. Bytes: every parameter of a
                Mamba or attention block; of an MoE block the router, the shared expert and
                the routed experts a step touches (the expected number of distinct experts
                among batch x top-k uniform draws: min(E, E (1 - (1 - k/E)^B)));
                lm_head; the Mamba conv and SSM states (read and written), the KV cache up to
                the mean position. Bandwidth: the best of 10 `jnp.sum` over a 256 MiB fp32
                array (the same threads).
  fraction      floor / measured: 1.0 is the bandwidth roofline.

Writes benchmarks/results/decode_profile[_quick].json; `run(quick)` is what
`benchmarks/run_all.py` calls (`decode_floor_fraction`: the full model at the first batch).
"""

from __future__ import annotations

import argparse
import os
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

from nemocascade.generate import generate
from nemocascade.model import ModelConfig, NemotronH

RESULTS = Path(__file__).resolve().parent / "results" / "decode_profile.json"
CONFIGS = {
    "tiny": lambda **kw: ModelConfig.tiny(moe_backend="sorted", **kw),
    "small": lambda **kw: ModelConfig.small(moe_backend="sorted", **kw),
}
PROMPT, SHORT, LONG = 16, 8, 72  # prompt tokens; the two calls' new tokens
COPIES = 8  # blocks of one type in the per-block models
KIND = {"mamba": "M", "moe": "E", "attention": "*", "mlp": "-"}  # Block.kind -> pattern letter


def stream_gbps(mib: int = 256, repeats: int = 10) -> float:
    """Best read bandwidth of an fp32 reduction over `mib` MiB, GB/s (1e9 bytes)."""
    x = jnp.ones((mib * 2**20 // 4,), jnp.float32)
    f = jax.jit(jnp.sum)
    f(x).block_until_ready()
    best = float("inf")
    for _ in range(repeats):
        t = time.perf_counter()
        f(x).block_until_ready()
        best = min(best, time.perf_counter() - t)
    return x.nbytes / best / 1e9


def step_ms(model, batch: int, repeats: int, seed: int = 0) -> float:
    """Decode milliseconds per step: (decode_s of LONG new tokens - of SHORT) / (LONG - SHORT)."""
    rng = np.random.default_rng(seed)
    prompts = [rng.integers(3, model.cfg.vocab_size, PROMPT).tolist() for _ in range(batch)]

    def decode_s(n: int) -> float:
        res = generate(model, prompts, max_new_tokens=n, eos_id=None)
        assert res.timings["decode_steps"] == n, res.timings
        return res.timings["decode_s"]

    decode_s(SHORT), decode_s(LONG)  # compiles
    short = min(decode_s(SHORT) for _ in range(repeats))
    long = min(decode_s(LONG) for _ in range(repeats))
    return 1e3 * (long - short) / (LONG - SHORT)


def _nbytes(tree) -> int:
    return int(sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(tree)))


def bytes_per_step(model, batch: int) -> dict[str, float]:
    """Bytes a decode step of `batch` rows reads: per block type (the first block of each type
    in `model`) and `head` (lm_head and final norm; the embedding rows gathered are negligible)."""
    cfg = model.cfg
    pos = PROMPT + (SHORT + LONG) / 2  # mean cache position over the measured steps
    out: dict[str, float] = {}
    for _, block in model.layer_blocks():
        kind = KIND[block.kind]
        if kind in out:
            continue
        params = nnx.state(block, nnx.Param)
        total = float(_nbytes(params))
        if kind == "E":
            moe = block.mixer
            routed = _nbytes((moe.up_EDF[...], moe.down_EFD[...]))
            e, k = cfg.n_routed_experts, cfg.num_experts_per_tok
            touched = min(e, e * (1.0 - (1.0 - k / e) ** batch))
            total += routed * (touched / e - 1.0)
        elif kind == "M":
            h, p, n = cfg.mamba_num_heads, cfg.mamba_head_dim, cfg.ssm_state_size
            conv_ch = h * p + 2 * cfg.n_groups * n
            total += 2 * 4 * batch * (h * p * n + conv_ch * (cfg.conv_kernel - 1))
        elif kind == "*":
            total += 2 * 4 * batch * pos * cfg.num_key_value_heads * cfg.head_dim
        out[kind] = total
    head = model.lm_head_weight()
    out["head"] = float(head.size * head.dtype.itemsize + _nbytes(nnx.state(model.norm_f)))
    return out


def profile(name: str, batch: int, repeats: int, gbps: float) -> dict:
    make = CONFIGS[name]
    full_cfg = make()
    full = NemotronH(full_cfg, rngs=nnx.Rngs(0))
    nbytes = bytes_per_step(full, batch)
    counts = {kind: full_cfg.pattern.count(kind) for kind in "ME*"}
    step = step_ms(full, batch, repeats)
    base = step_ms(NemotronH(make(pattern="*"), rngs=nnx.Rngs(0)), batch, repeats)
    per_block = {}
    for kind in "ME*":
        pattern = "*" + kind * COPIES
        t = step_ms(NemotronH(make(pattern=pattern), rngs=nnx.Rngs(0)), batch, repeats)
        per_block[kind] = (t - base) / COPIES
    head = base - per_block["*"]

    def floor_ms(nb: float) -> float:
        return 1e3 * nb / (gbps * 1e9)

    parts = {
        kind: {
            "blocks": counts[kind],
            "ms_per_block": per_block[kind],
            "floor_ms_per_block": floor_ms(nbytes[kind]),
            "mb_per_block": nbytes[kind] / 1e6,
        }
        for kind in "ME*"
        if counts[kind]
    }
    parts["head"] = {
        "blocks": 1,
        "ms_per_block": head,
        "floor_ms_per_block": floor_ms(nbytes["head"]),
        "mb_per_block": nbytes["head"] / 1e6,
    }
    for p in parts.values():  # a slope within the noise can come out <= 0
        ms = p["ms_per_block"]
        p["fraction"] = p["floor_ms_per_block"] / ms if ms > 0 else None
    total_bytes = nbytes["head"] + sum(counts[k] * nbytes[k] for k in "ME*")
    floor = floor_ms(total_bytes)
    res = {
        "config": name,
        "batch": batch,
        "step_ms": step,
        "floor_ms": floor,
        "mb_per_step": total_bytes / 1e6,
        "fraction": floor / step,
        "new_tokens_per_s": 1e3 * batch / step,
        "floor_new_tokens_per_s": 1e3 * batch / floor,
        "sum_of_parts_ms": sum(p["blocks"] * p["ms_per_block"] for p in parts.values()),
        "parts": parts,
    }
    print(
        f"[{name} B={batch}] step {res['step_ms']:.2f} ms, floor {floor:.2f} ms "
        f"({res['mb_per_step']:.0f} MB at {gbps:.1f} GB/s): {res['fraction']:.2f} of the "
        f"roofline; parts "
        + ", ".join(
            f"{k} {p['blocks']} x {p['ms_per_block']:.2f} ms (floor {p['floor_ms_per_block']:.2f})"
            for k, p in parts.items()
        ),
        flush=True,
    )
    return res


def run(
    quick: bool = True,
    config: str = "small",
    batches: tuple[int, ...] | None = None,
    repeats: int = 3,
    write: bool = True,
) -> dict:
    batches = batches or ((2,) if quick else (2, 8))
    gbps = stream_gbps()
    print(f"streaming bandwidth: {gbps:.1f} GB/s", flush=True)
    rows = [profile(config, b, repeats, gbps) for b in batches]
    out = {
        "backend": jax.default_backend(),
        "cpu_count": os.cpu_count(),
        "load_average_at_end": os.getloadavg(),
        "stream_gbps": gbps,
        "profiles": rows,
        "decode_floor_fraction": rows[0]["fraction"],
    }
    if write:
        write_result(out, RESULTS.with_name("decode_profile_quick.json") if quick else RESULTS)
    return out


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--config", default="small", choices=sorted(CONFIGS))
    ap.add_argument("--batches", default=None, help="comma-separated decode batch sizes")
    ap.add_argument("--repeats", type=int, default=3)
    a = ap.parse_args(argv)
    batches = tuple(int(b) for b in a.batches.split(",")) if a.batches else None
    run(quick=a.quick, config=a.config, batches=batches, repeats=a.repeats)


if __name__ == "__main__":
    main()
