"""Runs the CPU benchmarks and writes one JSON with their headline numbers.

    python benchmarks/run_all.py --quick --json=/tmp/bench.json     # a few minutes on CPU
    python benchmarks/run_all.py --json=benchmarks/results/all.json # the full sizes (long)
    python benchmarks/run_all.py --quick --only=train_step,moe

Each benchmark module's `run(quick)` is called in this process, in order (context_parallel,
compile_time and memory_plan_check run in a child process because they need simulated devices
set before jax is imported). A benchmark that is missing or fails is reported with `null` for
its keys and its error under `errors`, and the others still run. Headline keys:

  train_mfu, train_speedup_vs_transformers, prefill_speedup_vs_transformers,
  matmul_peak_gflops                                                           (train_step.py)
  decode_speedup_vs_transformers (and generate's prefill speedup as generate_prefill_speedup)
                                                                               (generate.py)
  decode_floor_fraction (bandwidth floor / measured decode step)              (decode_profile.py)
  train_matmul_time_fraction (share of the step's thunk time in matmuls)      (train_profile.py)
  moe_best_vs_equal_flop_dense                                                 (moe.py)
  logprob_peak_memory_reduction                                                (logprob_memory.py)
  attention_peak_memory_reduction                                              (attention_memory.py)
  remat_block_temp_vs_none, remat_block_time_vs_none                           (remat.py)
  continuous_batching_speedup                                      (continuous_batching.py)
  sampler_trainer_logprob_max_abs_diff_fp32, sampler_trainer_tokens_off_band_bf16
                                                                               (logprob_mismatch.py)
  context_parallel_max_logit_err, context_parallel_max_rel_grad_err          (context_parallel.py)
  compile_lower_s, compile_s, compile_s_nano_52_layers (52 layers, layer scan) (compile_time.py)
  plan_state_ratio, plan_transient_ratio (compiled / planned bytes per device)
                                                                      (memory_plan_check.py)

`prefill_speedup_vs_transformers` is the train_step benchmark's (a full forward over a batch);
generate.py's cached-prefill speedup is kept as `generate_prefill_speedup_vs_transformers`.
Both time transformers in a worker process of its own (`side_by_side.py`):
`transformers_separate_process` is true when every comparison that ran says so.
"""

from __future__ import annotations

import argparse
import importlib
import json
import subprocess
import sys
import time
import traceback
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))
sys.path.insert(0, str(HERE))

# benchmark -> {headline key: key in that benchmark's result}
HEADLINES = {
    "train_step": {
        "train_mfu": "train_mfu",
        "train_speedup_vs_transformers": "train_speedup_vs_transformers",
        "prefill_speedup_vs_transformers": "prefill_speedup_vs_transformers",
        "matmul_peak_gflops": "matmul_peak_gflops",
    },
    "generate": {
        "decode_speedup_vs_transformers": "decode_speedup_vs_transformers",
        "generate_prefill_speedup_vs_transformers": "prefill_speedup_vs_transformers",
    },
    "decode_profile": {"decode_floor_fraction": "decode_floor_fraction"},
    "train_profile": {"train_matmul_time_fraction": "matmul_time_fraction"},
    "moe": {"moe_best_vs_equal_flop_dense": "moe_best_vs_equal_flop_dense"},
    "logprob_memory": {"logprob_peak_memory_reduction": "logprob_peak_memory_reduction"},
    "attention_memory": {"attention_peak_memory_reduction": "attention_peak_memory_reduction"},
    "remat": {
        "remat_block_temp_vs_none": ("policies", "block", "temp_vs_none"),
        "remat_block_time_vs_none": ("policies", "block", "time_vs_none"),
    },
    "continuous_batching": {"continuous_batching_speedup": "continuous_batching_speedup"},
    "logprob_mismatch": {
        "sampler_trainer_logprob_max_abs_diff_fp32": "sampler_trainer_logprob_max_abs_diff_fp32",
        "sampler_trainer_tokens_off_band_bf16": "sampler_trainer_tokens_off_band_bf16",
    },
    "context_parallel": {
        "context_parallel_max_logit_err": "context_parallel_max_logit_err",
        "context_parallel_max_rel_grad_err": "context_parallel_max_rel_grad_err",
    },
    "compile_time": {
        "compile_lower_s": "compile_lower_s",
        "compile_s": "compile_s",
        "compile_s_nano_52_layers": "compile_s_nano_52_layers",
    },
    "memory_plan_check": {
        "plan_state_ratio": "plan_state_ratio",
        "plan_transient_ratio": "plan_transient_ratio",
    },
}
# the issues' goals: key -> (comparison, target, issue). `goals_table` marks each key of a run
GOALS = {
    "decode_speedup_vs_transformers": (">=", 10.0, 19),
    "prefill_speedup_vs_transformers": (">=", 1.5, 19),
    "train_speedup_vs_transformers": (">=", 1.5, 19),
    "train_mfu": (">=", 0.55, 19),
    "continuous_batching_speedup": (">=", 2.0, 19),
    "transformers_separate_process": ("==", True, 19),
    "compile_s_nano_52_layers": ("<=", 60.0, 14),
    "sampler_trainer_logprob_max_abs_diff_fp32": ("<=", 1e-5, 20),
    "sampler_trainer_tokens_off_band_bf16": ("<=", 1e-3, 20),
    "context_parallel_max_logit_err": ("<=", 1e-5, 18),
    "context_parallel_max_rel_grad_err": ("<=", 1e-5, 18),
}
MET = {True: "yes", False: "**no**", None: "-"}
# run in a child process (simulated devices are set before jax is imported): extra arguments
# and the name of the JSON they write. compile_time: the 52-layer model with the layer scan, in
# --quick too (~2 CPU-minutes)
SUBPROCESS = {
    "context_parallel": ([], "context_parallel"),
    "compile_time": (["--scan_layers", "--full_depth"], "compile_time_scan"),
    "memory_plan_check": ([], "memory_plan_check"),
}


