"""SFT train-step and forward throughput on CPU: ours (JAX) vs Hugging Face transformers, and MFU.

    python benchmarks/train_step.py                 # small config, batch 8 x 512, fp32, 5 rounds
    python benchmarks/train_step.py --quick         # batch 2 x 256, 2 rounds (run_all --quick)
    python benchmarks/train_step.py --batch=4 --seq=512 --rounds=7 --threads=2

Each side runs in a process of its own (`side_by_side.py`: same thread count, same CPUs,
interleaved rounds ours, theirs, ours, theirs; the `--side=ours|transformers` flag is that
worker's entry point and not meant to be run by hand; transformers' worker is in
`train_step_transformers.py`). Both load the same weights: our worker
builds a random `ModelConfig.small()` model, writes it with `save_hf_checkpoint`, loads it back
with `load_hf_checkpoint`; the transformers worker loads that directory with
`AutoModelForCausalLM.from_pretrained`. Same token batch, same optimizer (AdamW b1 0.9, b2 0.98,
eps 1e-8, weight decay 0.1 on >= 2-D weights that are not norms/biases, global-norm clipping at
1.0, constant lr):

  ours          `nemocascade.train.sft.sft_step` (forward, backward, clipping, AdamW, MoE bias
                update), `jax.jit` with the state donated, MoE backend `sorted` (the CPU one),
                cross-entropy chunked over 1024 tokens (`loss_chunk_size`; 0 materialises the
                [B, T, V] logits and is slower on CPU), `dt_floor_like_hf=True` (the dt floor
                transformers' CPU path applies, so both compute the same function).
  transformers  `model(ids, use_cache=False).logits` -> token cross-entropy -> `backward()` ->
                `clip_grad_norm_` -> `torch.optim.AdamW.step()`, with the fastest of its
                attention (`sdpa`, `eager`) x experts (`grouped_mm`, `batched_mm`, `eager`)
                implementations, chosen per measurement by timing each (one warm-up call, one
                timed) in the worker; the candidates' times and the choice are in the JSON.
                (It has no routing-bias update; ours is one small [E] update per MoE layer.)
                `batched_mm` copies one expert weight pair per routed token and is skipped
                when that copy would exceed `--max_gather_gib`. The Mamba conv and chunked
                scan use transformers' PyTorch paths (no `mamba_ssm` / `causal_conv1d` on CPU).

Measured: train step (fwd + bwd + optimizer) and forward (no cache, to fp32 logits over the
whole batch; this is the `prefill` of the keys) tokens/s, medians over the rounds; first calls
(compilation, warm-up) reported apart under `first_s`. Correctness guard before any timing: the
two forwards' logits (row 0, first 64 positions, initial weights) agree within
`GUARD_LOGIT_ATOL`, and the first train step's loss (initial weights) within `GUARD_LOSS_RTOL`.

Model FLOPs per token: `flops.model_flops_per_token` (what is counted is in `flops.py`).

MFU = model FLOPs per step / median step time / peak, where peak = the best fp32 `jnp.dot`
FLOP/s on 1024^2 and 2048^2 squares measured in our worker in every round (`matmul_peak`, same
threads). transformers' worker measures `torch.mm` the same way (reported, not used for MFU).
Writes benchmarks/results/train_step[_quick].json; `run(quick)` is what `benchmarks/run_all.py`
calls (keys `train_mfu`, `train_speedup_vs_transformers`, `prefill_speedup_vs_transformers`,
`transformers_separate_process`, `matmul_peak_gflops`).
"""

from __future__ import annotations

import argparse
import functools
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

import side_by_side as sbs
from flops import matmul_peak_flops, model_flops_per_token
from results_io import write_result

from nemocascade.model import ModelConfig
from nemocascade.train.optim import OptimConfig

SCRIPT = Path(__file__).resolve()
RESULTS = SCRIPT.parent / "results" / "train_step.json"
OPTIM = OptimConfig(
    lr=1e-5, min_lr=1e-5, warmup_steps=0, b1=0.9, b2=0.98, eps=1e-8, weight_decay=0.1, clip_norm=1.0
)
GUARD_POSITIONS = 64  # logits of row 0, positions [0, 64), compared before timing
GUARD_LOGIT_ATOL = 1e-4  # fp32, as tests/model/test_hf_parity.py
GUARD_LOSS_RTOL = 1e-5
PEAK_SIZES = (1024, 2048)


