"""SFT train-step and prefill throughput on CPU: ours (JAX) vs Hugging Face transformers, and MFU.

    python benchmarks/train_step.py                 # small config, batch 8 x 512, fp32
    python benchmarks/train_step.py --quick         # small config, batch 2 x 256 (run_all)
    python benchmarks/train_step.py --batch=4 --seq=512 --repeats=5

Both models run in this process on the same random weights (a transformers
`NemotronHForCausalLM` saved with `save_pretrained`, loaded by `load_hf_checkpoint`), on the same
token batch, with the same optimizer (AdamW b1 0.9, b2 0.98, eps 1e-8, weight decay 0.1 on >= 2-D
weights that are not norms/biases, global-norm clipping at 1.0, constant lr):

  ours          `nemocascade.train.sft.sft_step` (forward, backward, clipping, AdamW, MoE bias
                update), `jax.jit` with the state donated, MoE backend `sorted` (the CPU one),
                cross-entropy chunked over 1024 tokens (`loss_chunk_size`, the same option the
                nano SFT config uses; `--loss_chunk=0` materialises [B, T, V] logits and is
                slower: the logits' backward then makes several passes over B*T*V fp32).
  transformers  `model(ids).logits` -> token cross-entropy -> `backward()` ->
                `clip_grad_norm_` -> `torch.optim.AdamW.step()`; attention `sdpa` and the
                default experts implementation (what a user gets; both recorded in the JSON).

Prefill = one forward pass over the batch to fp32 logits (ours: jitted `model(ids)`;
transformers: `torch.no_grad()` forward, no cache). Timings: the four programs run interleaved
for `repeats` rounds after a warm-up; medians are reported (the CPU is shared).

Model FLOPs (per token, see `model_flops_per_token`; nothing counted twice, nothing the
algorithm does not need, no remat recomputation):

  matmul  2 * N_mm per token forward, 6 * N_mm with the backward (dgrad + wgrad), where N_mm =
          active matmul parameters: Mamba in/out projections, attention q/k/v/o, router, top-k
          routed experts (up + down), shared expert, dense MLPs, lm_head (the input embedding is
          a gather and is not counted);
  attn    per attention layer forward 2 * 2 * heads * head_dim * ctx, ctx = (T + 1) / 2 (the
          mean causal context: scores and values), x3 for training;
  ssd     per Mamba layer forward, per head: 2 * (L+1)/2 * (N + P) (intra-chunk causal C.B and
          scores.x, L = chunk length) + 2 * N * P (chunk state) + 2 * N * P (state output),
          x3 for training.
  Depthwise conv, norms, softmax and other elementwise work are not counted.

MFU = model FLOPs per step / step time / peak, where peak = the best fp32 `jnp.dot` FLOP/s on
large squares measured in this process (`matmul_peak_flops`, interleaved with the steps).
Writes benchmarks/results/train_step.json; `run(quick)` is what `benchmarks/run_all.py` calls
(keys `train_mfu`, `train_speedup_vs_transformers`, `prefill_speedup_vs_transformers`).
"""

from __future__ import annotations

import argparse
import functools
import statistics
import sys
import tempfile
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from results_io import write_result

from nemocascade.model import ModelConfig, load_hf_checkpoint
from nemocascade.train.optim import OptimConfig, make_optimizer
from nemocascade.train.sft import sft_step
from nemocascade.train.state import create_train_state

RESULTS = Path(__file__).resolve().parent / "results" / "train_step.json"
OPTIM = OptimConfig(
    lr=1e-5, min_lr=1e-5, warmup_steps=0, b1=0.9, b2=0.98, eps=1e-8, weight_decay=0.1, clip_norm=1.0
)


# ----------------------------------------------------------------------------- FLOP model
def active_matmul_params(cfg: ModelConfig) -> dict[str, int]:
    """Active (per-token) matmul parameters by block type, and the lm_head."""
    d = cfg.hidden_size
    mamba = d * (cfg.mamba_inner + cfg.conv_dim + cfg.mamba_num_heads) + cfg.mamba_inner * d
    attn = d * cfg.head_dim * (2 * cfg.num_attention_heads + 2 * cfg.num_key_value_heads)
    moe = (
        d * cfg.n_routed_experts
        + cfg.num_experts_per_tok * 2 * d * cfg.moe_intermediate_size
        + cfg.n_shared_experts * 2 * d * cfg.moe_shared_expert_intermediate_size
    )
    mlp = 2 * d * cfg.intermediate_size
    per_kind = {"mamba": mamba, "attention": attn, "moe": moe, "mlp": mlp}
    out = {k: per_kind[k] * cfg.block_types.count(k) for k in per_kind}
    out["lm_head"] = d * cfg.vocab_size
    return out


