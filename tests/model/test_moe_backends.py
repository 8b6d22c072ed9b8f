"""Every MoE backend agrees with the one-hot `dense` oracle: forward and gradients, fp32, 1e-5."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from nemocascade.model import moe_backends as mb

TOL = {"rtol": 1e-5, "atol": 1e-5}


def _case(T=24, D=16, F=8, E=6, K=2, seed=0):
    """Random routing with an empty expert (E-1), a hot expert (0) and one 'no expert' slot."""
    ks = jax.random.split(jax.random.key(seed), 6)
    x_TD = jax.random.normal(ks[0], (T, D))
    up_EDF = jax.random.normal(ks[1], (E, D, F)) / np.sqrt(D)
    down_EFD = jax.random.normal(ks[2], (E, F, D)) / np.sqrt(F)
    logits = jax.random.normal(ks[3], (T, E - 1)).at[:, 0].add(1.5)  # expert E-1 never chosen
    idx_TK = jnp.argsort(-logits, axis=1)[:, :K].astype(jnp.int32)
    idx_TK = idx_TK.at[3, 1].set(E)  # a slot routed nowhere contributes zero
    w_TK = jax.random.uniform(ks[4], (T, K), minval=0.1, maxval=1.0)
    r_TD = jax.random.normal(ks[5], (T, D))
    return x_TD, idx_TK, w_TK, up_EDF, down_EFD, r_TD


def _value_and_grads(fn, x_TD, idx_TK, w_TK, up_EDF, down_EFD, r_TD):
    def loss(x, w, up, down):
        y = fn(x, idx_TK, w, up, down)
        return jnp.sum(y * r_TD), y

    (_, y), grads = jax.jit(jax.value_and_grad(loss, argnums=(0, 1, 2, 3), has_aux=True))(
        x_TD, w_TK, up_EDF, down_EFD
    )
    return y, grads


BACKENDS = {
    "ragged_dot": mb.ragged_dot_experts,
    "pallas": mb.pallas_experts,  # interpret mode on CPU
    "sorted": mb.sorted_experts,
    "sorted_tile4": functools.partial(mb.sorted_experts_tiled, tile_rows=4),
    "sorted_tile1": functools.partial(mb.sorted_experts_tiled, tile_rows=1),
}


@pytest.mark.parametrize("name", sorted(BACKENDS))
def test_backend_matches_dense_forward_and_grads(name):
    case = _case()
    y_ref, g_ref = _value_and_grads(mb.dense_experts, *case)
    y, g = _value_and_grads(BACKENDS[name], *case)
    np.testing.assert_allclose(y, y_ref, **TOL)
    for a, b, what in zip(g, g_ref, ("x", "w", "up", "down"), strict=True):
        np.testing.assert_allclose(a, b, **TOL, err_msg=f"grad {what}")
    # the empty expert gets exactly zero weight gradient
    assert float(jnp.max(jnp.abs(g[2][-1]))) == 0.0 and float(jnp.max(jnp.abs(g[3][-1]))) == 0.0


def test_registry_and_entry_point():
    assert {"dense", "ragged_dot", "pallas", "sorted"} <= set(mb.available_backends())
    x_TD, idx_TK, w_TK, up_EDF, down_EFD, _ = _case(seed=1)
    y = mb.expert_mlp(x_TD, idx_TK, w_TK, up_EDF, down_EFD, backend="sorted")
    np.testing.assert_allclose(y, mb.dense_experts(x_TD, idx_TK, w_TK, up_EDF, down_EFD), **TOL)
    with pytest.raises(ValueError, match="unknown MoE backend"):
        mb.expert_mlp(x_TD, idx_TK, w_TK, up_EDF, down_EFD, backend="nope")
    with pytest.raises(ValueError, match="down_EFD"):
        mb.expert_mlp(x_TD, idx_TK, w_TK, up_EDF, up_EDF, backend="dense")
    with pytest.raises(ValueError, match="idx_TK"):
        mb.expert_mlp(x_TD, idx_TK[:-1], w_TK[:-1], up_EDF, down_EFD, backend="dense")


def test_bf16_keeps_dtype_and_stays_close():
    x_TD, idx_TK, w_TK, up_EDF, down_EFD, _ = _case(seed=2)
    args = (
        x_TD.astype(jnp.bfloat16),
        idx_TK,
        w_TK,
        up_EDF.astype(jnp.bfloat16),
        down_EFD.astype(jnp.bfloat16),
    )
    y_ref = mb.dense_experts(*args)
    for name in ("ragged_dot", "sorted"):  # (the Pallas kernel has its own bf16 tests)
        y = mb.get_backend(name)(*args)
        assert y.dtype == jnp.bfloat16
        np.testing.assert_allclose(
            np.asarray(y, np.float32), np.asarray(y_ref, np.float32), rtol=2e-2, atol=2e-2
        )


@pytest.mark.parametrize("tile_rows", [None, 3])
def test_permute_is_a_bijection_sorted_by_expert(tile_rows):
    _, idx_TK, *_ = _case(seed=3)
    E = 6
    perm = mb.permute(idx_TK, E, tile_rows=tile_rows)
    pos = np.asarray(perm.pos_TK).reshape(-1)
    assign = np.asarray(perm.assign_N)
    N, A = assign.shape[0], pos.shape[0]
    e_A = np.asarray(idx_TK).reshape(-1)
    valid = e_A < E
    assert np.all(pos[~valid] == N)
    np.testing.assert_array_equal(assign[pos[valid]], np.nonzero(valid)[0])  # inverse maps
    assert np.sum(assign < A) == valid.sum()
    # rows are grouped by expert in increasing order, padding rows between groups
    experts_in_order = e_A[assign[assign < A]]
    assert np.all(np.diff(experts_in_order) >= 0)
    np.testing.assert_array_equal(np.asarray(perm.group_sizes_E)[:E].sum() >= valid.sum(), True)
    if tile_rows is not None:
        tile_of_row = np.arange(N) // tile_rows
        te = np.asarray(perm.tile_expert_G)
        rows = np.nonzero(assign < A)[0]
        np.testing.assert_array_equal(te[tile_of_row[rows]], e_A[assign[rows]])
        assert int(perm.num_tiles) <= -(-A // tile_rows) + E