def make_batch(cfg: ModelConfig, batch: int, seq: int, seed: int = 0) -> dict[str, np.ndarray]:
    """A random SFT batch: every position a loss token, one document per row."""
    rng = np.random.default_rng(seed)
    ids = rng.integers(3, cfg.vocab_size, (batch, seq + 1)).astype(np.int32)
    return {
        "input_ids": ids[:, :-1],
        "targets": ids[:, 1:],
        "loss_mask": np.ones((batch, seq), np.float32),
        "segment_ids": np.ones((batch, seq), np.int32),
        "positions": np.broadcast_to(np.arange(seq, dtype=np.int32), (batch, seq)).copy(),
    }


def ours_step(model, loss_chunk: int = 1024):
    """(jitted SFT step (state, batch) -> (state, metrics), graphdef, initial train state): the
    step this benchmark times (AdamW + clipping + the MoE routing-bias update, donated state)."""
    import jax

    from nemocascade.train.optim import make_optimizer
    from nemocascade.train.sft import sft_step
    from nemocascade.train.state import create_train_state

    tx = make_optimizer(OPTIM, total_steps=1000)
    graphdef, state = create_train_state(model, tx, jax.random.PRNGKey(0))
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
    return step, graphdef, state


def ours_programs(model, batch: dict, loss_chunk: int = 1024):
    """(train_step() -> metrics, prefill() -> logits) closures over our jitted programs."""
    import jax
    import jax.numpy as jnp
    from flax import nnx

    step, graphdef, state = ours_step(model, loss_chunk)
    jbatch = {k: jnp.asarray(v) for k, v in batch.items()}
    holder = {"state": state}

    def train():
        holder["state"], metrics = step(holder["state"], jbatch)
        return jax.block_until_ready(metrics)

    fwd = jax.jit(lambda p, ms, ids: nnx.merge(graphdef, p, ms)(ids))

    def prefill():  # reads the live (donated-and-replaced) state
        st = holder["state"]
        return jax.block_until_ready(fwd(st.params, st.model_state, jbatch["input_ids"]))

    return train, prefill


def interleaved_medians(jobs: dict, repeats: int) -> dict[str, dict]:
    """In-process helper for comparisons within one library (remat.py, attention_memory.py):
    runs each job once (warm-up / compile, timed as `first_s`), then `repeats` interleaved
    rounds; returns {name: {"median_s", "min_s", "first_s", "times_s"}}."""
    times = {k: [] for k in jobs}
    first = {}
    for k, fn in jobs.items():
        first[k] = sbs.timed(fn)[0]
    for _ in range(repeats):
        for k, fn in jobs.items():
            times[k].append(sbs.timed(fn)[0])
    return {
        k: {
            "median_s": statistics.median(v),
            "min_s": min(v),
            "first_s": first[k],
            "times_s": [round(x, 4) for x in v],
        }
        for k, v in times.items()
    }


# ----------------------------------------------------------------------------- workers
def ours_worker(a: argparse.Namespace) -> dict:
    """Our side's request handlers (init, warmup, time); jobs train, forward, matmul_peak."""
    import jax
    from flax import nnx

    from nemocascade.model import NemotronH, load_hf_checkpoint, save_hf_checkpoint

    jobs = {}

    def init(ckpt: str, seed: int) -> dict:
        cfg = ModelConfig.small()
        t_save, _ = sbs.timed(lambda: save_hf_checkpoint(NemotronH(cfg, rngs=nnx.Rngs(seed)), ckpt))
        t_load, model = sbs.timed(
            lambda: load_hf_checkpoint(ckpt, moe_backend=a.moe_backend, dt_floor_like_hf=True)
        )
        jobs["train"], jobs["forward"] = ours_programs(
            model, make_batch(cfg, a.batch, a.seq, seed), a.loss_chunk
        )
        jobs["matmul_peak"] = lambda: {n: matmul_peak_flops(n) for n in PEAK_SIZES}
        return {"save_checkpoint_s": t_save, "load_s": t_load, "platform": jax.default_backend()}

    def run_job(job: str, guard_path: str | None = None) -> dict:
        s, out = sbs.timed(jobs[job])
        reply = {"s": s}
        if job == "train":
            reply["loss"] = float(out["loss"])
        elif job == "matmul_peak":
            reply["flops_by_n"] = out
        elif guard_path:
            np.save(guard_path, np.asarray(out[0, :GUARD_POSITIONS], np.float32))
        return reply

    def warmup(job: str, guard_path: str | None = None) -> dict:
        reply = {**run_job(job, guard_path), "threads": sbs.worker_threads()}
        if job == "train":  # a second step: the loss after one update, for the record
            second = run_job(job)
            reply |= {"second_s": second["s"], "loss_after_one_step": second["loss"]}
        return reply

    return {"init": init, "warmup": warmup, "time": lambda job: run_job(job)}


