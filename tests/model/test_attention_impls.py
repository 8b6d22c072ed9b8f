"""attention_impl = blockwise / pallas against naive: the attention core, the layer (with and
without a KV cache) and a whole tiny model, on packed rows with padding.

Tolerance, fixed up front (fp32, only the summation order differs):
|impl - naive| <= 1e-5 * |naive| + 1e-5 * scale, scale = max |naive| of the compared tensor.
The pallas impl runs its kernels in interpret mode here (CPU).
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from nemocascade.model import ModelConfig, NemotronH
from nemocascade.model.attention import (
    Attention,
    KVCache,
    attention_weights_mask,
    blockwise_attention,
    gqa_attention,
)

TOL = 1e-5


def assert_close(actual, expected, what=""):
    actual, expected = np.asarray(actual, np.float32), np.asarray(expected, np.float32)
    assert actual.shape == expected.shape, what
    assert np.isfinite(actual).all(), f"{what}: non-finite values"
    scale = max(float(np.abs(expected).max(initial=0.0)), 1e-30)
    np.testing.assert_allclose(actual, expected, rtol=TOL, atol=TOL * scale, err_msg=what)


def segments(*rows):
    """[B, T] int32 from per-row run lists [(segment id, length), ...]."""
    return jnp.asarray([sum(([s] * n for s, n in row), []) for row in rows], jnp.int32)


def normal(rng, *shape):
    return jnp.asarray(rng.standard_normal(shape, np.float32))


# 3 documents and padding (id 0) at both ends, padding in the middle, T = 23
PACKED = segments(
    [(1, 5), (2, 9), (3, 6), (0, 3)],
    [(0, 4), (1, 4), (0, 4), (2, 11)],
)
# with blocks of 4: query block 1 is all padding; the segment-2 query blocks meet two fully
# masked key blocks before their first visible key (the running max is still -inf)
WHOLE_BLOCKS_MASKED = segments([(1, 4), (0, 4), (2, 8)], [(0, 4), (0, 4), (1, 8)])


def naive_attention(q, k, v, seg):
    pos = jnp.arange(q.shape[1])
    return gqa_attention(q, k, v, attention_weights_mask(seg, seg, pos, pos))


def core_value_and_grads(fn, q, k, v, cot):
    def loss(q, k, v):
        out = fn(q, k, v)
        return jnp.sum(out * cot), out

    (_, out), grads = jax.value_and_grad(loss, argnums=(0, 1, 2), has_aux=True)(q, k, v)
    return (out, *grads)


SEGMENTS = {"packed": PACKED, "whole_blocks_masked": WHOLE_BLOCKS_MASKED}


def core_inputs(seg_name):
    b, t = SEGMENTS[seg_name].shape
    rng = np.random.default_rng(0)
    q, k, v = normal(rng, b, t, 4, 8), normal(rng, b, t, 2, 8), normal(rng, b, t, 2, 8)
    return q, k, v, normal(rng, b, t, 4, 8)


@functools.cache
def naive_core(seg_name):
    seg = SEGMENTS[seg_name]
    fn = functools.partial(naive_attention, seg=seg)
    return jax.jit(core_value_and_grads, static_argnums=0)(fn, *core_inputs(seg_name))


@pytest.mark.parametrize(
    "seg_name, blocks",
    [
        ("packed", (8, 4)),  # ragged: T = 23 is a multiple of neither block
        ("packed", (5, 3)),
        ("packed", (512, 512)),  # one block each, clamped to T
        ("whole_blocks_masked", (4, 4)),
    ],
)
def test_blockwise_core_matches_naive(seg_name, blocks):
    seg = SEGMENTS[seg_name]

    def blockwise(q, k, v):
        return blockwise_attention(q, k, v, seg, block_q=blocks[0], block_k=blocks[1])

    got = jax.jit(core_value_and_grads, static_argnums=0)(blockwise, *core_inputs(seg_name))
    for name, a, w in zip(("out", "dq", "dk", "dv"), got, naive_core(seg_name), strict=True):
        assert_close(a, w, what=f"{seg_name} {blocks}: {name}")
    # padding rows are not fully masked: each attends to the earlier padding, like naive
    pad = np.asarray(seg) == 0
    assert np.abs(np.asarray(got[0])[pad]).max() > 0


def _layer(impl: str, **kw) -> Attention:
    cfg = ModelConfig.tiny(attention_impl=impl, attention_block_q=8, attention_block_k=4, **kw)
    return Attention(cfg, rngs=nnx.Rngs(0))  # same seed: same parameters for every impl


def test_blockwise_layer_matches_naive_with_param_grads():
    rng = np.random.default_rng(1)
    b, t = PACKED.shape
    x = normal(rng, b, t, 64)
    cot = normal(rng, b, t, 64)

    def value_and_grads(impl):
        graphdef, params = nnx.split(_layer(impl))

        def loss(p, x):
            y, _ = nnx.merge(graphdef, p)(x, PACKED)
            return jnp.sum(y * cot), y

        (_, y), grads = jax.jit(jax.value_and_grad(loss, argnums=(0, 1), has_aux=True))(params, x)
        return y, grads

    y0, (gp0, gx0) = value_and_grads("naive")
    y1, (gp1, gx1) = value_and_grads("blockwise")
    assert_close(y1, y0, "layer output")
    assert_close(gx1, gx0, "d x")
    flat0, flat1 = nnx.to_flat_state(gp0), nnx.to_flat_state(gp1)
    for (path, a), (_, w) in zip(flat1, flat0, strict=True):
        assert_close(a[...], w[...], f"d {'/'.join(map(str, path))}")


CACHE_SEG = segments([(0, 3), (1, 11)], [(1, 14)])


@functools.cache
def uncached_naive_layer():
    x = normal(np.random.default_rng(2), *CACHE_SEG.shape, 64)
    return jax.jit(lambda x: _layer("naive")(x, CACHE_SEG))(x)[0]


@pytest.mark.parametrize("impl", ["naive", "blockwise", "pallas"])
def test_cached_prefill_and_decode_match_full_forward(impl):
    """Prefill in two chunks (the second starts at cache index 6), then decode one token at a
    time: equals one uncached naive pass. Rows are left-padded like the rollout engine's."""
    seg = CACHE_SEG
    b, t = seg.shape
    x = normal(np.random.default_rng(2), b, t, 64)
    full = uncached_naive_layer()
    layer = _layer(impl)
    graphdef, params = nnx.split(layer)

    @jax.jit
    def step(x_chunk, seg_chunk, cache):
        return nnx.merge(graphdef, params)(x_chunk, seg_chunk, cache)

    cache = KVCache.init(ModelConfig.tiny(), b, 16, jnp.float32)
    outs = []
    for lo, hi in [(0, 6), (6, 9)] + [(i, i + 1) for i in range(9, t)]:
        y, cache = step(x[:, lo:hi], seg[:, lo:hi], cache)
        outs.append(y)
    assert int(cache.index) == t
    assert_close(jnp.concatenate(outs, axis=1), full, f"{impl}: cached vs full")


