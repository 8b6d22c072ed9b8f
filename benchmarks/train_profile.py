"""Where an SFT train step's time goes on XLA:CPU: per model part (Mamba-2, MoE, attention,
block norms, embedding and lm_head, loss, optimizer) and per kind of work (matmul, elementwise,
reduction, sort / gather / scatter, data movement), from a profile of the compiled step.

    python benchmarks/train_profile.py            # small, batch 8 x 512 (the train_step.py size)
    python benchmarks/train_profile.py --quick    # small, batch 2 x 256
    python benchmarks/train_profile.py --config=tiny --batch=2 --seq=64

How it is measured: the step `train_step.py` times (`ours_step`: `sft_step`, MoE backend
`sorted`, loss chunked over 1024 tokens, AdamW) is compiled, run once, then `--steps` steps run
under `jax.profiler.trace`. XLA:CPU records one event per executed thunk (a fusion, a library
matmul, a sort, ...) named after its HLO instruction; the events of the step's module are summed
per instruction (control-flow thunks, `while` / `conditional` / `call`, are left out: their
bodies' thunks are counted themselves). Each instruction is then labelled from the compiled
HLO text:

  kind       matmul (a dot or convolution, alone or fused with elementwise work), sort, gather /
             scatter (incl. dynamic-update-slice), reduction (a reduce without a dot), copy
             (copy / transpose / concatenate / pad / slice without arithmetic), elementwise
             (the rest: loop fusions of arithmetic);
  part       the innermost source frame of the instruction that is in our model, loss or
             optimizer code: mamba2.py -> mamba2, moe*.py -> moe, attention.py -> attention,
             block.py -> block (pre-norm, residual), nemotron_h.py -> embed/head, losses.py ->
             loss, optim.py / optax -> optimizer; `layers.py` (shared helpers) defers to its
             caller;
  pass       forward (`jvp(` in the op name without `transpose(`), backward (`transpose(`),
             update (neither: the optimizer, the routing-bias update).

Reported: seconds per step (wall, and the sum of thunk times, which can exceed the wall when
thunks run concurrently on the two cores), the share of thunk time per part x kind, and the
matmul thunks' achieved FLOP/s (model matmul FLOPs, `flops.py`, / matmul thunk time) against the
`jnp.dot` peak: whether the step is slow in its matmuls or around them.

Writes benchmarks/results/train_profile[_quick].json.
"""

from __future__ import annotations

import argparse
import collections
import os
import re
import sys
import tempfile
import time
from pathlib import Path

import jax
import jax.numpy as jnp
from flax import nnx

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from flops import active_matmul_params, matmul_peak_flops, model_flops_per_token
from results_io import write_result
from train_step import PEAK_SIZES, make_batch, ours_step

from nemocascade.model import ModelConfig, NemotronH

RESULTS = Path(__file__).resolve().parent / "results" / "train_profile.json"
CONFIGS = {
    "tiny": lambda: ModelConfig.tiny(moe_backend="sorted"),
    "small": lambda: ModelConfig.small(moe_backend="sorted"),
}
TOP = 25  # slowest instructions (and slowest non-matmul ones) kept in the JSON
CONTROL = {"while", "conditional", "call"}
PART_OF_FILE = [  # (file name pattern, part); first match from the innermost frame outwards
    (r"/model/moe[a-z_]*\.py$", "moe"),
    (r"/model/mamba2\.py$", "mamba2"),
    (r"/model/attention\.py$", "attention"),
    (r"/model/block\.py$", "block"),
    (r"/model/nemotron_h\.py$", "embed/head"),
    (r"/train/losses\.py$", "loss"),
    (r"(/train/optim\.py|/optax/)", "optimizer"),
]
KINDS = ("matmul", "elementwise", "reduction", "sort", "gather/scatter", "copy")
MOVES = {
    "copy",
    "transpose",
    "concatenate",
    "pad",
    "slice",
    "bitcast",
    "reshape",
    "broadcast",
    "parameter",
    "constant",
    "tuple",
    "get-tuple-element",
    "iota",
    "convert",
}

