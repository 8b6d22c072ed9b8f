"""Greedy rollout throughput: `nemocascade.generate.generate` vs transformers' `generate`.

    python benchmarks/generate.py                  # small config, batch 8, prompt 64 + 64 new
    python benchmarks/generate.py --quick          # batch 8, prompt 32 + 16 new (run_all)
    python benchmarks/generate.py --batches=8,64 --rounds=7 --threads=2

Each side runs in a process of its own (`side_by_side.py`: same thread count, same CPUs,
interleaved rounds ours, theirs, ours, theirs; `--side=ours|transformers` is that worker's entry
point, not meant to be run by hand), on the same weights: our worker builds a random
`ModelConfig.small()` model, writes it with `save_hf_checkpoint` and loads it back
(`load_hf_checkpoint`, `dt_floor_like_hf=True`); the transformers worker loads that directory
with `AutoModelForCausalLM.from_pretrained`. Greedy, every row generating exactly `new` tokens
(no eos on either side: ours `eos_id=None`, transformers' `generation_config.eos_token_id=None`),
the KV / SSM cache on (transformers' default `use_cache=True`, `do_sample=False`).

  ours          the static engine (`generate(model, prompts, max_new_tokens=new)`: one jitted
                cached prefill, one jitted `while_loop` decode), MoE backend `sorted`; its two
                programs are compiled ahead of time (`precompile`, `compile_*_s`) and one
                warm-up call runs before timing.
  transformers  `model.generate(ids, attention_mask, max_new_tokens=new, do_sample=False)` with
                the fastest of its attention (`sdpa`, `eager`) x experts (`grouped_mm`,
                `batched_mm`, `eager`) implementations, chosen per batch size by timing each
                (one untimed call, one timed); the candidates and the choice are in the JSON.

Per timed call each side reports the whole call (`generate_s`) and its prefill (`prefill_s`:
ours, the prefill phase of that call; transformers, one cached forward over the prompts,
`logits_to_keep=1` as `generate` does, timed just before the `generate` call):
  prefill tokens/s = batch * prompt / prefill_s
  decode tokens/s  = batch * new / (generate_s - prefill_s)   (new tokens; host work included)
  generate tokens/s = batch * new / generate_s                  (end to end)
medians over the rounds. Correctness guard before timing: the first generated token of every
row is the same on both sides, and up to each row's first differing token (a near-tie can flip
an argmax) the chosen tokens' log-probs agree within `GUARD_LOGPROB_ATOL`.
Writes benchmarks/results/generate[_quick].json; `run(quick=True)` is what
`benchmarks/run_all.py` calls (`decode_speedup_vs_transformers`,
`prefill_speedup_vs_transformers`, `transformers_separate_process`, at the first batch size).
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

import side_by_side as sbs
from results_io import write_result

from nemocascade.model import ModelConfig

SCRIPT = Path(__file__).resolve()
RESULTS = SCRIPT.parent / "results" / "generate.json"
# fp32 log-probs of the chosen tokens. Rounding differences grow along the recurrent decode
# (measured: 3.5e-5 after 16 + 8 tokens, 1.05e-4 after 32 + 16); a wrong weight, config or dt
# floor moves them by >= 1e-2.
GUARD_LOGPROB_ATOL = 1e-3


def prompts_for(cfg: ModelConfig, batch: int, prompt_len: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(3, cfg.vocab_size, (batch, prompt_len))


# ----------------------------------------------------------------------------- workers
def ours_worker(a: argparse.Namespace) -> dict:
    """Our side's handlers: init (write + load the checkpoint), warmup (compile + one call,
    returns tokens and log-probs for the guard), time."""
    from flax import nnx

    from nemocascade.generate import generate, precompile
    from nemocascade.model import NemotronH, load_hf_checkpoint, save_hf_checkpoint

    st = {}

    def init(ckpt: str, seed: int) -> dict:
        cfg = ModelConfig.small()
        t_save, _ = sbs.timed(lambda: save_hf_checkpoint(NemotronH(cfg, rngs=nnx.Rngs(seed)), ckpt))
        t_load, st["model"] = sbs.timed(
            lambda: load_hf_checkpoint(ckpt, moe_backend=a.moe_backend, dt_floor_like_hf=True)
        )
        return {"save_checkpoint_s": t_save, "load_s": t_load}

    def call(batch: int) -> tuple[float, object]:
        prompts = prompts_for(ModelConfig.small(), batch, a.prompt_len).tolist()
        s, res = sbs.timed(lambda: generate(st["model"], prompts, max_new_tokens=a.new))
        if int(res.lengths.min()) != a.new:
            raise RuntimeError(f"ours generated {res.lengths.tolist()} tokens, not {a.new}")
        return s, res

    def warmup(batch: int) -> dict:
        prompts = prompts_for(ModelConfig.small(), batch, a.prompt_len).tolist()
        compile_s = precompile(st["model"], prompts, max_new_tokens=a.new)
        s, res = call(batch)
        return {
            **compile_s,
            "first_s": s,
            "tokens": res.tokens.tolist(),
            "logprobs": res.logprobs_untempered.tolist(),
            "threads": sbs.worker_threads(),
        }

    def time_job(job: str) -> dict:
        s, res = call(int(job))
        return {"s": s, "prefill_s": res.timings["prefill_s"], "loop_s": res.timings["decode_s"]}

    return {"init": init, "warmup": warmup, "time": time_job}


def transformers_worker(a: argparse.Namespace) -> dict:
    """transformers' handlers: init, select (candidates + guard data), time."""
    import torch

    sbs.start_transformers_worker(a.threads)
    st: dict = {"impl": {}}

    def init(ckpt: str, seed: int) -> dict:
        t_load, hf = sbs.load_transformers(ckpt)
        hf.eval()
        hf.generation_config.eos_token_id = None  # every row generates exactly `new` tokens
        st["hf"] = hf
        return {"load_s": t_load}

    def inputs(batch: int):
        ids = torch.as_tensor(prompts_for(ModelConfig.small(), batch, a.prompt_len))
        return ids, torch.ones_like(ids)

    def gen(batch: int, scores: bool = False):
        ids, mask = inputs(batch)
        with torch.no_grad():
            out = st["hf"].generate(
                ids,
                attention_mask=mask,
                max_new_tokens=a.new,
                do_sample=False,
                use_cache=True,
                pad_token_id=0,
                return_dict_in_generate=scores,
                output_scores=scores,
            )
        seqs = out.sequences if scores else out
        if seqs.shape[1] != a.prompt_len + a.new:
            raise RuntimeError(f"transformers generated {seqs.shape[1] - a.prompt_len} tokens")
        return out

    def prefill(batch: int) -> None:
        ids, mask = inputs(batch)
        with torch.no_grad():
            st["hf"](ids, attention_mask=mask, use_cache=True, logits_to_keep=1)

    def select(batch: int, ours_tokens: list, ours_logprobs: list, max_gather_gib: float):
        def check(out) -> dict:
            return guard_record(out, np.array(ours_tokens), np.array(ours_logprobs), a.prompt_len)

        res = sbs.select_impl(
            st["hf"],
            lambda: gen(batch),
            first_fn=lambda: gen(batch, scores=True),
            gather_bytes=sbs.batched_mm_gather_bytes(
                st["hf"].config, batch * a.prompt_len, train=False
            ),
            max_gather_bytes=int(max_gather_gib * 2**30),
            check=check,
        )
        st["impl"][batch] = res["chosen"]
        return {**res, "threads": sbs.worker_threads()}

    def time_job(job: str) -> dict:
        batch = int(job)
        sbs.set_impl(st["hf"], **st["impl"][batch])
        pre_s, _ = sbs.timed(lambda: prefill(batch))
        s, _ = sbs.timed(lambda: gen(batch))
        return {"s": s, "prefill_s": pre_s}

    return {"init": init, "select": select, "time": time_job}