MODEL_SEG = segments([(1, 7), (2, 10), (0, 3)], [(0, 2), (1, 18)])
MODEL_BASE = ModelConfig.tiny(attention_block_q=8, attention_block_k=4)


@functools.cache
def model_logits_and_grads(impl):
    ids = jnp.asarray(np.random.default_rng(3).integers(1, 256, MODEL_SEG.shape))
    cot = normal(np.random.default_rng(4), *MODEL_SEG.shape, 256)
    cfg = MODEL_BASE.replace(attention_impl=impl)
    graphdef, params, rest = nnx.split(NemotronH(cfg, rngs=nnx.Rngs(0)), nnx.Param, ...)

    def loss(p):
        logits = nnx.merge(graphdef, p, rest)(ids, segment_ids=MODEL_SEG)
        return jnp.sum(logits * cot), logits

    (_, logits), grads = jax.jit(jax.value_and_grad(loss, has_aux=True))(params)
    return logits, grads


@pytest.mark.parametrize("impl", ["blockwise", "pallas"])
def test_model_impls_match_naive(impl):
    """A tiny NemotronH (every block type) on a packed batch: logits and the gradients of every
    parameter equal the naive model's."""
    logits0, grads0 = model_logits_and_grads("naive")
    logits1, grads1 = model_logits_and_grads(impl)
    assert_close(logits1, logits0, f"{impl}: logits")
    flat0, flat1 = nnx.to_flat_state(grads0), nnx.to_flat_state(grads1)
    for (path, a), (_, w) in zip(flat1, flat0, strict=True):
        assert_close(a[...], w[...], f"{impl}: d {'/'.join(map(str, path))}")


def test_block_sizes_are_validated():
    with pytest.raises(ValueError, match="attention_block_q"):
        ModelConfig.tiny(attention_block_q=0)