_INSTR = re.compile(r"^\s*(?:ROOT )?%([\w.\-]+) = .*? ([a-z][\w\-]*)\(")
_COMP = re.compile(r"^(?:ENTRY )?%([\w.\-]+) ")
_CALLS = re.compile(r"(?:calls|to_apply|body|condition)=%([\w.\-]+)")
_OPNAME = re.compile(r'op_name="([^"]*)"')
_FRAME = re.compile(r"stack_frame_id=(\d+)")


def parse_hlo(text: str) -> dict:
    """Instructions of a compiled HLO module: name -> {opcode, calls, op_name, frame};
    computation -> its opcodes and the computations it calls; the source-frame tables (file of
    each frame, parent frame)."""
    instrs, comps, callees, files, locs, frames = {}, {}, {}, {}, {}, {}
    section, comp = None, None
    for line in text.splitlines():
        if line in ("FileNames", "FunctionNames", "FileLocations", "StackFrames"):
            section = line
            continue
        if section and re.match(r"^\d+ ", line):
            idx, rest = line.split(" ", 1)
            if section == "FileNames":
                files[int(idx)] = rest.strip('"')
            elif section == "FileLocations":
                locs[int(idx)] = int(re.search(r"file_name_id=(\d+)", rest).group(1))
            elif section == "StackFrames":
                loc = int(re.search(r"file_location_id=(\d+)", rest).group(1))
                # printed parent = parent id + 1 (1: no parent)
                parent = int(re.search(r"parent_frame_id=(\d+)", rest).group(1)) - 1
                frames[int(idx)] = (loc, parent)
            continue
        section = None
        m = _COMP.match(line)
        if m and line.rstrip().endswith("{"):
            comp = m.group(1)
            comps[comp], callees[comp] = [], []
            continue
        m = _INSTR.match(line)
        if m and comp is not None:
            name, opcode = m.groups()
            op_name = _OPNAME.search(line)
            frame = _FRAME.search(line)
            calls = _CALLS.findall(line)
            instrs[name] = {
                "opcode": opcode,
                "calls": calls,
                "op_name": op_name.group(1) if op_name else "",
                "frame": int(frame.group(1)) if frame else 0,
            }
            comps[comp].append(opcode)
            callees[comp].extend(calls)
    frame_file = {i: files.get(locs.get(loc, 0), "") for i, (loc, _) in frames.items()}
    frame_parent = {i: parent for i, (_, parent) in frames.items()}
    return {
        "instrs": instrs,
        "comps": comps,
        "callees": callees,
        "frame_file": frame_file,
        "frame_parent": frame_parent,
    }


def _opcodes(hlo: dict, comp: str, seen: set | None = None) -> set[str]:
    """Every opcode in a computation and the computations it calls."""
    seen = set() if seen is None else seen
    if comp in seen:
        return set()
    seen.add(comp)
    out = set(hlo["comps"].get(comp, ()))
    for callee in hlo["callees"].get(comp, ()):
        out |= _opcodes(hlo, callee, seen)
    return out


def kind_of(hlo: dict, name: str) -> str:
    ins = hlo["instrs"][name]
    ops = {ins["opcode"]}
    for callee in ins["calls"]:
        ops |= _opcodes(hlo, callee)
    if ops & {"dot", "convolution"}:
        return "matmul"
    if "sort" in ops:
        return "sort"
    if ops & {"gather", "scatter", "dynamic-update-slice", "dynamic-slice"}:
        return "gather/scatter"
    if ops & {"reduce", "reduce-window", "all-reduce"}:
        return "reduction"
    if ops <= MOVES | {"fusion"}:
        return "copy"
    return "elementwise"


