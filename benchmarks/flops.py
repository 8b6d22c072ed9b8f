"""The model FLOP count behind MFU (`train_step.py`) and the fp32 matmul peak it divides by.

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
"""

from __future__ import annotations

import side_by_side as sbs

from nemocascade.model import ModelConfig


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
    import jax
    import jax.numpy as jnp

    a = jax.random.normal(jax.random.key(0), (n, n), jnp.float32)
    b = jax.random.normal(jax.random.key(1), (n, n), jnp.float32)
    f = jax.jit(lambda x, y: jnp.dot(x, y, precision=jax.lax.Precision.HIGHEST))
    jax.block_until_ready(f(a, b))
    best = min(sbs.timed(lambda: jax.block_until_ready(f(a, b)))[0] for _ in range(repeats))
    return 2 * n**3 / best


# ----------------------------------------------------------------------------- programs
