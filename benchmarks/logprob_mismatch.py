"""Sampler vs trainer: how far the log-probs and MoE expert choices of the rollout path (cached
prefill, then one token at a time: the Mamba-2 recurrence, attention over the KV cache) are
from the training forward over the whole sequence (chunked SSD, full attention), in fp32 and
in bf16 (bf16 parameters and activations, fp32 accumulation: the accelerator setting).

    python benchmarks/logprob_mismatch.py --quick      # the tiny cascade's model, 8 x (32 + 64)
    python benchmarks/logprob_mismatch.py              # also the `small` config, 8 x (64 + 128)
    python benchmarks/logprob_mismatch.py --checkpoint=runs/tiny_cascade --stage=sft --batch=64

Each row: B random prompts of P tokens continue for G tokens sampled at temperature 1 on the
sampler path; the sampled sequences then go through the training forward. Over the G response
tokens of every row: |log pi_train - log pi_sampler| (mean, max), the fraction of tokens whose
ratio pi_train / pi_sampler is outside [0.5, 2]; over every (token, MoE layer): the fraction
whose top-k expert set differs between the two paths (prompt tokens: prefill vs training
forward; response tokens: decode vs training forward). The same log-prob gaps again with
routing replay (R3, `_r3` keys): the training forward given the experts the sampler used
(`NemotronH(..., routes=)`), so only the dense arithmetic differs. Without `--checkpoint` the
weights are random (near-uniform routing scores: the hardest case for expert ties); with it, a
trained run's stage (`nemocascade.evaluate.load_model`). Writes
benchmarks/results/logprob_mismatch[_checkpoint][_quick].json with the issue's keys
`sampler_trainer_logprob_max_abs_diff_fp32` and `sampler_trainer_tokens_off_band_bf16` (the
first row's model).
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import sys
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from results_io import write_result

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from nemocascade.model import ModelConfig, NemotronH  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results" / "logprob_mismatch.json"


def tiny_cascade_model() -> ModelConfig:
    """The main job's model (`configs/tiny_cascade.py`)."""
    from configs import tiny_cascade

    return ModelConfig.from_mapping(tiny_cascade.get_config().model.to_dict())


def _hidden(model, ids_BT, caches, replay=None):
    """The model's forward (cached when `caches` is given; replaying `replay` [L, B, T, K]):
    final hidden states, caches, and the experts each MoE layer used per token ([L, B, T, K])."""
    seg = jnp.ones(ids_BT.shape, jnp.int32)
    h, caches, stats = model.hidden_states(ids_BT, seg, caches, return_aux=True, routes=replay)
    return h, caches, stats["routes"]


@nnx.jit
def _train_forward(model, ids_BT, replay=None):
    h, _, routes = _hidden(model, ids_BT, None, replay)
    return jax.nn.log_softmax(model.logits(h), axis=-1), routes


@functools.partial(nnx.jit, static_argnames="cache_len")
def _prefill(model, ids_BT, cache_len: int):
    caches = model.init_cache(ids_BT.shape[0], cache_len)
    h, caches, routes = _hidden(model, ids_BT, caches)
    return jax.nn.log_softmax(model.logits(h[:, -1:])[:, 0], axis=-1), caches, routes


@nnx.jit
def _decode(model, tok_B, caches):
    h, caches, routes = _hidden(model, tok_B[:, None], caches)
    return jax.nn.log_softmax(model.logits(h)[:, 0], axis=-1), caches, routes[:, :, 0]


def measure(model, *, batch: int, prompt: int, new: int, seed: int = 0) -> dict:
    """The mismatch of one model (module docstring)."""
    vocab = model.cfg.vocab_size
    rng = np.random.default_rng(seed)
    prompts = jnp.asarray(rng.integers(3, vocab, size=(batch, prompt)), jnp.int32)
    key = jax.random.key(seed)
    t0 = time.perf_counter()
    logp_BV, caches, prompt_routes = _prefill(model, prompts, cache_len=prompt + new)
    toks, sampler_lp, decode_routes = [], [], []
    for t in range(new):
        tok = jax.random.categorical(jax.random.fold_in(key, t), logp_BV)
        toks.append(tok)
        sampler_lp.append(jnp.take_along_axis(logp_BV, tok[:, None], axis=1)[:, 0])
        if t + 1 < new:
            logp_BV, caches, r = _decode(model, tok, caches)
            decode_routes.append(r)
    sample_s = time.perf_counter() - t0
    resp = jnp.stack(toks, axis=1)  # [B, G]
    seq = jnp.concatenate([prompts, resp], axis=1)
    sampler_lp = np.asarray(jnp.stack(sampler_lp, axis=1))

    def gap_of(logp_BTV):  # the log-prob of response token g comes from position prompt - 1 + g
        lp = jnp.take_along_axis(logp_BTV[:, prompt - 1 : -1], resp[..., None], axis=2)[..., 0]
        return np.abs(np.asarray(lp) - sampler_lp)

    logp_BTV, train_routes = _train_forward(model, seq)
    gap = gap_of(logp_BTV)
    log_ratio_bound = np.log(2.0)
    # routes [L, B, T, K]: prompt positions (prefill) and the decoded tokens (fed back: G - 1)
    dec = jnp.stack(decode_routes, axis=2)  # [L, B, G-1, K]
    train = np.sort(np.asarray(train_routes), -1)
    flips_prompt = np.any(np.sort(np.asarray(prompt_routes), -1) != train[:, :, :prompt], -1)
    flips_decode = np.any(
        np.sort(np.asarray(dec), -1) != train[:, :, prompt : prompt + new - 1], -1
    )
    # R3: the sampler's experts at every position but the last (never fed back: -1, fresh)
    last = jnp.full(dec.shape[:2] + (1, dec.shape[3]), -1, jnp.int32)
    gap_r3 = gap_of(_train_forward(model, seq, jnp.concatenate([prompt_routes, dec, last], 2))[0])
    return {
        "param_dtype": model.cfg.param_dtype,
        "compute_dtype": model.cfg.compute_dtype,
        "batch": batch,
        "prompt_tokens": prompt,
        "new_tokens": new,
        "logprob_abs_diff_mean": float(gap.mean()),
        "logprob_abs_diff_max": float(gap.max()),
        "tokens_off_band": float(np.mean(gap > log_ratio_bound)),
        "expert_flips_prompt": float(flips_prompt.mean()),
        "expert_flips_decode": float(flips_decode.mean()),
        "logprob_abs_diff_mean_r3": float(gap_r3.mean()),
        "logprob_abs_diff_max_r3": float(gap_r3.max()),
        "tokens_off_band_r3": float(np.mean(gap_r3 > log_ratio_bound)),
        "sample_s": round(sample_s, 2),
    }


