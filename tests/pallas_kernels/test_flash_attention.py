"""pallas_kernels.flash_attention (Pallas kernels, interpret mode) vs the pure-jnp reference.

Tolerances, fixed up front:
* fp32: |kernel - reference| <= 1e-5 * |reference| + 1e-5 * scale, with scale = max |reference|
  of the tensor being compared (summation order is the only difference).
* bf16 inputs and output: the reference runs in fp32 on the same bf16-valued inputs; the kernel
  rounds the probabilities and the output to bf16, so rtol = atol / scale = 2**-7 (two ulps).

Interpret mode pays per grid step and per compile: shapes are tiny and each case compiles one
program (forward + all gradients).
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import pallas_kernels

RTOL_F32 = 1e-5
ATOL_F32 = 1e-5  # times the scale of the compared tensor
TOL_BF16 = 2.0**-7


def assert_close(actual, expected, *, rtol=RTOL_F32, atol=ATOL_F32, what=""):
    actual = np.asarray(jnp.asarray(actual, jnp.float32))
    expected = np.asarray(jnp.asarray(expected, jnp.float32))
    assert actual.shape == expected.shape, what
    assert np.isfinite(actual).all(), f"{what}: non-finite values"
    scale = max(float(np.abs(expected).max(initial=0.0)), 1e-30)
    np.testing.assert_allclose(actual, expected, rtol=rtol, atol=atol * scale, err_msg=what)


def make_inputs(b, t, n, kv, h, dtype=jnp.float32, seed=0):
    rng = np.random.default_rng(seed)  # numpy: no per-shape compile of a jax.random program

    def normal(*shape):
        return jnp.asarray(rng.standard_normal(shape, np.float32))

    q, k, v = normal(b, t, n, h), normal(b, t, kv, h), normal(b, t, kv, h)
    return q.astype(dtype), k.astype(dtype), v.astype(dtype), normal(b, t, n, h)


def value_and_grads(fn, q, k, v, cot):
    """fn's output and the gradients of <fn(q, k, v), cot> w.r.t. q, k and v."""

    def loss(q, k, v):
        out = fn(q, k, v)
        return jnp.sum(out.astype(jnp.float32) * cot), out

    (_, out), grads = jax.value_and_grad(loss, argnums=(0, 1, 2), has_aux=True)(q, k, v)
    return (out, *grads)


def segments(*rows):
    """[B, T] int32 from per-row run lists [(segment id, length), ...]."""
    return jnp.asarray([sum(([s] * n for s, n in row), []) for row in rows], jnp.int32)