def model_flops_per_token(cfg: ModelConfig, seq: int, train: bool = True) -> dict[str, float]:
    """Model FLOPs per token (see the module docstring); `train` multiplies by 3 (fwd + bwd)."""
    mult = 3 if train else 1
    n_mm = sum(active_matmul_params(cfg).values())
    ctx = (seq + 1) / 2
    attn = 4 * cfg.num_attention_heads * cfg.head_dim * ctx * cfg.block_types.count("attention")
    L, N, P = min(cfg.chunk_size, seq), cfg.ssm_state_size, cfg.mamba_head_dim
    ssd_head = 2 * (L + 1) / 2 * (N + P) + 4 * N * P
    ssd = ssd_head * cfg.mamba_num_heads * cfg.block_types.count("mamba")
    out = {"matmul": 2 * mult * n_mm, "attention": mult * attn, "ssd": mult * ssd}
    out["total"] = sum(out.values())
    return out


def matmul_peak_flops(n: int = 2048, repeats: int = 3) -> float:
    """Best fp32 FLOP/s of `jnp.dot` on [n, n] squares (the MFU denominator)."""
    a = jax.random.normal(jax.random.key(0), (n, n), jnp.float32)
    b = jax.random.normal(jax.random.key(1), (n, n), jnp.float32)
    f = jax.jit(lambda x, y: jnp.dot(x, y, precision=jax.lax.Precision.HIGHEST))
    jax.block_until_ready(f(a, b))
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        jax.block_until_ready(f(a, b))
        best = min(best, time.perf_counter() - t0)
    return 2 * n**3 / best


# ----------------------------------------------------------------------------- models
def build_models(cfg: ModelConfig, moe_backend: str = "sorted", seed: int = 0):
    """(transformers model with sdpa attention and default experts, our model), same weights."""
    import torch
    import transformers

    hf_cfg = transformers.NemotronHConfig(
        **{
            k: v
            for k, v in cfg.to_hf_config().items()
            if k not in ("architectures", "model_type", "hybrid_override_pattern")
        }
    )
    torch.manual_seed(seed)
    hf = transformers.NemotronHForCausalLM._from_config(
        hf_cfg, attn_implementation="sdpa", dtype=torch.float32
    )
    with tempfile.TemporaryDirectory() as tmp:
        hf.save_pretrained(tmp)
        ours = load_hf_checkpoint(tmp, moe_backend=moe_backend, remat=cfg.remat)
    return hf, ours


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


def ours_programs(model, batch: dict, loss_chunk: int = 1024):
    """(train_step() -> metrics, prefill() -> logits) closures over our jitted programs."""
    from flax import nnx

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


def transformers_programs(hf, batch: dict):
    """(train_step() -> loss, prefill() -> logits) closures over the transformers model."""
    import torch

    decay, no_decay = [], []
    for name, p in hf.named_parameters():
        low = name.lower()
        (no_decay if p.ndim < 2 or "norm" in low or "bias" in low else decay).append(p)
    opt = torch.optim.AdamW(
        [
            {"params": decay, "weight_decay": OPTIM.weight_decay},
            {"params": no_decay, "weight_decay": 0.0},
        ],
        lr=OPTIM.lr,
        betas=(OPTIM.b1, OPTIM.b2),
        eps=OPTIM.eps,
    )
    ids = torch.as_tensor(batch["input_ids"], dtype=torch.long)
    tgt = torch.as_tensor(batch["targets"], dtype=torch.long)

    def train():
        hf.train()
        logits = hf(ids).logits
        loss = torch.nn.functional.cross_entropy(
            logits.float().reshape(-1, logits.shape[-1]), tgt.reshape(-1)
        )
        loss.backward()
        torch.nn.utils.clip_grad_norm_(hf.parameters(), OPTIM.clip_norm)
        opt.step()
        opt.zero_grad(set_to_none=True)
        return float(loss.detach())

    def prefill():
        hf.eval()
        with torch.no_grad():
            return hf(ids).logits

    return train, prefill


def interleaved_medians(jobs: dict, repeats: int) -> dict[str, dict]:
    """Runs each job once (warm-up / compile, timed as `first_s`), then `repeats` interleaved
    rounds; returns {name: {"median_s", "min_s", "first_s", "times_s"}}."""
    times = {k: [] for k in jobs}
    first = {}
    for k, fn in jobs.items():
        t0 = time.perf_counter()
        fn()
        first[k] = time.perf_counter() - t0
    for _ in range(repeats):
        for k, fn in jobs.items():
            t0 = time.perf_counter()
            fn()
            times[k].append(time.perf_counter() - t0)
    return {
        k: {
            "median_s": statistics.median(v),
            "min_s": min(v),
            "first_s": first[k],
            "times_s": [round(x, 4) for x in v],
        }
        for k, v in times.items()
    }