# ----------------------------------------------------------------------------- parent
def guard(ours_fwd_ref: Path, ours_loss: float, ours_second_loss: float, selected: dict) -> dict:
    """Both sides compute the same logits and loss (initial weights); raises before timing."""
    diffs = [c["max_abs_logit_diff"] for c in selected["forward"]["candidates"] if "s" in c]
    hf_loss = selected["train"]["first_loss"]
    out = {
        "logit_positions": f"row 0, positions [0, {GUARD_POSITIONS})",
        "max_abs_logit_diff": max(diffs),
        "logit_atol": GUARD_LOGIT_ATOL,
        "logits_abs_max": float(np.max(np.abs(np.load(ours_fwd_ref)))),
        "first_loss": {"ours": ours_loss, "transformers": hf_loss},
        "loss_rel_diff": abs(ours_loss - hf_loss) / abs(hf_loss),
        "loss_rtol": GUARD_LOSS_RTOL,
        # not guarded: our step also moves the MoE routing bias (`moe_bias_rate`)
        "loss_after_one_step": {
            "ours": ours_second_loss,
            "transformers": selected["train"]["loss_after_one_step"],
        },
    }
    out["passed"] = out["max_abs_logit_diff"] <= GUARD_LOGIT_ATOL and (
        out["loss_rel_diff"] <= GUARD_LOSS_RTOL
    )
    if not out["passed"]:
        raise RuntimeError(f"train_step: the two sides disagree, nothing timed: {out}")
    return out


def measure(
    batch: int,
    seq: int,
    rounds: int,
    threads: int,
    moe_backend: str,
    loss_chunk: int,
    gap_s: float,
    max_gather_gib: float,
) -> dict:
    """Sets up the two workers one after the other (ours first: it writes the checkpoint),
    checks they agree, then times the interleaved rounds; returns their raw answers."""
    args = (f"--batch={batch}", f"--seq={seq}", f"--moe_backend={moe_backend}")
    args += (f"--loss_chunk={loss_chunk}",)
    workers: dict[str, sbs.Worker] = {}
    raw: dict = {}
    with tempfile.TemporaryDirectory() as tmp:
        ckpt, ref = str(Path(tmp) / "checkpoint"), Path(tmp) / "ours_logits.npy"
        try:
            ours = workers["ours"] = sbs.Worker(SCRIPT, "ours", threads, args)
            raw["ours_init"] = ours.call("init", ckpt=ckpt, seed=0)
            first = {"forward": ours.call("warmup", job="forward", guard_path=str(ref))}
            first |= {j: ours.call("warmup", job=j) for j in ("train", "matmul_peak")}
            raw["ours_first"] = first
            hf = workers["transformers"] = sbs.Worker(SCRIPT, "transformers", threads, args)
            raw["transformers_init"] = hf.call("init", ckpt=ckpt, seed=0)
            sel = {
                j: hf.call("select", job=j, guard_path=str(ref), max_gather_gib=max_gather_gib)
                for j in ("forward", "train")
            }
            raw["selected"] = sel
            raw["transformers_first_peak"] = hf.call("warmup", job="matmul_peak")
            losses = first["train"]["loss"], first["train"]["loss_after_one_step"]
            raw["guard"] = guard(ref, *losses, sel)
            jobs = [(side, j) for j in ("train", "forward", "matmul_peak") for side in sbs.SIDES]
            raw["timings"], raw["loadavg_per_round"] = sbs.interleaved(workers, jobs, rounds, gap_s)
        finally:
            for w in workers.values():
                w.close()
    return raw