# name -> (B, T, N, K, H, segment runs per row or None, causal, block_q, block_k)
CASES = {
    # 3 documents + padding at both ends, GQA 4/2, T = 23 ragged w.r.t. both blocks
    "gqa_packed_ragged": (
        2,
        23,
        4,
        2,
        8,
        [[(1, 5), (2, 9), (3, 6), (0, 3)], [(0, 4), (1, 4), (0, 4), (2, 11)]],
        True,
        8,
        8,
    ),
    "block_q_lt_block_k": (1, 21, 4, 2, 8, [[(1, 6), (2, 12), (0, 3)]], True, 4, 8),
    "block_q_gt_block_k_mha_no_segments": (1, 21, 2, 2, 8, None, True, 8, 4),
    "not_causal": (1, 19, 4, 2, 8, [[(1, 7), (2, 9), (0, 3)]], False, 8, 8),
    # block size 4: query block 1 is all padding, query blocks 2-3 (segment 2) see two fully
    # masked key blocks before their first visible key (the running max starts at -inf)
    "whole_blocks_masked": (1, 16, 2, 1, 8, [[(1, 4), (0, 4), (2, 8)]], True, 4, 4),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_flash_attention_matches_reference(case):
    b, t, n, kv, h, runs, causal, bq, bk = CASES[case]
    q, k, v, cot = make_inputs(b, t, n, kv, h)
    seg = None if runs is None else segments(*runs)

    def kernel(q, k, v):
        return pallas_kernels.flash_attention(
            q, k, v, seg, causal=causal, block_q=bq, block_k=bk, interpret=True
        )

    def reference(q, k, v):
        return pallas_kernels.flash_attention_reference(q, k, v, seg, causal=causal)

    run = jax.jit(value_and_grads, static_argnums=0)
    got, want = run(kernel, q, k, v, cot), run(reference, q, k, v, cot)
    for name, a, w in zip(("out", "dq", "dk", "dv"), got, want, strict=True):
        assert a.dtype == w.dtype, name
        assert_close(a, w, what=f"{case}: {name}")


def test_bf16_forward_and_grad_dtypes():
    q, k, v, cot = make_inputs(1, 20, 4, 2, 8, dtype=jnp.bfloat16, seed=1)
    seg = segments([(1, 8), (2, 9), (0, 3)])
    cot = cot.astype(jnp.bfloat16).astype(jnp.float32)  # the bf16 output's cotangent is bf16

    def kernel(q, k, v):
        return pallas_kernels.flash_attention(q, k, v, seg, block_q=8, block_k=8, interpret=True)

    def reference(q, k, v):
        return pallas_kernels.flash_attention_reference(q, k, v, seg)

    run = jax.jit(value_and_grads, static_argnums=0)
    got = run(kernel, q, k, v, cot)
    assert all(x.dtype == jnp.bfloat16 for x in got)
    want = run(reference, *(x.astype(jnp.float32) for x in (q, k, v)), cot)
    for name, a, w in zip(("out", "dq", "dk", "dv"), got, want, strict=True):
        assert_close(a, w, rtol=TOL_BF16, atol=TOL_BF16, what=f"bf16 {name}")


@pytest.mark.parametrize(
    "shape",
    [
        (1, 1024, 32, 2, 128, jnp.bfloat16, 512, 512),  # nano_30b_a3b heads, TPU-sized tiles
        (2, 1000, 8, 2, 64, jnp.float32, 256, 128),  # small config heads, ragged T
    ],
)
def test_lowers_for_tpu(shape):
    """Ahead-of-time lowering for TPU from CPU (Pallas -> Mosaic) of the forward and both
    backward kernels: catches block shapes Mosaic rejects (last two dims must be multiples of
    (8, 128) or the full dim) and primitives without a Mosaic lowering. Mosaic's own compile
    runs only on a TPU."""
    b, t, n, kv, h, dtype, bq, bk = shape

    def loss(q, k, v, s):
        o = pallas_kernels.flash_attention(q, k, v, s, block_q=bq, block_k=bk, interpret=False)
        return jnp.sum(jnp.square(o.astype(jnp.float32)))

    args = (
        jax.ShapeDtypeStruct((b, t, n, h), dtype),
        jax.ShapeDtypeStruct((b, t, kv, h), dtype),
        jax.ShapeDtypeStruct((b, t, kv, h), dtype),
        jax.ShapeDtypeStruct((b, t), jnp.int32),
    )
    grad = jax.jit(jax.grad(loss, argnums=(0, 1, 2)))
    module = jax.export.export(grad, platforms=["tpu"])(*args).mlir_module()
    assert module.count("tpu_custom_call") == 3
    for name in ("fwd", "dkv", "dq"):
        assert module.count(f'kernel_name = "nemocascade_flash_{name}"') == 1, name


def test_bad_inputs_raise():
    q, k, v, _ = make_inputs(1, 8, 4, 2, 8)
    with pytest.raises(ValueError, match="multiple of the kv heads"):
        pallas_kernels.flash_attention(q[:, :, :3], k, v)
    with pytest.raises(ValueError, match="disagree"):
        pallas_kernels.flash_attention(q, k[:, :4], v[:, :4])
    with pytest.raises(ValueError, match="segment_ids"):
        pallas_kernels.flash_attention(q, k, v, jnp.ones((1, 8), jnp.float32))
    with pytest.raises(ValueError, match="dtype"):
        pallas_kernels.flash_attention(q, k.astype(jnp.bfloat16), v)
    with pytest.raises(ValueError, match="block sizes"):
        pallas_kernels.flash_attention(q, k, v, block_q=0)
