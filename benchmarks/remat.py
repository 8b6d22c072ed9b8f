"""Rematerialisation policies on the `small` config: compiled memory and step time of the SFT step.

    python benchmarks/remat.py              # batch 8 x 512, fp32, CPU
    python benchmarks/remat.py --quick      # batch 2 x 256

Policies (`ModelConfig.remat`, implemented per block with `jax.checkpoint` in
`nemocascade/model/nemotron_h.py`):

  none     every intermediate of every block is kept for the backward pass;
  block    only each block's input is kept; the block is recomputed in the backward pass;
  matmuls  outputs of matmuls without batch dimensions are kept
           (`jax.checkpoint_policies.dots_with_no_batch_dims_saveable`), the rest recomputed.

For each policy the full `sft_step` (MoE backend `sorted`, cross-entropy chunked over 1024
tokens as in the train-step benchmark, so that the [B, T, V] logits do not hide the blocks'
activations) is compiled once on one CPU device:
`temp_bytes` is `compiled.memory_analysis().temp_size_in_bytes` (XLA's scratch peak, excluding
the state and batch arguments), and the step time is the median of interleaved runs. The whole
step's peak can sit in the optimizer update (gradients + new AdamW state) rather than in the
backward pass, so `grad_temp_bytes` also reports the temp memory of the loss gradient alone
(`jax.grad` of `sft_loss`, the part remat acts on). `--compile_only` skips the timing. The
params tool's analytic activation estimate (`nemocascade.tools.params.activation_estimate`) is
printed beside it for comparison. Writes benchmarks/results/remat.json.
"""

from __future__ import annotations

import argparse
import functools
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
from flax import nnx

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from results_io import write_result
from train_step import OPTIM, interleaved_medians, make_batch

from nemocascade.model import ModelConfig, NemotronH
from nemocascade.tools.params import activation_estimate
from nemocascade.train.optim import make_optimizer
from nemocascade.train.sft import sft_loss, sft_step
from nemocascade.train.state import create_train_state

RESULTS = Path(__file__).resolve().parent / "results" / "remat.json"
POLICIES = ("none", "block", "matmuls")


def compile_policy(remat: str, batch: dict, moe_backend: str = "sorted", loss_chunk: int = 1024):
    """(compiled step, state, temp bytes) for `ModelConfig.small(remat=remat)`."""
    cfg = ModelConfig.small(remat=remat, moe_backend=moe_backend)
    tx = make_optimizer(OPTIM, total_steps=1000)
    graphdef, state = create_train_state(
        NemotronH(cfg, rngs=nnx.Rngs(0)), tx, jax.random.PRNGKey(0)
    )
    step = jax.jit(
        functools.partial(
            sft_step,
            graphdef=graphdef,
            tx=tx,
            lr_fn=lambda s: OPTIM.lr,
            moe_bias_rate=OPTIM.moe_bias_rate,
            loss_chunk_size=loss_chunk,
        ),
        donate_argnums=0,
    )
    compiled = step.lower(state, batch).compile()
    return compiled, state, int(compiled.memory_analysis().temp_size_in_bytes)


def grad_temp_bytes(
    remat: str, batch: dict, moe_backend: str = "sorted", loss_chunk: int = 1024
) -> int:
    """Compiled temp bytes of the gradient of the SFT loss alone (no optimizer)."""
    cfg = ModelConfig.small(remat=remat, moe_backend=moe_backend)
    model = nnx.eval_shape(lambda: NemotronH(cfg, rngs=nnx.Rngs(0)))
    graphdef, params, model_state = nnx.split(model, nnx.Param, ...)
    loss = functools.partial(
        sft_loss, graphdef=graphdef, denom=jnp.float32(1.0), loss_chunk_size=loss_chunk
    )
    grad = jax.jit(jax.grad(lambda p, m, b: loss(p, m, b)[0]))
    return int(
        grad.lower(params, model_state, batch).compile().memory_analysis().temp_size_in_bytes
    )


def run(
    quick: bool = True,
    batch: int | None = None,
    seq: int | None = None,
    repeats: int | None = None,
    write: bool = True,
    compile_only: bool = False,
) -> dict:
    """Compiles and times the three policies; returns the JSON-ready dict."""
    batch = batch or (2 if quick else 8)
    seq = seq or (256 if quick else 512)
    repeats = repeats or (1 if quick else 3)
    cfg = ModelConfig.small()
    data = {k: jnp.asarray(v) for k, v in make_batch(cfg, batch, seq).items()}
    holders, temps = {}, {}
    gtemps = {r: grad_temp_bytes(r, data) for r in POLICIES}
    for r in POLICIES:
        compiled, state, temps[r] = compile_policy(r, data)
        holders[r] = {"fn": compiled, "state": state}
        if compile_only:
            del holders[r]["state"]

    def job(r):
        h = holders[r]

        def go():
            h["state"], metrics = h["fn"](h["state"], data)
            jax.block_until_ready(metrics)

        return go

    if compile_only:
        times = {r: {"median_s": float("nan"), "times_s": []} for r in POLICIES}
    else:
        times = interleaved_medians({r: job(r) for r in POLICIES}, repeats)
    tokens = batch * seq
    rows = {}
    for r in POLICIES:
        est = activation_estimate(cfg, tokens, seq, r, loss_chunk=1024)
        rows[r] = {
            "temp_bytes": temps[r],
            "grad_temp_bytes": gtemps[r],
            "grad_temp_vs_none": gtemps[r] / gtemps["none"],
            "step_median_s": times[r]["median_s"],
            "step_times_s": times[r]["times_s"],
            "time_vs_none": times[r]["median_s"] / times["none"]["median_s"],
            "temp_vs_none": temps[r] / temps["none"],
            "params_tool_activation_estimate_bytes": int(est["total"]),
        }
    res = {
        "config": "small",
        "batch": batch,
        "seq": seq,
        "dtype": "float32",
        "platform": jax.default_backend(),
        "policies": rows,
    }
    print(f"small config, batch {batch} x {seq}, fp32 on {res['platform']}")
    print(
        f"{'remat':<9}{'step temp MiB':>14}{'x none':>8}{'grad temp MiB':>14}{'x none':>8}"
        f"{'step s':>9}{'x none':>8}{'estimate MiB':>14}"
    )
    for r, row in rows.items():
        print(
            f"{r:<9}{row['temp_bytes'] / 2**20:>14.1f}{row['temp_vs_none']:>8.2f}"
            f"{row['grad_temp_bytes'] / 2**20:>14.1f}{row['grad_temp_vs_none']:>8.2f}"
            f"{row['step_median_s']:>9.3f}{row['time_vs_none']:>8.2f}"
            f"{row['params_tool_activation_estimate_bytes'] / 2**20:>14.1f}"
        )
    if write:
        name = "remat" + ("_quick" if quick else "") + ("_compile_only" if compile_only else "")
        out = RESULTS.with_name(name + ".json")
        write_result(res, out)
    return res


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--quick", action="store_true")
    p.add_argument("--batch", type=int, default=None)
    p.add_argument("--seq", type=int, default=None)
    p.add_argument("--repeats", type=int, default=None)
    p.add_argument("--compile_only", action="store_true", help="memory only, no step timing")
    a = p.parse_args()
    run(quick=a.quick, batch=a.batch, seq=a.seq, repeats=a.repeats, compile_only=a.compile_only)


if __name__ == "__main__":
    main()
