"""pallas_kernels.gmm on shapes of the real model configs, and vs jax's megablox kernel.

Same tolerances as test_gmm.py (fp32: rtol 1e-5, atol 1e-5 * max|reference|;
bf16 output: rtol 2**-8). Everything runs in interpret mode on CPU.
"""

import importlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import pallas_kernels
from pallas_kernels.gmm import default_tiling
from pallas_kernels.gmm.metadata import make_group_metadata

RTOL_F32, ATOL_F32, RTOL_BF16_OUT = 1e-5, 1e-5, 2.0**-8

# (hidden D, expert width F, experts E) of the presets; see nemocascade/model/config.py.
SMALL = (512, 256, 32)
NANO_30B = (2688, 1856, 128)


def assert_close(actual, expected, *, rtol=RTOL_F32, what=""):
    actual = np.asarray(jnp.asarray(actual, jnp.float32))
    expected = np.asarray(jnp.asarray(expected, jnp.float32))
    assert np.isfinite(actual).all(), f"{what}: non-finite values"
    scale = float(np.abs(expected).max(initial=0.0))
    np.testing.assert_allclose(actual, expected, rtol=rtol, atol=ATOL_F32 * scale, err_msg=what)


def routed_group_sizes(num_tokens, num_experts, seed, dropped=0):
    """Tokens per expert for `num_tokens` random assignments (most experts empty when
    num_tokens is small), minus `dropped` tokens taken off the end (sum < M)."""
    expert_of_token = np.random.default_rng(seed).integers(0, num_experts, num_tokens - dropped)
    return jnp.asarray(np.bincount(expert_of_token, minlength=num_experts), jnp.int32)


def test_small_config_expert_up_projection_with_grads():
    """[M, D] x [E, D, F] on the `small` preset: forward, d_lhs and d_rhs (all 32 experts)."""
    d, f, e = SMALL
    m = 48
    sizes = routed_group_sizes(m, e, seed=0, dropped=5)
    keys = jax.random.split(jax.random.key(1), 3)
    x_MD = jax.random.normal(keys[0], (m, d))
    w_up_EDF = jax.random.normal(keys[1], (e, d, f)) / np.sqrt(d)
    cot_MF = jax.random.normal(keys[2], (m, f))

    def loss(gmm, x, w_up):
        h_MF = gmm(x, w_up, sizes)
        return jnp.sum(h_MF * cot_MF), h_MF

    def kernel(a, b, s):
        return pallas_kernels.gmm(a, b, s, interpret=True)

    grad_fn = jax.value_and_grad(loss, argnums=(1, 2), has_aux=True)
    (_, got_out), got_grads = jax.jit(grad_fn, static_argnums=0)(kernel, x_MD, w_up_EDF)
    (_, want_out), want_grads = grad_fn(pallas_kernels.gmm_reference, x_MD, w_up_EDF)
    assert_close(got_out, want_out, what="out")
    for name, a, b in zip(("d_x", "d_w_up"), got_grads, want_grads, strict=True):
        assert_close(a, b, what=name)


@pytest.mark.parametrize("projection", ["up", "down"])
def test_nano_30b_shapes_bf16_forward(projection):
    """Real D=2688, F=1856 with the default tiling; F is not a multiple of 128, so the
    last n tile (up) or k tile (down) is ragged. Only 8 of the 128 experts are
    materialised to keep memory small (E only changes the visit list, tested below)."""
    d, f, _ = NANO_30B
    e, m = 8, 24
    k, n = (d, f) if projection == "up" else (f, d)
    sizes = routed_group_sizes(m, e, seed=2, dropped=3)
    rng = np.random.default_rng(3)  # numpy: much faster than threefry for 40M values
    lhs = jnp.asarray(rng.standard_normal((m, k), np.float32), jnp.bfloat16)
    rhs = jnp.asarray(rng.standard_normal((e, k, n), np.float32) / np.sqrt(k), jnp.bfloat16)
    out = jax.jit(lambda a, b, s: pallas_kernels.gmm(a, b, s, interpret=True))(lhs, rhs, sizes)
    assert out.dtype == jnp.bfloat16 and out.shape == (m, n)
    want = pallas_kernels.gmm_reference(lhs.astype(jnp.float32), rhs.astype(jnp.float32), sizes)
    assert_close(out, want, rtol=RTOL_BF16_OUT, what=f"nano {projection}")