def assemble(raw: dict, cfg: ModelConfig, batch: int, seq: int) -> dict:
    """Throughputs, MFU and ours / transformers ratios from the raw answers."""
    t, tokens = raw["timings"], batch * seq
    flops = {
        "train": model_flops_per_token(cfg, seq, train=True),
        "prefill": model_flops_per_token(cfg, seq, train=False),
    }
    peaks = {
        side: [max(r["flops_by_n"].values()) for r in t[f"{side}/matmul_peak"]["replies"]]
        for side in sbs.SIDES
    }
    peak = max(peaks["ours"])
    sel = raw["selected"]
    res = {
        "threads_seen": {
            "ours": raw["ours_first"]["forward"]["threads"],
            "transformers": sel["forward"]["threads"],
        },
        "ours_setup": {
            **raw["ours_init"],
            "first_s": {j: r["s"] for j, r in raw["ours_first"].items()},
            "second_s": {"train": raw["ours_first"]["train"]["second_s"]},
        },
        "transformers_setup": {
            **raw["transformers_init"],
            "chosen": {j: s["chosen"] for j, s in sel.items()},
            "candidates": {j: s["candidates"] for j, s in sel.items()},
            "first_s": {"matmul_peak": raw["transformers_first_peak"]["s"]},
        },
        "guard": raw["guard"],
        "flops_per_token_train": flops["train"],
        "flops_per_token_prefill": flops["prefill"],
        "matmul_peak_flops": peak,
        "matmul_peak_gflops": peak / 1e9,
        "matmul_peak": {
            "sizes": list(PEAK_SIZES),
            "jax_flops_per_round": peaks["ours"],
            "torch_flops_per_round": peaks["transformers"],
            "torch_peak_flops": max(peaks["transformers"]),
        },
        "loadavg_per_round": raw["loadavg_per_round"],
        "timings": {k: {kk: vv for kk, vv in v.items() if kk != "replies"} for k, v in t.items()},
        "train_losses": {s: [r["loss"] for r in t[f"{s}/train"]["replies"]] for s in sbs.SIDES},
    }
    for name, job in (("train", "train"), ("prefill", "forward")):
        for who, side in (("ours", "ours"), ("hf", "transformers")):
            s = t[f"{side}/{job}"]["median_s"]
            res[f"{who}_{name}_tok_s"] = tokens / s
            res[f"{who}_{name}_mfu"] = flops[name]["total"] * tokens / s / peak
        res[f"{name}_paired_ratio"] = sbs.paired_ratios(
            t[f"ours/{job}"]["times_s"], t[f"transformers/{job}"]["times_s"]
        )
    res["train_mfu"] = res["ours_train_mfu"]
    res["prefill_mfu"] = res["ours_prefill_mfu"]
    res["train_speedup_vs_transformers"] = res["ours_train_tok_s"] / res["hf_train_tok_s"]
    res["prefill_speedup_vs_transformers"] = res["ours_prefill_tok_s"] / res["hf_prefill_tok_s"]
    res["forward_speedup_vs_transformers"] = res["prefill_speedup_vs_transformers"]
    return res