def guard_record(out, ours_tokens: np.ndarray, ours_logprobs: np.ndarray, prompt_len: int):
    """Compares transformers' greedy output (with scores) to ours: first tokens, identical rows,
    and the chosen tokens' log-probs up to each row's first differing token."""
    import torch

    theirs = out.sequences[:, prompt_len:].numpy()
    logp = torch.stack([torch.log_softmax(s.float(), -1) for s in out.scores], 1)  # [B, new, V]
    theirs_lp = torch.gather(logp, 2, out.sequences[:, prompt_len:, None])[..., 0].numpy()
    same = theirs == ours_tokens
    agree = np.cumprod(same, axis=1).astype(bool)  # positions before the first difference
    lp_diff = np.abs(theirs_lp - ours_logprobs)[agree]
    return {
        "first_tokens_equal": bool(same[:, 0].all()),
        "rows_identical": int(same.all(axis=1).sum()),
        "tokens_equal_fraction": float(same.mean()),
        "max_abs_logprob_diff": float(lp_diff.max()) if lp_diff.size else None,
    }


# ----------------------------------------------------------------------------- parent
def guard(selected: dict) -> dict:
    """Every transformers candidate computed what ours computed; raises before timing."""
    out = {"logprob_atol": GUARD_LOGPROB_ATOL, "per_batch": {}}
    ok = True
    for b, sel in selected.items():
        recs = [c for c in sel["candidates"] if "s" in c]
        diffs = [c["max_abs_logprob_diff"] for c in recs]
        row = {
            "first_tokens_equal": all(c["first_tokens_equal"] for c in recs),
            "rows_identical_min": min(c["rows_identical"] for c in recs),
            "tokens_equal_fraction_min": min(c["tokens_equal_fraction"] for c in recs),
            "max_abs_logprob_diff": max(diffs),
        }
        ok &= row["first_tokens_equal"] and row["max_abs_logprob_diff"] <= GUARD_LOGPROB_ATOL
        out["per_batch"][b] = row
    out["passed"] = bool(ok)
    if not ok:
        raise RuntimeError(f"generate: the two sides disagree, nothing timed: {out}")
    return out