def test_metadata_at_nano_30b_scale():
    """128 experts, 4096 routed rows, real default tm: every row tile is written once
    or more, in order, and the visit count respects the static bound."""
    m, e = 4096, NANO_30B[2]
    sizes = routed_group_sizes(m, e, seed=4, dropped=100)
    tm = default_tiling(m, NANO_30B[0], NANO_30B[1], e, native=False)[0]
    meta = make_group_metadata(sizes, m=m, tm=tm, for_tgmm=False)
    n = int(meta.num_visits)
    tiles = np.asarray(meta.m_tile_ids[:n])
    assert n <= meta.group_ids.shape[0]
    assert (np.diff(tiles) >= 0).all() and set(tiles) == set(range(-(-m // tm)))


def test_matches_jax_megablox_in_interpret_mode():
    """Second reference: jax's megablox TPU kernel (interpret mode). It needs M to be
    a multiple of tm and leaves rows after the last group uninitialised, so the
    comparison uses sum(group_sizes) == M on the small config's D/F/E."""
    megablox = importlib.import_module("jax.experimental.pallas.ops.tpu.megablox.gmm")
    d, f, e = SMALL
    m = 128
    sizes = routed_group_sizes(m, e, seed=5)
    keys = jax.random.split(jax.random.key(6), 3)
    lhs = jax.random.normal(keys[0], (m, d))
    rhs = jax.random.normal(keys[1], (e, d, f))
    grad = jax.random.normal(keys[2], (m, f))
    tiling = (128, d, f)  # one k and n tile: interpret mode pays per grid step
    ours = pallas_kernels.gmm(lhs, rhs, sizes, interpret=True, tiling=tiling)
    theirs = megablox.gmm(lhs, rhs, sizes, tiling=tiling, interpret=True)
    assert_close(ours, theirs, what="gmm vs megablox")
    ours_t = pallas_kernels.tgmm(lhs, grad, sizes, interpret=True, tiling=tiling)
    theirs_t = megablox.tgmm(lhs.T, grad, sizes, tiling=tiling, interpret=True)
    assert_close(ours_t, theirs_t, what="tgmm vs megablox")


@pytest.mark.parametrize("generation", [4, 5, 6])
def test_default_tiling_lowers_for_tpu(generation):
    """Ahead-of-time lowering for TPU from CPU (Pallas -> Mosaic) of forward + both gradients
    with each generation's default tiling, on the real shapes (all 128 experts, abstract
    arrays) in bf16 and a ragged small-config shape in fp32. This catches block shapes
    that Mosaic rejects (last two dims must be multiples of (8, 128) or the full dim)."""
    d, f, e = NANO_30B
    sd, sf, se = SMALL
    cases = [
        (4096, d, f, e, jnp.bfloat16),
        (4096, f, d, e, jnp.bfloat16),
        (24, d, f, e, jnp.bfloat16),
        (1000, sd, sf, se, jnp.float32),
    ]
    for m, k, n, g, dtype in cases:
        tiles = default_tiling(m, k, n, g, native=True, generation=generation)

        def loss(a, b, s, tiles=tiles):
            out = pallas_kernels.gmm(a, b, s, interpret=False, tiling=tiles)
            return jnp.sum(jnp.square(out.astype(jnp.float32)))  # the backward needs `out`

        args = (
            jax.ShapeDtypeStruct((m, k), dtype),
            jax.ShapeDtypeStruct((g, k, n), dtype),
            jax.ShapeDtypeStruct((g,), jnp.int32),
        )
        exported = jax.export.export(jax.jit(jax.grad(loss, argnums=(0, 1))), platforms=["tpu"])(
            *args
        )
        module = exported.mlir_module()
        # gmm forward, gmm with transposed rhs (d_lhs), tgmm (d_rhs)
        assert module.count("tpu_custom_call") == 3, (m, k, n, tiles)
        assert module.count('kernel_name = "nemocascade_gmm"') == 2, (m, k, n, tiles)
