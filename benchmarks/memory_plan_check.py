"""The params tool's per-device memory plan against XLA's compiled memory of the same program:
the sharded SFT step of `nano_30b_a3b` (layer scan, blockwise attention, remat per block) on 8
simulated CPU devices, compiled from abstract shapes (nothing is allocated), for meshes with and
without a context axis.

    python benchmarks/memory_plan_check.py            # the 52-layer model, three meshes
    python benchmarks/memory_plan_check.py --quick    # the first 8 layers

For each row, `nemocascade.tools.params.memory_plan` (the plan printed by `python -m
nemocascade.tools.params --mesh=... --batch=... --seq=...`) is set beside the compiled
program's `memory_analysis()` per device:

  state      plan: parameters + AdamW state + model state; compiled: the arguments (the train
             state, donated, plus the batch's few int32 arrays)
  transient  plan: gradients + fsdp / context gathers + activations; compiled: temp bytes

and their ratios (compiled / plan). The first mesh is compiled again at 1/8 of its tokens, which
splits the compiled temp bytes into a part that does not grow with the tokens (`intercept`:
gradients, optimizer-update temporaries, gathers) and a part per token (`per_token`), each set
beside the plan's. XLA:CPU's buffer assignment is not the accelerators' (its
fusion and rematerialisation decisions differ), so the ratio says how far the plan is from one
real compiler's answer for the same program, not a bound for TPU or GPU. Writes
benchmarks/results/memory_plan_check[_quick].json (`plan_state_ratio`, `plan_transient_ratio`:
the worst row's ratios).
"""

from __future__ import annotations

import argparse
from pathlib import Path

import compile_time
from results_io import write_result

RESULTS = Path(__file__).resolve().parent / "results" / "memory_plan_check.json"
# (mesh, global batch, sequence): data-parallel, then the context axis at 2 and 4.
ROWS = (
    ("fsdp=2,expert=4", 8, 1024),
    ("fsdp=2,expert=2,context=2", 4, 2048),
    ("expert=2,context=4", 2, 4096),
)
# The MoE's `sorted` backend: XLA:CPU lowers `ragged_dot` (the default backend) to a dense
# contraction over every local expert, which no accelerator does (README, section 4).
MODEL = {
    "remat": "block",
    "scan_layers": True,
    "attention_impl": "blockwise",
    "moe_backend": "sorted",
}
LOSS_CHUNK = 512  # chunked cross-entropy (the paper config's SFT chunks its loss too)


def check(mesh_spec: str, batch: int, seq: int, layers: int | None) -> dict:
    compile_time._set_devices(8)  # before jax is imported
    from nemocascade.model import ModelConfig
    from nemocascade.tools.params import memory_plan, parse_mesh

    compiled = compile_time.measure(
        mesh_spec=mesh_spec, batch=batch, seq=seq, layers=layers, loss_chunk=LOSS_CHUNK, **MODEL
    )
    cfg = ModelConfig.nano_30b_a3b(**MODEL)
    if layers:
        cfg = cfg.replace(pattern=cfg.pattern[:layers])
    plan = memory_plan(
        cfg,
        parse_mesh(mesh_spec),
        batch=batch,
        seq=seq,
        remat=MODEL["remat"],
        loss_chunk=LOSS_CHUNK,
    )
    b = plan["per_device_bytes"]
    plan_state = b["params"] + b["optimizer"] + b["model_state"]
    plan_transient = b["grads"] + b["fsdp_gather"] + b["context_gather"] + b["activations"]
    got_state = compiled["per_device_argument_bytes"]
    got_transient = compiled["per_device_temp_bytes"]
    return {
        "mesh": plan["mesh"],
        "layers": cfg.num_layers,
        "batch": batch,
        "seq": seq,
        "tokens_per_device": plan["tokens_per_device"],
        "plan_state_gb": round(plan_state / 1e9, 3),
        "compiled_state_gb": round(got_state / 1e9, 3),
        "state_ratio": round(got_state / plan_state, 3),
        "plan_transient_gb": round(plan_transient / 1e9, 3),
        "compiled_transient_gb": round(got_transient / 1e9, 3),
        "transient_ratio": round(got_transient / plan_transient, 3),
        "plan_activations_gb": round(b["activations"] / 1e9, 3),
        "compile_s": compiled["compile_s"],
    }


def run(quick: bool = False, write: bool = True) -> dict:
    rows = []
    for mesh_spec, batch, seq in ROWS:
        r = check(mesh_spec, batch, seq, 8 if quick else None)
        rows.append(r)
        print(
            f"{mesh_spec:<28} {batch} x {seq}, {r['layers']} layers: state plan "
            f"{r['plan_state_gb']:.2f} GB vs compiled {r['compiled_state_gb']:.2f} "
            f"({r['state_ratio']:.2f}x); transient plan {r['plan_transient_gb']:.2f} GB vs "
            f"compiled {r['compiled_transient_gb']:.2f} ({r['transient_ratio']:.2f}x)"
        )
    far = max(rows, key=lambda r: abs(r["transient_ratio"] - 1))
    mesh_spec, batch, seq = ROWS[0]
    small = check(mesh_spec, batch, seq // 8, 8 if quick else None)
    big = rows[0]
    dt = big["tokens_per_device"] - small["tokens_per_device"]
    slope = (big["compiled_transient_gb"] - small["compiled_transient_gb"]) / dt
    plan_slope = (big["plan_transient_gb"] - small["plan_transient_gb"]) / dt
    split = {
        "mesh": mesh_spec,
        "tokens_per_device": [small["tokens_per_device"], big["tokens_per_device"]],
        "compiled_intercept_gb": round(
            big["compiled_transient_gb"] - slope * big["tokens_per_device"], 2
        ),
        "plan_intercept_gb": round(
            big["plan_transient_gb"] - plan_slope * big["tokens_per_device"], 2
        ),
        "compiled_per_token_mb": round(slope * 1e3, 3),
        "plan_per_token_mb": round(plan_slope * 1e3, 3),
    }
    print(f"transient split over tokens per device ({mesh_spec}): {split}")
    res = {
        "rows": rows,
        "transient_split": split,
        "plan_state_ratio": max((r["state_ratio"] for r in rows), key=lambda x: abs(x - 1)),
        "plan_transient_ratio": far["transient_ratio"],
    }
    if write:
        write_result(res, RESULTS.with_name(RESULTS.stem + ("_quick" if quick else "") + ".json"))
    return res


if __name__ == "__main__":
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--quick", action="store_true", help="the first 8 layers only")
    run(quick=p.parse_args().quick)
