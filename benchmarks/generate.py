"""Rollout throughput: `nemocascade.generate.generate` vs Hugging Face transformers' `generate`.

    python benchmarks/generate.py                  # small config: batch 8 and 64, prompt 64, 64 new
    python benchmarks/generate.py --quick          # small config, batch 8, prompt 32, 16 new
    python benchmarks/generate.py --batches=8 --moe_backend=dense

Both libraries run in this process, on the CPU, on the same random weights (a transformers
`NemotronHForCausalLM` saved with `save_pretrained` and loaded by `load_hf_checkpoint`), greedy,
every row generating exactly `new` tokens (ours: no eos; transformers: `min_new_tokens=new`).

Our MoE backend is `sorted` by default (dropless, cost tracks active experts; `dense` computes
every expert for every token). transformers uses its default attention / experts implementation.
Measured per batch size (best of the timed runs after one warm-up run):
  prefill tokens/s = batch * prompt / prefill time   (ours: the jitted prefill; transformers: one
                     cached forward pass over the prompts)
  decode tokens/s  = batch * new / decode time       (ours: the jitted while-loop; transformers:
                     `generate` time minus its prefill time)
  compile_s        = ahead-of-time compile seconds of our prefill and decode programs
                     (`nemocascade.generate.precompile`), reported apart from the run times.
Writes benchmarks/results/generate.json. `run(quick=True)` is what `benchmarks/run_all.py` calls;
it returns a dict with `decode_speedup_vs_transformers` and `prefill_speedup_vs_transformers`
(at the smallest batch measured).
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import jax
import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from nemocascade.generate import generate, precompile
from nemocascade.model import ModelConfig, load_hf_checkpoint

RESULTS = Path(__file__).resolve().parent / "results" / "generate.json"


def build_models(cfg: ModelConfig, moe_backend: str, seed: int = 0):
    """(transformers model, our model) with the same random weights."""
    import transformers

    hf_cfg = transformers.NemotronHConfig(
        **{
            k: v
            for k, v in cfg.to_hf_config().items()
            if k not in ("architectures", "model_type", "hybrid_override_pattern")
        }
    )
    torch.manual_seed(seed)
    hf = transformers.NemotronHForCausalLM._from_config(hf_cfg, dtype=torch.float32).eval()
    with tempfile.TemporaryDirectory() as tmp:
        hf.save_pretrained(tmp)
        ours = load_hf_checkpoint(tmp, moe_backend=moe_backend)
    return hf, ours


def _prompts(cfg: ModelConfig, batch: int, prompt_len: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(3, cfg.vocab_size, (batch, prompt_len))


def bench_ours(model, prompts: np.ndarray, new: int, repeats: int) -> dict:
    compile_s = precompile(model, prompts.tolist(), max_new_tokens=new)
    generate(model, prompts.tolist(), max_new_tokens=new)  # warm-up
    runs = [generate(model, prompts.tolist(), max_new_tokens=new) for _ in range(repeats)]
    assert all(r.lengths.min() == new for r in runs)
    pre = min(r.timings["prefill_s"] for r in runs)
    dec = min(r.timings["decode_s"] for r in runs)
    b, p = prompts.shape
    return {
        "prefill_s": pre,
        "decode_s": dec,
        "prefill_tok_s": b * p / pre,
        "decode_tok_s": b * new / dec,
        "compile_prefill_s": compile_s["prefill_compile_s"],
        "compile_decode_s": compile_s["decode_compile_s"],
    }


def bench_transformers(model, prompts: np.ndarray, new: int, repeats: int) -> dict:
    ids = torch.as_tensor(prompts, dtype=torch.long)
    mask = torch.ones_like(ids)
    kw = {
        "attention_mask": mask,
        "max_new_tokens": new,
        "min_new_tokens": new,
        "do_sample": False,
        "pad_token_id": 0,
    }
    pre_t, gen_t = [], []
    with torch.no_grad():
        model(ids, attention_mask=mask, use_cache=True)  # warm-up (short)
        model.generate(ids, **{**kw, "max_new_tokens": 2, "min_new_tokens": 2})
        for _ in range(repeats):
            t0 = time.perf_counter()
            model(ids, attention_mask=mask, use_cache=True)
            pre_t.append(time.perf_counter() - t0)
            t0 = time.perf_counter()
            out = model.generate(ids, **kw)
            gen_t.append(time.perf_counter() - t0)
    assert out.shape[1] == prompts.shape[1] + new
    b, p = prompts.shape
    pre, gen = min(pre_t), min(gen_t)
    return {
        "prefill_s": pre,
        "decode_s": gen - pre,
        "prefill_tok_s": b * p / pre,
        "decode_tok_s": b * new / (gen - pre),
    }


def run(
    quick: bool = True,
    batches: tuple[int, ...] | None = None,
    prompt_len: int | None = None,
    new: int | None = None,
    moe_backend: str = "sorted",
    repeats: int = 2,
    hf_repeats: int = 1,
) -> dict:
    """Benchmarks both engines on `ModelConfig.small()`; returns the JSON-ready results."""
    batches = batches or ((8,) if quick else (8, 64))
    prompt_len = prompt_len or (32 if quick else 64)
    new = new or (16 if quick else 64)
    cfg = ModelConfig.small()
    hf, ours = build_models(cfg, moe_backend)
    rows = []
    for b in batches:
        prompts = _prompts(cfg, b, prompt_len)
        o = bench_ours(ours, prompts, new, repeats)
        print(f"batch {b}: ours {o}", flush=True)
        h = bench_transformers(hf, prompts, new, hf_repeats)
        print(f"batch {b}: transformers {h}", flush=True)
        rows.append(
            {
                "batch": b,
                "prompt_len": prompt_len,
                "new_tokens": new,
                "ours": o,
                "transformers": h,
                "decode_speedup": o["decode_tok_s"] / h["decode_tok_s"],
                "prefill_speedup": o["prefill_tok_s"] / h["prefill_tok_s"],
            }
        )
    return {
        "config": "small",
        "moe_backend": moe_backend,
        "device": str(jax.devices()[0].platform),
        "torch_threads": torch.get_num_threads(),
        "rows": rows,
        "decode_speedup_vs_transformers": rows[0]["decode_speedup"],
        "prefill_speedup_vs_transformers": rows[0]["prefill_speedup"],
    }


def print_table(res: dict) -> None:
    head = (
        f"{'batch':>5} {'engine':>12} {'prefill tok/s':>14} {'decode tok/s':>13} "
        f"{'compile pre/dec s':>18}"
    )
    print(head)
    for r in res["rows"]:
        for name in ("ours", "transformers"):
            m = r[name]
            comp = (
                f"{m['compile_prefill_s']:.1f}/{m['compile_decode_s']:.1f}"
                if name == "ours"
                else "-"
            )
            print(
                f"{r['batch']:>5} {name:>12} {m['prefill_tok_s']:>14.1f} "
                f"{m['decode_tok_s']:>13.1f} "
                f"{comp:>18}"
            )
        print(
            f"{r['batch']:>5} {'speedup':>12} {r['prefill_speedup']:>14.2f}x "
            f"{r['decode_speedup']:>12.2f}x"
        )


def main() -> None:
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--quick", action="store_true")
    p.add_argument("--batches", default=None, help="comma-separated batch sizes")
    p.add_argument("--prompt_len", type=int, default=None)
    p.add_argument("--new", type=int, default=None)
    p.add_argument(
        "--moe_backend", default="sorted", help="our MoE backend (sorted: the CPU-fast one)"
    )
    p.add_argument("--repeats", type=int, default=2, help="timed runs of ours (best is kept)")
    p.add_argument("--hf_repeats", type=int, default=1, help="timed runs of transformers")
    p.add_argument("--out", default=str(RESULTS))
    a = p.parse_args()
    batches = tuple(int(x) for x in a.batches.split(",")) if a.batches else None
    res = run(
        quick=a.quick,
        batches=batches,
        prompt_len=a.prompt_len,
        new=a.new,
        moe_backend=a.moe_backend,
        repeats=a.repeats,
        hf_repeats=a.hf_repeats,
    )
    print_table(res)
    Path(a.out).parent.mkdir(parents=True, exist_ok=True)
    Path(a.out).write_text(json.dumps(res, indent=2))
    print(f"wrote {a.out}")


if __name__ == "__main__":
    main()