def run(
    quick: bool = True,
    batch: int | None = None,
    seq: int | None = None,
    rounds: int | None = None,
    threads: int | None = None,
    moe_backend: str = "sorted",
    loss_chunk: int = 1024,
    gap_s: float = 0.5,
    max_gather_gib: float = 2.0,
    write: bool = True,
) -> dict:
    """Measures both sides on `ModelConfig.small()`, each in its own process; returns the JSON."""
    batch = batch or (2 if quick else 8)
    seq = seq or (256 if quick else 512)
    rounds = rounds or (2 if quick else 5)
    threads = threads or len(sbs.cpu_set())
    head = {
        "benchmark": "train_step",
        "transformers_separate_process": True,
        "config": "small",
        "quick": quick,
        "batch": batch,
        "seq": seq,
        "tokens_per_step": batch * seq,
        "dtype": "float32",
        "rounds": rounds,
        "gap_s": gap_s,
        "machine": sbs.machine_info(),
        "threads": {
            "requested": threads,
            "cpus": sbs.cpu_set(threads),
            "env": sbs.thread_env(threads),
        },
        "versions": sbs.library_versions(),
        "ours": {
            "moe_backend": moe_backend,
            "loss_chunk_size": loss_chunk,
            "dt_floor_like_hf": True,
        },
    }
    t0 = time.perf_counter()
    raw = measure(batch, seq, rounds, threads, moe_backend, loss_chunk, gap_s, max_gather_gib)
    res = head | assemble(raw, ModelConfig.small(moe_backend=moe_backend), batch, seq)
    res["threads"] |= res.pop("threads_seen")  # what each worker actually ran with
    res["ours"] |= res.pop("ours_setup")
    res["transformers"] = res.pop("transformers_setup")
    res["loadavg_end"] = sbs.machine_info()["loadavg"]
    res["elapsed_s"] = round(time.perf_counter() - t0, 1)
    print_table(res)
    if write:
        write_result(res, RESULTS.with_name("train_step_quick.json") if quick else RESULTS)
    return res


def print_table(res: dict) -> None:
    m = res["machine"]
    print(
        f"small config, batch {res['batch']} x {res['seq']} tokens, fp32; each side in its own "
        f"process, {res['threads']['requested']} threads, {res['rounds']} rounds; "
        f"{m['cpu_model']}, load average {m['loadavg']} -> {res['loadavg_end']}"
    )
    print(
        f"peak fp32 matmul: jnp.dot {res['matmul_peak_flops'] / 1e9:.1f} GFLOP/s, torch.mm "
        f"{res['matmul_peak']['torch_peak_flops'] / 1e9:.1f} GFLOP/s; train "
        f"{res['flops_per_token_train']['total'] / 1e6:.1f} MFLOP/token; transformers chose "
        f"{res['transformers']['chosen']}"
    )
    print(f"{'program':<22}{'median s':>10}{'tokens/s':>11}{'MFU':>8}")
    for who, side in (("ours", "ours"), ("hf", "transformers")):
        for name, job in (("train", "train"), ("prefill", "forward")):
            s = res["timings"][f"{side}/{job}"]["median_s"]
            print(
                f"{side + ' ' + job:<22}{s:>10.3f}{res[f'{who}_{name}_tok_s']:>11.0f}"
                f"{100 * res[f'{who}_{name}_mfu']:>7.1f}%"
            )
    print(
        f"ours / transformers (tokens/s, medians): train "
        f"{res['train_speedup_vs_transformers']:.2f}x, forward "
        f"{res['prefill_speedup_vs_transformers']:.2f}x"
    )


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--quick", action="store_true")
    p.add_argument("--batch", type=int, default=None)
    p.add_argument("--seq", type=int, default=None)
    p.add_argument("--rounds", type=int, default=None, help="timed rounds (default 5, quick 2)")
    p.add_argument("--threads", type=int, default=None, help="per side (default: all CPUs)")
    p.add_argument("--moe_backend", default="sorted")
    p.add_argument("--loss_chunk", type=int, default=1024, help="our loss_chunk_size (0: off)")
    p.add_argument("--gap_s", type=float, default=0.5, help="pause before each timed call")
    p.add_argument("--max_gather_gib", type=float, default=2.0, help="batched_mm candidate cap")
    p.add_argument("--side", choices=sbs.SIDES, default=None, help="(internal) run as a worker")
    a = p.parse_args()
    if a.side:
        a.batch = a.batch or (2 if a.quick else 8)
        a.seq = a.seq or (256 if a.quick else 512)
        if a.side == "ours":
            sbs.serve(ours_worker(a))
        else:  # the transformers side lives in its own module (torch is imported there only)
            from train_step_transformers import transformers_worker

            sbs.serve(transformers_worker(a))
        return
    run(
        quick=a.quick,
        batch=a.batch,
        seq=a.seq,
        rounds=a.rounds,
        threads=a.threads,
        moe_backend=a.moe_backend,
        loss_chunk=a.loss_chunk,
        gap_s=a.gap_s,
        max_gather_gib=a.max_gather_gib,
    )


if __name__ == "__main__":
    main()
