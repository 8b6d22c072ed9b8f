"""Token sampling for the rollout engine: temperature, top-k, top-p, greedy, per-row PRNG keys.

The order of the logit transforms follows Hugging Face transformers' `generate`: temperature, then
top-k, then top-p (nucleus). Masked logits are `-inf`; ties at a top-k / top-p threshold are kept
(as transformers does). All functions work on a batch of rows `[B, V]` of fp32 logits.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp


@dataclasses.dataclass(frozen=True)
class SamplingMode:
    """The static (compile-time) part of a sampling configuration.

    greedy: argmax decoding (temperature == 0).
    top_k:  keep the k largest logits (0 = off). Static because `lax.top_k` needs a static k.
    top_p:  whether nucleus filtering is on (its threshold is a runtime value).
    """

    greedy: bool
    top_k: int
    top_p: bool


def top_k_mask(logits_BV: jax.Array, k: int) -> jax.Array:
    """Logits with everything below the k-th largest value of each row set to -inf."""
    kth_B1 = jax.lax.top_k(logits_BV, k)[0][:, -1:]
    return jnp.where(logits_BV < kth_B1, -jnp.inf, logits_BV)


def top_p_mask(
    logits_BV: jax.Array, top_p: jax.Array, sorted_desc_BK: jax.Array | None = None
) -> jax.Array:
    """Logits outside the nucleus set to -inf.

    The nucleus is the smallest set of highest-probability tokens whose probability sums to at
    least `top_p` (always at least one token). `sorted_desc_BK`, if given, holds the row's
    candidate logits in descending order (e.g. the output of `lax.top_k`); any -inf tail is
    ignored. Otherwise the full row is sorted.
    """
    if sorted_desc_BK is None:
        sorted_desc_BK = -jnp.sort(-logits_BV, axis=-1)
    probs_BK = jax.nn.softmax(sorted_desc_BK, axis=-1)
    before_BK = jnp.cumsum(probs_BK, axis=-1) - probs_BK  # mass of strictly better ranks
    keep_BK = (before_BK < top_p) | (jnp.arange(probs_BK.shape[-1]) == 0)
    n_keep_B1 = jnp.sum(keep_BK, axis=-1, keepdims=True)
    threshold_B1 = jnp.take_along_axis(sorted_desc_BK, n_keep_B1 - 1, axis=-1)
    return jnp.where(logits_BV < threshold_B1, -jnp.inf, logits_BV)


def sampling_logits(
    logits_BV: jax.Array, mode: SamplingMode, temperature: jax.Array, top_p: jax.Array
) -> jax.Array:
    """The logits of the distribution actually sampled from: logits/T, then top-k, then top-p."""
    x = logits_BV.astype(jnp.float32) / temperature
    candidates = None
    if mode.top_k > 0:
        k = min(mode.top_k, x.shape[-1])
        candidates = jax.lax.top_k(x, k)[0]  # [B, k], descending
        x = jnp.where(x < candidates[:, -1:], -jnp.inf, x)
    if mode.top_p:
        x = top_p_mask(x, top_p, candidates)
    return x


def row_keys(seed: int | jax.Array, rows_B: jax.Array) -> jax.Array:
    """One PRNG key per output row: `fold_in(key(seed), row)` (independent of batch layout)."""
    base = jax.random.key(seed)
    return jax.vmap(lambda r: jax.random.fold_in(base, r))(rows_B)


def sample_step(
    logits_BV: jax.Array,
    keys_B: jax.Array,
    step: jax.Array,
    mode: SamplingMode,
    temperature: jax.Array,
    top_p: jax.Array,
):
    """Samples one token per row; `step` ([] or [B]: each row's own step) picks the row's key
    for this token, `fold_in(keys_B[b], step[b])`.

    Returns (tokens_B int32, logprob_B, logprob_untempered_B): the log-probability of the token
    under the distribution sampled from (after temperature/top-k/top-p), and under the plain
    temperature-1 softmax of the model's logits (what a trainer's forward pass computes). In
    greedy mode the sampled distribution is a point mass; `logprob_B` then reports the untempered
    log-probability (the same as `logprob_untempered_B`).
    """
    logits_BV = logits_BV.astype(jnp.float32)
    logp_raw_BV = jax.nn.log_softmax(logits_BV, axis=-1)
    if mode.greedy:
        tok_B = jnp.argmax(logits_BV, axis=-1).astype(jnp.int32)
        lp_B = jnp.take_along_axis(logp_raw_BV, tok_B[:, None], axis=-1)[:, 0]
        return tok_B, lp_B, lp_B
    x_BV = sampling_logits(logits_BV, mode, temperature, top_p)
    steps_B = jnp.broadcast_to(jnp.asarray(step, jnp.int32), keys_B.shape)
    step_keys = jax.vmap(jax.random.fold_in)(keys_B, steps_B)
    tok_B = jax.vmap(jax.random.categorical)(step_keys, x_BV).astype(jnp.int32)
    lp_B = jnp.take_along_axis(jax.nn.log_softmax(x_BV, axis=-1), tok_B[:, None], axis=-1)[:, 0]
    lp_raw_B = jnp.take_along_axis(logp_raw_BV, tok_B[:, None], axis=-1)[:, 0]
    return tok_B, lp_B, lp_raw_B