def _as_dtype(model, dtype: str):
    """`model` with parameters and compute in `dtype` (fp32 router, SSM and losses as always)."""
    cfg = dataclasses.replace(model.cfg, param_dtype=dtype, compute_dtype=dtype)
    out = NemotronH(cfg, rngs=nnx.Rngs(0))
    state = jax.tree.map(
        lambda a, b: a.astype(b.dtype) if hasattr(b, "dtype") else a,
        nnx.state(model),
        nnx.state(out),
    )
    nnx.update(out, state)
    return out


def run(
    quick: bool = True,
    write: bool = True,
    checkpoint: str = "",
    stage: str = "",
    batch: int = 8,
    seed: int = 0,
) -> dict:
    if checkpoint:
        from nemocascade.evaluate import load_model

        loaded = load_model(checkpoint, stage=stage or None)
        name = f"{Path(checkpoint).resolve().name}:{loaded.info.get('stage')}"  # no host paths
        models = {name: nnx.merge(loaded.graphdef, loaded.state)}
    else:
        models = {"tiny_cascade (random init)": NemotronH(tiny_cascade_model(), rngs=nnx.Rngs(0))}
        if not quick:
            models["small (random init)"] = NemotronH(ModelConfig.small(), rngs=nnx.Rngs(0))
    sizes = dict(batch=batch, prompt=32, new=64) if quick else dict(batch=batch, prompt=64, new=128)
    sizes["seed"] = seed
    rows = []
    for name, base in models.items():
        base = _as_dtype(base, "float32")
        for dtype in ("float32", "bfloat16"):
            with jax.default_matmul_precision("highest"):  # fp32 matmuls really fp32
                r = {"model": name, **measure(_as_dtype(base, dtype), **sizes)}
            rows.append(r)
            print(
                f"{name} {dtype}: |dlogp| mean {r['logprob_abs_diff_mean']:.2e} max "
                f"{r['logprob_abs_diff_max']:.2e}, off band {100 * r['tokens_off_band']:.3f}%, "
                f"expert flips prompt {100 * r['expert_flips_prompt']:.3f}% decode "
                f"{100 * r['expert_flips_decode']:.3f}%; with R3 |dlogp| mean "
                f"{r['logprob_abs_diff_mean_r3']:.2e} max {r['logprob_abs_diff_max_r3']:.2e}, "
                f"off band {100 * r['tokens_off_band_r3']:.3f}%"
            )
    first = rows[0]["model"]
    res = {
        "rows": rows,
        "sampler_trainer_logprob_max_abs_diff_fp32": next(
            r["logprob_abs_diff_max"]
            for r in rows
            if r["model"] == first and r["param_dtype"] == "float32"
        ),
        "sampler_trainer_tokens_off_band_bf16": next(
            r["tokens_off_band"]
            for r in rows
            if r["model"] == first and r["param_dtype"] == "bfloat16"
        ),
    }
    if write:
        name = (
            "logprob_mismatch" + ("_checkpoint" if checkpoint else "") + ("_quick" if quick else "")
        )
        write_result(res, RESULTS.with_name(name + ".json"))
    return res


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--quick", action="store_true")
    p.add_argument("--checkpoint", default="", help="a run directory or HF checkpoint")
    p.add_argument("--stage", default="", help="with a cascade run: the stage (default: last)")
    p.add_argument("--batch", type=int, default=8, help="prompts (rows) per model and dtype")
    p.add_argument("--seed", type=int, default=0, help="prompts and sampling")
    a = p.parse_args()
    run(quick=a.quick, checkpoint=a.checkpoint, stage=a.stage, batch=a.batch, seed=a.seed)


if __name__ == "__main__":
    main()
