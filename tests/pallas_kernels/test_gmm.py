"""pallas_kernels.gmm (Pallas kernel, interpret mode) vs the pure-jnp reference.

Tolerances, fixed up front:
* fp32: |kernel - reference| <= 1e-5 * |reference| + 1e-5 * scale, with
  scale = max |reference| of the tensor being compared (summation order is the
  only difference).
* bf16 inputs: the reference runs in fp32 on the same (bf16-valued) inputs, so
  with fp32 output the fp32 bound above holds; with bf16 output we add one bf16
  ulp of relative error: rtol = 2**-8.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import pallas_kernels
from pallas_kernels.gmm.metadata import make_group_metadata

RTOL_F32 = 1e-5
ATOL_F32 = 1e-5  # times the scale of the compared tensor
RTOL_BF16_OUT = 2.0**-8


def assert_close(actual, expected, *, rtol=RTOL_F32, what=""):
    actual = np.asarray(jnp.asarray(actual, jnp.float32))
    expected = np.asarray(jnp.asarray(expected, jnp.float32))
    assert actual.shape == expected.shape, what
    assert np.isfinite(actual).all(), f"{what}: non-finite values"
    scale = max(float(np.abs(expected).max(initial=0.0)), 1e-30)
    np.testing.assert_allclose(actual, expected, rtol=rtol, atol=ATOL_F32 * scale, err_msg=what)


def make_inputs(m, k, n, group_sizes, dtype=jnp.float32, seed=0):
    keys = jax.random.split(jax.random.key(seed), 3)
    lhs = jax.random.normal(keys[0], (m, k), jnp.float32).astype(dtype)
    rhs = jax.random.normal(keys[1], (len(group_sizes), k, n), jnp.float32).astype(dtype)
    cot = jax.random.normal(keys[2], (m, n), jnp.float32)
    return lhs, rhs, jnp.asarray(group_sizes, jnp.int32), cot


def value_and_grads(fn, lhs, rhs, group_sizes, cot):
    """fn's output and the gradients of <fn(lhs, rhs), cot> w.r.t. lhs and rhs."""

    def loss(a, b):
        out = fn(a, b, group_sizes)
        return jnp.sum(out.astype(jnp.float32) * cot), out

    (_, out), (d_lhs, d_rhs) = jax.value_and_grad(loss, argnums=(0, 1), has_aux=True)(lhs, rhs)
    return out, d_lhs, d_rhs


def check_against_reference(m, k, n, group_sizes, tiling, *, jit=True, impl="pallas"):
    lhs, rhs, sizes, cot = make_inputs(m, k, n, group_sizes)
    if tiling is None:  # all defaults: on CPU that is impl="pallas" with interpret=True

        def kernel(a, b, s):
            return pallas_kernels.gmm(a, b, s, impl=impl)
    else:

        def kernel(a, b, s):
            return pallas_kernels.gmm(a, b, s, interpret=True, tiling=tiling, impl=impl)

    run = jax.jit(value_and_grads, static_argnums=0) if jit else value_and_grads
    got = run(kernel, lhs, rhs, sizes, cot)
    want = value_and_grads(pallas_kernels.gmm_reference, lhs, rhs, sizes, cot)
    for name, a, b in zip(("out", "d_lhs", "d_rhs"), got, want, strict=True):
        assert_close(a, b, what=f"{name} sizes={group_sizes} tiling={tiling}")
    # rows that belong to no group: exactly zero output and zero gradient
    covered = min(int(np.maximum(np.asarray(group_sizes), 0).sum()), m)
    assert not np.asarray(got[0][covered:]).any()
    assert not np.asarray(got[1][covered:]).any()
    return got


# (m, k, n, group_sizes, tiling): ragged M/K/N w.r.t. the tiles in every case.
RAGGED_CASES = {
    "empty_first_and_middle_tail_rows": (100, 72, 40, [0, 30, 0, 41, 20], (16, 32, 16)),
    "empty_last_full_cover": (64, 48, 24, [20, 0, 44, 0], (16, 32, 16)),
    "one_group_spans_all_tiles": (56, 40, 24, [0, 0, 56, 0], (16, 16, 16)),
    "many_groups_per_tile": (40, 24, 20, [3, 1, 0, 5, 2, 20, 9], (32, 16, 8)),
    "all_groups_empty": (24, 16, 8, [0, 0, 0], (8, 8, 8)),
    "sizes_exceed_m_are_clamped": (30, 16, 8, [12, 25, 4], (8, 8, 8)),
    "default_tiling": (50, 33, 17, [7, 0, 30, 2], None),
}


@pytest.mark.parametrize("case", sorted(RAGGED_CASES))
def test_gmm_matches_reference_ragged(case):
    check_against_reference(*RAGGED_CASES[case])


def test_gmm_no_jit():
    # eager interpret mode dispatches every grid step op by op: keep the grid tiny
    check_against_reference(21, 16, 12, [5, 0, 10, 3], (24, 16, 16), jit=False)


