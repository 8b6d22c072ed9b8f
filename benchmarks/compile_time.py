"""Lower + compile time of the full SFT train step of the 52-layer `nano_30b_a3b` on simulated CPU
devices, from abstract shapes only (the 30B state is never allocated).

    python benchmarks/compile_time.py                       # fsdp=2 x expert=4, batch 8 x 128
    python benchmarks/compile_time.py --scan_layers         # the same, layers as lax.scan bodies
    python benchmarks/compile_time.py --quick               # the first 8 layers only, 8 x 64
    python benchmarks/compile_time.py --mesh=fsdp=4,expert=2 --batch=8 --seq=256 --remat=block

The script sets `XLA_FLAGS=--xla_force_host_platform_device_count=<devices>` before importing
jax (so run it as its own process). The step is `nemocascade.train.sft.sft_step` (AdamW,
clipping, MoE bias update) jitted with the train state's shardings from the logical-axis table,
the batch sharded over the data-like axes and the state donated; the MoE layers run expert
parallel over the mesh's `expert` axis (`NemotronH(cfg, mesh=mesh)`). Timed phases:

  trace_lower_s   `jax.jit(step).lower(abstract_state, abstract_batch)` (tracing + StableHLO)
  compile_s       `.compile()` (XLA:CPU SPMD partitioning, optimisation, codegen)
  compile_cpu_s   the CPU seconds of this process during `.compile()` (all threads): steadier
                  than wall time on a machine shared with other jobs

and the compiled program's per-device `memory_analysis()` (argument / output / temp bytes).
By default the layers are a Python loop (52 unrolled blocks); compile time grows with the layer
count, so the script compiles the first 8 blocks and then all 52 to show the growth (`--quick`:
8 only). `--scan_layers` sets `ModelConfig.scan_layers`: the repeated block units run as
`lax.scan` bodies over stacked parameters (`layer_scan.layer_segments`: 3 block bodies in the
program for the 52 layers, 23 copies of M*E with the attention in 6). Writes
benchmarks/results/compile_time[_scan][_quick].json with `compile_s_nano_52_layers` (the full
model's compile seconds, when measured); `run(quick)` returns the dict.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

from results_io import write_result

RESULTS = Path(__file__).resolve().parent / "results" / "compile_time.json"


def _set_devices(n: int) -> None:
    if "jax" in sys.modules:
        import jax

        if jax.device_count() < n:
            raise RuntimeError(
                f"compile_time: jax was imported with {jax.device_count()} devices; "
                f"run this script as its own process (needs {n})"
            )
        return
    flags = os.environ.get("XLA_FLAGS", "")
    if "xla_force_host_platform_device_count" not in flags:
        os.environ["XLA_FLAGS"] = f"{flags} --xla_force_host_platform_device_count={n}".strip()
    os.environ.setdefault("JAX_PLATFORMS", "cpu")


def measure(
    mesh_spec: str = "fsdp=2,expert=4",
    batch: int = 8,
    seq: int = 128,
    remat: str = "block",
    moe_backend: str = "ragged_dot",
    layers: int | None = None,
    scan_layers: bool = False,
    loss_chunk: int = 0,
    **model_kw,
) -> dict:
    """Lowers and compiles the sharded SFT step of nano_30b_a3b (first `layers` blocks if given;
    `model_kw`: other ModelConfig fields, e.g. attention_impl; `loss_chunk`: the step's chunked
    cross-entropy, 0 for the full [tokens, V] logits)."""
    n_dev = 1
    for part in filter(None, mesh_spec.split(",")):
        n_dev *= int(part.partition("=")[2])
    _set_devices(n_dev)  # before jax is imported
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    from nemocascade.tools.params import parse_mesh

    sizes = parse_mesh(mesh_spec)

    import functools

    import jax
    import jax.numpy as jnp
    from flax import nnx

    from nemocascade.model import ModelConfig, NemotronH
    from nemocascade.model.layer_scan import layer_segments
    from nemocascade.sharding import MeshConfig, batch_sharding, make_mesh
    from nemocascade.train.loop import full_shardings
    from nemocascade.train.optim import OptimConfig, make_optimizer
    from nemocascade.train.sft import sft_step
    from nemocascade.train.state import create_train_state

    cfg = ModelConfig.nano_30b_a3b(
        remat=remat, moe_backend=moe_backend, scan_layers=scan_layers, **model_kw
    )
    if layers:
        cfg = cfg.replace(pattern=cfg.pattern[:layers])
    mesh = make_mesh(MeshConfig(**sizes), jax.devices()[:n_dev])
    optim = OptimConfig()
    tx = make_optimizer(optim, total_steps=1000)
    holder = {}

    def init():
        model = NemotronH(cfg, rngs=nnx.Rngs(0), mesh=mesh)
        graphdef, state = create_train_state(model, tx, jax.random.PRNGKey(0))
        holder["graphdef"] = graphdef
        return state

    t0 = time.perf_counter()
    abstract = jax.eval_shape(init)
    eval_shape_s = time.perf_counter() - t0
    shardings = full_shardings(abstract, mesh)
    bsh = batch_sharding(mesh, 2)
    abatch = {
        k: jax.ShapeDtypeStruct((batch, seq), dt, sharding=bsh)
        for k, dt in (
            ("input_ids", jnp.int32),
            ("targets", jnp.int32),
            ("loss_mask", jnp.float32),
            ("segment_ids", jnp.int32),
            ("positions", jnp.int32),
        )
    }
    astate = jax.tree.map(
        lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), abstract, shardings
    )
    step = jax.jit(
        functools.partial(
            sft_step,
            graphdef=holder["graphdef"],
            tx=tx,
            lr_fn=lambda s: optim.lr,
            moe_bias_rate=optim.moe_bias_rate,
            loss_chunk_size=loss_chunk,
        ),
        in_shardings=(shardings, {k: bsh for k in abatch}),
        out_shardings=(shardings, None),
        donate_argnums=0,
    )
    t0 = time.perf_counter()
    lowered = step.lower(astate, abatch)
    lower_s = time.perf_counter() - t0
    t0, c0 = time.perf_counter(), time.process_time()
    compiled = lowered.compile()
    compile_s, compile_cpu_s = time.perf_counter() - t0, time.process_time() - c0
    mem = compiled.memory_analysis()
    return {
        "model": "nano_30b_a3b",
        "layers": cfg.num_layers,
        "mesh": sizes,
        "devices": n_dev,
        "batch": batch,
        "seq": seq,
        "remat": remat,
        "moe_backend": moe_backend,
        "scan_layers": scan_layers,
        "block_bodies": (
            sum(len(s.unit) for s in layer_segments(cfg.pattern)) if scan_layers else cfg.num_layers
        ),
        "eval_shape_s": round(eval_shape_s, 2),
        "trace_lower_s": round(lower_s, 2),
        "compile_s": round(compile_s, 2),
        "compile_cpu_s": round(compile_cpu_s, 2),
        "hlo_chars": len(lowered.as_text()),
        "per_device_argument_bytes": int(mem.argument_size_in_bytes),
        "per_device_output_bytes": int(mem.output_size_in_bytes),
        "per_device_temp_bytes": int(mem.temp_size_in_bytes),
    }


def run(quick: bool = True, write: bool = True, full_depth: bool = False, **kw) -> dict:
    """The first 8 layers (quick: only those, a few minutes on 2 cores, unless `full_depth`) and
    the full 52-layer model; prints, writes; `compile_s` / `compile_lower_s` are those of the
    last row."""
    kw.setdefault("seq", 64 if quick else 128)
    rows = [measure(**{**kw, "layers": 8})]
    if not quick or full_depth:
        rows.append(measure(**kw))
    for r in rows:
        print(
            f"{r['layers']:>3} layers, mesh {r['mesh']}, batch {r['batch']} x {r['seq']}, "
            f"remat {r['remat']}, scan_layers {r['scan_layers']} ({r['block_bodies']} block "
            f"bodies): lower {r['trace_lower_s']:.1f} s, "
            f"compile {r['compile_s']:.1f} s ({r['compile_cpu_s']:.1f} s CPU), "
            f"temp {r['per_device_temp_bytes'] / 2**30:.2f} GiB/device, "
            f"args {r['per_device_argument_bytes'] / 2**30:.2f} GiB/device"
        )
    res = {
        "rows": rows,
        "compile_lower_s": rows[-1]["trace_lower_s"],
        "compile_s": rows[-1]["compile_s"],
    }
    full = [r for r in rows if r["layers"] == 52]
    if full:
        res["compile_s_nano_52_layers"] = full[-1]["compile_s"]
        res["compile_cpu_s_nano_52_layers"] = full[-1]["compile_cpu_s"]
    if write:
        name = "compile_time" + ("_scan" if kw.get("scan_layers") else "")
        write_result(res, RESULTS.with_name(name + ("_quick" if quick else "") + ".json"))
    return res


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--quick", action="store_true")
    p.add_argument("--mesh", default="fsdp=2,expert=4")
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--seq", type=int, default=None)
    p.add_argument("--remat", default="block", choices=["none", "block", "matmuls"])
    p.add_argument("--moe_backend", default="ragged_dot")
    p.add_argument("--scan_layers", action="store_true", help="ModelConfig.scan_layers=True")
    p.add_argument(
        "--full_depth", action="store_true", help="with --quick: also the 52-layer model"
    )
    a = p.parse_args()
    kw = {
        "mesh_spec": a.mesh,
        "batch": a.batch,
        "remat": a.remat,
        "moe_backend": a.moe_backend,
        "scan_layers": a.scan_layers,
    }
    if a.seq:
        kw["seq"] = a.seq
    run(quick=a.quick, full_depth=a.full_depth, **kw)


if __name__ == "__main__":
    main()