def part_of(hlo: dict, name: str) -> str:
    frame, seen = hlo["instrs"][name]["frame"], set()
    while frame > 0 and frame not in seen:
        seen.add(frame)
        path = hlo["frame_file"].get(frame, "")
        for pattern, part in PART_OF_FILE:
            if re.search(pattern, path):
                return part
        frame = hlo["frame_parent"].get(frame, 0)
    return "other"


def pass_of(op_name: str) -> str:
    if "transpose(" in op_name:
        return "backward"
    return "forward" if "jvp(" in op_name else "update"


def thunk_times(trace_dir: str, module: str) -> dict[str, float]:
    """Summed seconds per HLO instruction of `module` over every traced execution."""
    from jax.profiler import ProfileData

    out: dict[str, float] = collections.defaultdict(float)
    for path in Path(trace_dir).rglob("*.xplane.pb"):
        for plane in ProfileData.from_file(str(path)).planes:
            for line in plane.lines:
                for ev in line.events:
                    stats = dict(ev.stats)
                    if stats.get("hlo_module") == module and "hlo_op" in stats:
                        out[stats["hlo_op"]] += ev.duration_ns * 1e-9
    return dict(out)


def profile(config: str, batch: int, seq: int, steps: int) -> dict:
    cfg = CONFIGS[config]()
    model = NemotronH(cfg, rngs=nnx.Rngs(0))
    step, _, state = ours_step(model)
    jbatch = {k: jnp.asarray(v) for k, v in make_batch(cfg, batch, seq).items()}
    compiled = step.lower(state, jbatch).compile()
    text = compiled.as_text()
    module = re.match(r"HloModule (\S+?),", text).group(1)
    hlo = parse_hlo(text)
    state, m = step(state, jbatch)  # warm-up
    jax.block_until_ready(m)
    with tempfile.TemporaryDirectory() as trace_dir:
        t0 = time.perf_counter()
        with jax.profiler.trace(trace_dir):
            for _ in range(steps):
                state, m = step(state, jbatch)
                jax.block_until_ready(m)
        wall = (time.perf_counter() - t0) / steps
        times = thunk_times(trace_dir, module)
    table: dict[tuple[str, str, str], float] = collections.defaultdict(float)
    top = []
    unknown = 0.0
    for name, s in times.items():
        ins = hlo["instrs"].get(name)
        if ins is None:
            unknown += s
            continue
        if ins["opcode"] in CONTROL:
            continue
        key = (part_of(hlo, name), kind_of(hlo, name), pass_of(ins["op_name"]))
        table[key] += s / steps
        top.append(
            {
                "instr": name,
                "s": s / steps,
                "part": key[0],
                "kind": key[1],
                "pass": key[2],
                "op_name": ins["op_name"],
            }
        )
    thunk_s = sum(table.values())
    flops = model_flops_per_token(cfg, seq)
    matmul_s = sum(s for (_, k, _), s in table.items() if k == "matmul")
    peak = max(matmul_peak_flops(n) for n in PEAK_SIZES)
    tokens = batch * seq

    res = {
        "config": config,
        "batch": batch,
        "seq": seq,
        "steps": steps,
        "wall_s_per_step": wall,
        "thunk_s_per_step": thunk_s,
        "unmatched_thunk_s": unknown / steps,
        "by_part_s": _group(table, 0),
        "by_kind_s": _group(table, 1),
        "by_pass_s": _group(table, 2),
        "by_part_kind_s": _group(table, 0, 1),
        "top_instructions": sorted(top, key=lambda t: -t["s"])[:TOP],
        "top_non_matmul_instructions": sorted(
            (t for t in top if t["kind"] != "matmul"), key=lambda t: -t["s"]
        )[:TOP],
        **_spread(top),
        "matmul_peak_flops": peak,
        "model_flops_per_step": flops["total"] * tokens,
        "mfu": flops["total"] * tokens / wall / peak,
        "matmul_time_fraction": matmul_s / thunk_s,
        "matmul_thunk_flops_per_s": flops["matmul"] * tokens / matmul_s if matmul_s else None,
    }
    mm = active_matmul_params(cfg)
    part_flops = {  # model FLOPs each part's matmul thunks compute (the loss holds the lm_head)
        "mamba2": 6 * mm["mamba"] * tokens + flops["ssd"] * tokens,
        "moe": 6 * mm["moe"] * tokens,
        "attention": 6 * mm["attention"] * tokens + flops["attention"] * tokens,
        "loss": 6 * mm["lm_head"] * tokens,
    }
    pairs = res["by_part_kind_s"]
    res["matmul_gflops_by_part"] = {
        part: f / pairs[f"{part}/matmul"] / 1e9
        for part, f in part_flops.items()
        if pairs.get(f"{part}/matmul")
    }
    res["matmul_thunk_fraction_of_peak"] = (
        res["matmul_thunk_flops_per_s"] / peak if matmul_s else None
    )
    return res