def test_ragged_dot_impl_matches_reference():
    check_against_reference(37, 24, 20, [0, 5, 0, 20, 3], None, impl="ragged_dot")


def test_tgmm_matches_reference_and_zeroes_empty_groups():
    lhs, _, sizes, cot = make_inputs(45, 24, 20, [0, 10, 0, 20, 0])
    got = pallas_kernels.tgmm(lhs, cot, sizes, interpret=True, tiling=(16, 16, 8))
    want = pallas_kernels.tgmm_reference(lhs, cot, sizes)
    assert_close(got, want, what="tgmm")
    assert not np.asarray(got[jnp.array([0, 2, 4])]).any()


@pytest.mark.parametrize("out_dtype", [jnp.float32, jnp.bfloat16])
def test_gmm_bf16_inputs_accumulate_in_fp32(out_dtype):
    lhs, rhs, sizes, _ = make_inputs(70, 48, 40, [10, 0, 33, 20], dtype=jnp.bfloat16)
    out = pallas_kernels.gmm(
        lhs, rhs, sizes, interpret=True, tiling=(16, 32, 16), preferred_element_type=out_dtype
    )
    assert out.dtype == out_dtype
    want = pallas_kernels.gmm_reference(lhs.astype(jnp.float32), rhs.astype(jnp.float32), sizes)
    rtol = RTOL_F32 if out_dtype == jnp.float32 else RTOL_BF16_OUT
    assert_close(out, want, rtol=rtol, what=f"bf16 in, {out_dtype} out")
    assert not np.asarray(out[63:]).any()


def test_bf16_grads_have_input_dtypes():
    lhs, rhs, sizes, cot = make_inputs(40, 32, 16, [8, 0, 24], dtype=jnp.bfloat16)
    # The kernel's output is bf16, so its cotangent is rounded to bf16: give the
    # fp32 reference the same bf16-valued cotangent.
    cot = cot.astype(jnp.bfloat16).astype(jnp.float32)

    def kernel(a, b, s):
        return pallas_kernels.gmm(a, b, s, interpret=True, tiling=(16, 16, 16))

    out, d_lhs, d_rhs = jax.jit(value_and_grads, static_argnums=0)(kernel, lhs, rhs, sizes, cot)
    assert (out.dtype, d_lhs.dtype, d_rhs.dtype) == (jnp.bfloat16,) * 3

    def f32(x):
        return x.astype(jnp.float32)

    want = value_and_grads(pallas_kernels.gmm_reference, f32(lhs), f32(rhs), sizes, cot)
    for name, a, b in zip(("out", "d_lhs", "d_rhs"), (out, d_lhs, d_rhs), want, strict=True):
        assert_close(a, b, rtol=RTOL_BF16_OUT, what=f"bf16 {name}")


def test_metadata_visits_are_grouped_by_tile_and_bounded():
    sizes = jnp.array([0, 5, 0, 13, 1, 1, 0, 30], jnp.int32)  # sum 50 < m = 61
    m, tm = 61, 8
    meta = make_group_metadata(sizes, m=m, tm=tm, for_tgmm=False)
    n = int(meta.num_visits)
    groups, tiles = np.asarray(meta.group_ids[:n]), np.asarray(meta.m_tile_ids[:n])
    assert n <= meta.group_ids.shape[0]
    assert (np.diff(tiles) >= 0).all() and (np.diff(groups) >= 0).all()
    assert set(tiles) == set(range(-(-m // tm)))  # every row tile is written
    assert 0 not in groups and 2 not in groups and 6 not in groups  # empty groups skipped
    assert groups[-1] == len(sizes)  # tail pseudo-group covers rows 50..60
    t_meta = make_group_metadata(sizes, m=m, tm=tm, for_tgmm=True)
    t_groups = np.asarray(t_meta.group_ids[: int(t_meta.num_visits)])
    assert set(t_groups) == set(range(len(sizes)))  # every group (even empty) is stored


def test_bad_inputs_raise():
    lhs, rhs, sizes, _ = make_inputs(16, 8, 8, [8, 8])
    with pytest.raises(ValueError, match="shapes do not match"):
        pallas_kernels.gmm(lhs[:, :4], rhs, sizes)
    with pytest.raises(ValueError, match="group_sizes"):
        pallas_kernels.gmm(lhs, rhs, sizes.astype(jnp.float32))
    with pytest.raises(ValueError, match="tiling"):
        pallas_kernels.gmm(lhs, rhs, sizes, tiling=(8, 0, 8))
    with pytest.raises(ValueError, match="at least one group"):
        pallas_kernels.gmm(lhs, rhs[:0], sizes[:0])
    with pytest.raises(ValueError, match="impl"):
        pallas_kernels.gmm(lhs, rhs, sizes, impl="triton")