def summarize_side(replies: list[dict], batch: int, prompt_len: int, new: int) -> dict:
    gen = [r["s"] for r in replies]
    pre = [r["prefill_s"] for r in replies]
    dec = [g - p for g, p in zip(gen, pre, strict=True)]
    out = {
        "generate_s": sbs.summarize(gen),
        "prefill_s": sbs.summarize(pre),
        "decode_s": sbs.summarize(dec),
        "prefill_tok_s": batch * prompt_len / statistics.median(pre),
        "decode_tok_s": batch * new / statistics.median(dec),
        "generate_tok_s": batch * new / statistics.median(gen),
    }
    if "loop_s" in replies[0]:
        out["decode_loop_s"] = sbs.summarize([r["loop_s"] for r in replies])
    return out


def measure(
    batches: tuple[int, ...],
    prompt_len: int,
    new: int,
    rounds: int,
    threads: int,
    moe_backend: str,
    gap_s: float,
    max_gather_gib: float,
) -> dict:
    """Sets up the two workers one after the other (ours first: it writes the checkpoint),
    checks they agree, then times the interleaved rounds; returns their raw answers."""
    args = (f"--prompt_len={prompt_len}", f"--new={new}", f"--moe_backend={moe_backend}")
    workers: dict[str, sbs.Worker] = {}
    raw: dict = {}
    with tempfile.TemporaryDirectory() as tmp:
        ckpt = str(Path(tmp) / "checkpoint")
        try:
            ours = workers["ours"] = sbs.Worker(SCRIPT, "ours", threads, args)
            raw["ours_init"] = ours.call("init", ckpt=ckpt, seed=0)
            first = raw["ours_first"] = {b: ours.call("warmup", batch=b) for b in batches}
            hf = workers["transformers"] = sbs.Worker(SCRIPT, "transformers", threads, args)
            raw["transformers_init"] = hf.call("init", ckpt=ckpt, seed=0)
            raw["selected"] = {
                b: hf.call(
                    "select",
                    batch=b,
                    ours_tokens=first[b]["tokens"],
                    ours_logprobs=first[b]["logprobs"],
                    max_gather_gib=max_gather_gib,
                )
                for b in batches
            }
            raw["guard"] = guard(raw["selected"])
            jobs = [(side, str(b)) for b in batches for side in sbs.SIDES]
            raw["timings"], raw["loadavg_per_round"] = sbs.interleaved(workers, jobs, rounds, gap_s)
        finally:
            for w in workers.values():
                w.close()
    return raw


def assemble_row(raw: dict, b: int, prompt_len: int, new: int) -> dict:
    """One batch size's throughputs and ours / transformers ratios."""
    t = raw["timings"]
    o = summarize_side(t[f"ours/{b}"]["replies"], b, prompt_len, new)
    h = summarize_side(t[f"transformers/{b}"]["replies"], b, prompt_len, new)
    drop = ("tokens", "logprobs", "threads")
    o["first"] = {k: v for k, v in raw["ours_first"][b].items() if k not in drop}
    h["impl"] = raw["selected"][b]["chosen"]
    h["candidates"] = raw["selected"][b]["candidates"]
    return {
        "batch": b,
        "prompt_len": prompt_len,
        "new_tokens": new,
        "ours": o,
        "transformers": h,
        "decode_speedup": o["decode_tok_s"] / h["decode_tok_s"],
        "prefill_speedup": o["prefill_tok_s"] / h["prefill_tok_s"],
        "generate_speedup": o["generate_tok_s"] / h["generate_tok_s"],
        "paired_ratios": {
            k: sbs.paired_ratios(o[f"{k}_s"]["times_s"], h[f"{k}_s"]["times_s"])
            for k in ("prefill", "decode", "generate")
        },
    }