def run(
    quick: bool = True,
    batch: int | None = None,
    seq: int | None = None,
    repeats: int | None = None,
    moe_backend: str = "sorted",
    loss_chunk: int = 1024,
    write: bool = True,
) -> dict:
    """Measures everything above on `ModelConfig.small()`; returns the JSON-ready dict."""
    import torch

    batch = batch or (2 if quick else 8)
    seq = seq or (256 if quick else 512)
    repeats = repeats or (1 if quick else 3)
    cfg = ModelConfig.small(moe_backend=moe_backend)
    hf, ours = build_models(cfg, moe_backend)
    data = make_batch(cfg, batch, seq)
    o_train, o_pre = ours_programs(ours, data, loss_chunk)
    h_train, h_pre = transformers_programs(hf, data)
    jobs = {
        "ours_train": o_train,
        "hf_train": h_train,
        "ours_prefill": o_pre,
        "hf_prefill": h_pre,
        "matmul_peak": lambda: None,
    }
    peaks = []
    jobs["matmul_peak"] = lambda: peaks.append(matmul_peak_flops(1024 if quick else 2048))
    t = interleaved_medians(jobs, repeats)
    peak = max(peaks)
    tokens = batch * seq
    f_train = model_flops_per_token(cfg, seq, train=True)
    f_fwd = model_flops_per_token(cfg, seq, train=False)
    res = {
        "config": "small",
        "batch": batch,
        "seq": seq,
        "tokens_per_step": tokens,
        "dtype": "float32",
        "platform": jax.default_backend(),
        "moe_backend": moe_backend,
        "repeats": repeats,
        "ours_loss_chunk_size": loss_chunk,
        "torch_threads": torch.get_num_threads(),
        "transformers_attn_implementation": hf.config._attn_implementation,
        "transformers_experts_implementation": getattr(hf.config, "_experts_implementation", None),
        "flops_per_token_train": f_train,
        "flops_per_token_prefill": f_fwd,
        "matmul_peak_flops": peak,
        "timings": t,
    }
    for name, key, flops in (
        ("train", "train", f_train["total"]),
        ("prefill", "prefill", f_fwd["total"]),
    ):
        for who in ("ours", "hf"):
            s = t[f"{who}_{key}"]["median_s"]
            res[f"{who}_{name}_tok_s"] = tokens / s
            res[f"{who}_{name}_mfu"] = flops * tokens / s / peak
    res["train_mfu"] = res["ours_train_mfu"]
    res["prefill_mfu"] = res["ours_prefill_mfu"]
    res["train_speedup_vs_transformers"] = res["ours_train_tok_s"] / res["hf_train_tok_s"]
    res["prefill_speedup_vs_transformers"] = res["ours_prefill_tok_s"] / res["hf_prefill_tok_s"]
    print_table(res)
    if write:
        out = RESULTS if not quick else RESULTS.with_name("train_step_quick.json")
        write_result(res, out)
    return res


def print_table(res: dict) -> None:
    print(
        f"small config, batch {res['batch']} x {res['seq']} tokens, fp32 on {res['platform']}; "
        f"peak fp32 matmul {res['matmul_peak_flops'] / 1e9:.1f} GFLOP/s; "
        f"train {res['flops_per_token_train']['total'] / 1e6:.1f} MFLOP/token"
    )
    print(f"{'program':<22}{'median s':>10}{'tokens/s':>11}{'MFU':>8}")
    for who, label in (("ours", "ours"), ("hf", "transformers")):
        for name in ("train", "prefill"):
            s = res["timings"][f"{who}_{name}"]["median_s"]
            print(
                f"{label + ' ' + name:<22}{s:>10.3f}{res[f'{who}_{name}_tok_s']:>11.0f}"
                f"{100 * res[f'{who}_{name}_mfu']:>7.1f}%"
            )
    print(
        f"speedup vs transformers: train {res['train_speedup_vs_transformers']:.2f}x, "
        f"prefill {res['prefill_speedup_vs_transformers']:.2f}x"
    )


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--quick", action="store_true")
    p.add_argument("--batch", type=int, default=None)
    p.add_argument("--seq", type=int, default=None)
    p.add_argument("--repeats", type=int, default=None)
    p.add_argument("--moe_backend", default="sorted")
    p.add_argument("--loss_chunk", type=int, default=1024, help="our loss_chunk_size (0: off)")
    a = p.parse_args()
    run(
        quick=a.quick,
        batch=a.batch,
        seq=a.seq,
        repeats=a.repeats,
        moe_backend=a.moe_backend,
        loss_chunk=a.loss_chunk,
    )


if __name__ == "__main__":
    main()
