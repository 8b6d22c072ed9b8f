"""Chunked large-vocabulary losses need far less compiled scratch memory than the naive [B, T, V]
version (XLA's own accounting, compile only: deterministic, nothing is timed)."""

import jax
import jax.numpy as jnp
import pytest

from nemocascade.train import losses

B, T, D, V, CHUNK = 2, 1024, 64, 16384, 128


def _temp_bytes(fn, *args):
    compiled = jax.jit(jax.value_and_grad(fn, argnums=(0, 1))).lower(*args).compile()
    return compiled.memory_analysis().temp_size_in_bytes


@pytest.mark.parametrize("case", ["logprob", "reverse_kl"])
def test_chunked_loss_temp_memory_is_much_lower(case):
    h = jax.ShapeDtypeStruct((B, T, D), jnp.float32)
    w = jax.ShapeDtypeStruct((D, V), jnp.float32)
    tgt = jax.ShapeDtypeStruct((B, T), jnp.int32)
    if case == "logprob":

        def naive(h, w, t):
            return jnp.sum(losses.naive_logprobs_and_entropy(h, w, t)[0])

        def chunked(h, w, t):
            return jnp.sum(losses.token_logprobs(h, w, t, chunk_size=CHUNK))

        args = (h, w, tgt)
    else:

        def naive(h, w, ht, wt):
            return jnp.sum(losses.naive_reverse_kl(h, w, ht, wt))

        def chunked(h, w, ht, wt):
            return jnp.sum(losses.reverse_kl_per_token(h, w, ht, wt, chunk_size=CHUNK))

        args = (h, w, h, w)
    ratio = _temp_bytes(naive, *args) / max(_temp_bytes(chunked, *args), 1)
    print(f"{case}: naive / chunked temp memory = {ratio:.1f}x")
    assert ratio >= 8.0  # the goal, here at B*T = 2048 tokens, V = 16384