def run(
    quick: bool = True,
    batches: tuple[int, ...] | None = None,
    prompt_len: int | None = None,
    new: int | None = None,
    rounds: int | None = None,
    threads: int | None = None,
    moe_backend: str = "sorted",
    gap_s: float = 0.5,
    max_gather_gib: float = 2.0,
    write: bool = True,
) -> dict:
    """Measures both engines on `ModelConfig.small()`, each in its own process."""
    batches = batches or (8,)
    prompt_len = prompt_len or (32 if quick else 64)
    new = new or (16 if quick else 64)
    rounds = rounds or (2 if quick else 5)
    threads = threads or len(sbs.cpu_set())
    res = {
        "benchmark": "generate",
        "transformers_separate_process": True,
        "config": "small",
        "quick": quick,
        "dtype": "float32",
        "rounds": rounds,
        "gap_s": gap_s,
        "machine": sbs.machine_info(),
        "versions": sbs.library_versions(),
    }
    t0 = time.perf_counter()
    raw = measure(batches, prompt_len, new, rounds, threads, moe_backend, gap_s, max_gather_gib)
    rows = [assemble_row(raw, b, prompt_len, new) for b in batches]
    res |= {
        "loadavg_per_round": raw["loadavg_per_round"],
        "loadavg_end": sbs.machine_info()["loadavg"],
        "threads": {
            "requested": threads,
            "cpus": sbs.cpu_set(threads),
            "env": sbs.thread_env(threads),
            "ours": raw["ours_first"][batches[0]]["threads"],
            "transformers": raw["selected"][batches[0]]["threads"],
        },
        "ours": {"moe_backend": moe_backend, "dt_floor_like_hf": True, **raw["ours_init"]},
        "transformers": raw["transformers_init"],
        "guard": raw["guard"],
        "rows": rows,
        "decode_speedup_vs_transformers": rows[0]["decode_speedup"],
        "prefill_speedup_vs_transformers": rows[0]["prefill_speedup"],
        "generate_speedup_vs_transformers": rows[0]["generate_speedup"],
        "elapsed_s": round(time.perf_counter() - t0, 1),
    }
    print_table(res)
    if write:
        write_result(res, RESULTS.with_name("generate_quick.json") if quick else RESULTS)
    return res


def print_table(res: dict) -> None:
    m = res["machine"]
    print(
        f"small config, fp32, greedy; each side in its own process, "
        f"{res['threads']['requested']} threads, {res['rounds']} rounds; {m['cpu_model']}, "
        f"load average {m['loadavg']} -> {res['loadavg_end']}"
    )
    print(
        f"{'batch':>5} {'engine':>12} {'prefill tok/s':>14} {'decode tok/s':>13} "
        f"{'generate tok/s':>15}  first call / compile"
    )
    for r in res["rows"]:
        for name in sbs.SIDES:
            m = r[name]
            extra = (
                f"{m['first']['first_s']:.1f} s / {m['first']['prefill_compile_s']:.1f} + "
                f"{m['first']['decode_compile_s']:.1f} s"
                if name == "ours"
                else f"impl {m['impl']}"
            )
            print(
                f"{r['batch']:>5} {name:>12} {m['prefill_tok_s']:>14.1f} "
                f"{m['decode_tok_s']:>13.1f} {m['generate_tok_s']:>15.1f}  {extra}"
            )
        print(
            f"{r['batch']:>5} {'ours/theirs':>12} {r['prefill_speedup']:>13.2f}x "
            f"{r['decode_speedup']:>12.2f}x {r['generate_speedup']:>14.2f}x"
        )


def main() -> None:
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--quick", action="store_true")
    p.add_argument("--batches", default=None, help="comma-separated batch sizes (default 8)")
    p.add_argument("--prompt_len", type=int, default=None)
    p.add_argument("--new", type=int, default=None)
    p.add_argument("--rounds", type=int, default=None, help="timed rounds (default 5, quick 2)")
    p.add_argument("--threads", type=int, default=None, help="per side (default: all CPUs)")
    p.add_argument("--moe_backend", default="sorted", help="ours (sorted: the CPU-fast one)")
    p.add_argument("--gap_s", type=float, default=0.5, help="pause before each timed call")
    p.add_argument("--max_gather_gib", type=float, default=2.0, help="batched_mm candidate cap")
    p.add_argument("--side", choices=sbs.SIDES, default=None, help="(internal) run as a worker")
    a = p.parse_args()
    if a.side:
        a.prompt_len = a.prompt_len or (32 if a.quick else 64)
        a.new = a.new or (16 if a.quick else 64)
        sbs.serve((ours_worker if a.side == "ours" else transformers_worker)(a))
        return
    run(
        quick=a.quick,
        batches=tuple(int(x) for x in a.batches.split(",")) if a.batches else None,
        prompt_len=a.prompt_len,
        new=a.new,
        rounds=a.rounds,
        threads=a.threads,
        moe_backend=a.moe_backend,
        gap_s=a.gap_s,
        max_gather_gib=a.max_gather_gib,
    )


if __name__ == "__main__":
    main()