def _get(result: dict, key):
    for k in key if isinstance(key, tuple) else (key,):
        result = result[k]
    return result


def _run_subprocess(name: str, quick: bool) -> dict:
    """Runs `benchmarks/<name>.py` in a child process; returns the JSON it wrote."""
    mod = importlib.import_module(name)
    args, stem = SUBPROCESS[name]
    out = mod.RESULTS.with_name(f"{stem}_quick.json" if quick else f"{stem}.json")
    cmd = [sys.executable, str(HERE / f"{name}.py"), *args] + (["--quick"] if quick else [])
    proc = subprocess.run(cmd, capture_output=True, text=True, check=False)
    sys.stdout.write(proc.stdout)
    if proc.returncode:
        raise RuntimeError(f"{name}.py exited {proc.returncode}: {proc.stderr[-1500:]}")
    return json.loads(out.read_text())


def run_all(quick: bool, only: list[str] | None = None) -> dict:
    """Runs the benchmarks (all, or `only`).

    Returns {headline keys..., details, errors, seconds}.
    """
    names = only or list(HEADLINES)
    unknown = sorted(set(names) - set(HEADLINES))
    if unknown:
        raise ValueError(f"run_all: unknown benchmarks {unknown}; choose from {list(HEADLINES)}")
    out = {k: None for name in HEADLINES for k in HEADLINES[name]}
    out.update(quick=quick, details={}, errors={}, seconds={})
    for name in names:
        print(f"\n===== {name} =====", flush=True)
        t0 = time.perf_counter()
        try:
            if name in SUBPROCESS:
                result = _run_subprocess(name, quick)
            else:
                result = importlib.import_module(name).run(quick=quick)
            for key, src in HEADLINES[name].items():
                out[key] = _get(result, src)
            out["details"][name] = result
        except Exception as err:  # noqa: BLE001  (one failing benchmark must not stop the rest)
            out["errors"][name] = f"{type(err).__name__}: {err}"
            traceback.print_exc()
        out["seconds"][name] = round(time.perf_counter() - t0, 1)
    compared = [r for n, r in out["details"].items() if n in ("train_step", "generate")]
    out["transformers_separate_process"] = (
        all(r.get("transformers_separate_process") is True for r in compared) if compared else None
    )
    return out


def goals_table(res: dict) -> tuple[dict, str]:
    """({key: {value, goal, met}} for every headline key, the same as a markdown table). `met`
    is None for a key without a goal or without a value (its benchmark failed or did not run)."""
    goals, lines = {}, ["| key | value | goal | met |", "|---|---|---|---|"]
    for key, value in res.items():
        if key in ("details", "errors", "seconds", "quick", "goals"):
            continue
        cmp, target, issue = GOALS.get(key, (None, None, None))
        met = None
        if cmp is not None and value is not None:
            met = {">=": value >= target, "<=": value <= target, "==": value == target}[cmp]
        goals[key] = {"value": value, "goal": f"{cmp} {target}" if cmp else None, "met": met}
        shown = f"{value:.4g}" if isinstance(value, float) else str(value)
        goal = "-"
        if cmp is not None:
            goal = f"{cmp} {target if isinstance(target, bool) else format(target, 'g')}"
            goal += f" (issue {issue})"
        lines.append(f"| `{key}` | {shown} | {goal} | {MET[met]} |")
    return goals, "\n".join(lines)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--quick", action="store_true")
    p.add_argument("--json", required=True, help="output file")
    p.add_argument("--only", default=None, help="comma list of " + ",".join(HEADLINES))
    a = p.parse_args()
    res = run_all(a.quick, a.only.split(",") if a.only else None)
    res["goals"], table = goals_table(res)
    Path(a.json).parent.mkdir(parents=True, exist_ok=True)
    Path(a.json).write_text(json.dumps(res, indent=2, default=str) + "\n")
    Path(a.json).with_suffix(".md").write_text(table + "\n")
    print("\n===== headline against the goals =====")
    print(table)
    if res["errors"]:
        print(f"errors: {res['errors']}")
    print(f"wrote {a.json}")


if __name__ == "__main__":
    main()