def _spread(top: list[dict]) -> dict[str, int]:
    """How concentrated the non-matmul time is: its instruction count and how many of the
    slowest ones make half of it."""
    rest = sorted((t["s"] for t in top if t["kind"] != "matmul"), reverse=True)
    acc, half, total = 0.0, 0, sum(rest)
    while rest and acc < total / 2:
        acc += rest[half]
        half += 1
    return {"non_matmul_instructions": len(rest), "non_matmul_instructions_for_half": half}


def _group(table: dict, *idx: int) -> dict[str, float]:
    """Seconds summed over the (part, kind, pass) keys' fields `idx` ("part/kind" for 0, 1),
    slowest first."""
    out: dict[str, float] = collections.defaultdict(float)
    for key, s in table.items():
        out["/".join(key[i] for i in idx)] += s
    return dict(sorted(out.items(), key=lambda kv: -kv[1]))


def print_report(res: dict) -> None:
    total = res["thunk_s_per_step"]
    print(
        f"[{res['config']} {res['batch']} x {res['seq']}] step {res['wall_s_per_step']:.2f} s wall,"
        f" {total:.2f} s of thunks; MFU {res['mfu']:.3f} of {res['matmul_peak_flops'] / 1e9:.0f}"
        f" GFLOP/s; matmul thunks at {res['matmul_thunk_fraction_of_peak'] or 0:.2f} of peak"
    )
    for title, key in (("pass", "by_pass_s"), ("part", "by_part_s"), ("kind", "by_kind_s")):
        print(
            f"  by {title}: "
            + ", ".join(f"{k} {100 * s / total:.1f}%" for k, s in res[key].items())
        )
    print(
        "  matmul GFLOP/s by part: "
        + ", ".join(f"{k} {v:.0f}" for k, v in res["matmul_gflops_by_part"].items())
    )
    print(
        "  part/kind (>= 1%): "
        + ", ".join(
            f"{k} {100 * s / total:.1f}%"
            for k, s in res["by_part_kind_s"].items()
            if s >= 0.01 * total
        )
    )


def run(
    quick: bool = True,
    config: str = "small",
    batch: int | None = None,
    seq: int | None = None,
    steps: int = 3,
    write: bool = True,
) -> dict:
    batch = batch or (2 if quick else 8)
    seq = seq or (256 if quick else 512)
    res = profile(config, batch, seq, steps)
    res |= {
        "backend": jax.default_backend(),
        "cpu_count": os.cpu_count(),
        "load_average_at_end": os.getloadavg(),
    }
    print_report(res)
    if write:
        write_result(res, RESULTS.with_name("train_profile_quick.json") if quick else RESULTS)
    return res


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--config", default="small", choices=sorted(CONFIGS))
    ap.add_argument("--batch", type=int, default=None)
    ap.add_argument("--seq", type=int, default=None)
    ap.add_argument("--steps", type=int, default=3)
    a = ap.parse_args(argv)
    run(quick=a.quick, config=a.config, batch=a.batch, seq=a.seq, steps=a.steps)


if __name__ == "__main__":
    main()
