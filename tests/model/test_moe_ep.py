"""Expert parallelism on 8 simulated CPU devices equals the single-device result (fp32, 1e-5):
forward, gradients, expert counts / bias update; capacity-factor drops are counted exactly."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from nemocascade import sharding
from nemocascade.model import moe_backends as mb
from nemocascade.model import moe_balance as bal
from nemocascade.model import moe_ep

TOL = {"rtol": 1e-5, "atol": 1e-5}
MESHES = {"ep8": {"data": 1, "expert": 8}, "ep4_data2": {"data": 2, "expert": 4}}


def _case(T=64, D=16, F=8, E=16, K=4, seed=0, skew=0.0):
    ks = jax.random.split(jax.random.key(seed), 6)
    x_TD = jax.random.normal(ks[0], (T, D))
    up_EDF = jax.random.normal(ks[1], (E, D, F)) / np.sqrt(D)
    down_EFD = jax.random.normal(ks[2], (E, F, D)) / np.sqrt(F)
    logits = jax.random.normal(ks[3], (T, E)).at[:, :2].add(skew)  # skew: experts 0,1 hot
    idx_TK = jnp.argsort(-logits, axis=1)[:, :K].astype(jnp.int32)
    w_TK = jax.random.uniform(ks[4], (T, K), minval=0.1, maxval=1.0)
    r_TD = jax.random.normal(ks[5], (T, D))
    return x_TD, idx_TK, w_TK, up_EDF, down_EFD, r_TD


def _shard(mesh, x_TD, idx_TK, w_TK, up_EDF, down_EFD):
    tok = NamedSharding(mesh, P(sharding.batch_axes(mesh)))
    exp = NamedSharding(mesh, P("expert"))
    return (
        jax.device_put(x_TD, tok),
        jax.device_put(idx_TK, tok),
        jax.device_put(w_TK, tok),
        jax.device_put(up_EDF, exp),
        jax.device_put(down_EFD, exp),
    )


def _loss_and_grads(fn, x_TD, idx_TK, w_TK, up_EDF, down_EFD, r_TD):
    def loss(x, w, up, down):
        y, dropped = fn(x, idx_TK, w, up, down)
        return jnp.sum(y * r_TD), (y, dropped)

    (_, (y, dropped)), g = jax.jit(jax.value_and_grad(loss, argnums=(0, 1, 2, 3), has_aux=True))(
        x_TD, w_TK, up_EDF, down_EFD
    )
    return y, dropped, g


@pytest.mark.parametrize("mesh_name", sorted(MESHES))
def test_expert_parallel_matches_single_device(mesh_name):
    mesh = sharding.make_mesh(MESHES[mesh_name])
    x_TD, idx_TK, w_TK, up_EDF, down_EFD, r_TD = _case(skew=1.0)

    def single(x, idx, w, up, down):
        return mb.dense_experts(x, idx, w, up, down), jnp.zeros((), jnp.int32)

    y_ref, _, g_ref = _loss_and_grads(single, x_TD, idx_TK, w_TK, up_EDF, down_EFD, r_TD)
    args = _shard(mesh, x_TD, idx_TK, w_TK, up_EDF, down_EFD)

    def ep(x, idx, w, up, down):
        return moe_ep.expert_parallel_mlp(x, idx, w, up, down, mesh=mesh, backend="sorted")

    y, dropped, g = _loss_and_grads(ep, *args, r_TD)
    assert int(dropped) == 0
    np.testing.assert_allclose(y, y_ref, **TOL)
    for a, b, what in zip(g, g_ref, ("x", "w", "up", "down"), strict=True):
        np.testing.assert_allclose(a, b, **TOL, err_msg=f"grad {what}")


@pytest.mark.parametrize("mesh_name", sorted(MESHES))
def test_expert_counts_and_bias_update_match_single_device(mesh_name):
    mesh = sharding.make_mesh(MESHES[mesh_name])
    _, idx_TK, *_ = _case(seed=1, skew=1.0)
    E = 16
    bias_E = jnp.linspace(-0.1, 0.1, E)
    want = bal.update_expert_bias(bias_E, bal.expert_counts(idx_TK, E), rate=1e-3)
    axes = sharding.batch_axes(mesh)
    idx_sharded = jax.device_put(idx_TK, NamedSharding(mesh, P(axes)))
    # (a) plain jit over sharded tokens: the sum is already global
    got_jit = jax.jit(lambda b, i: bal.update_expert_bias(b, bal.expert_counts(i, E), 1e-3))(
        bias_E, idx_sharded
    )
    # (b) inside shard_map: local counts psum-ed over the batch axes
    counts = jax.shard_map(
        lambda i: moe_ep.global_expert_counts(i, E, axes),
        mesh=mesh,
        in_specs=P(axes),
        out_specs=P(),
    )(idx_sharded)
    got_smap = bal.update_expert_bias(bias_E, counts, 1e-3)
    np.testing.assert_allclose(got_jit, want, rtol=0, atol=1e-7)
    np.testing.assert_allclose(got_smap, want, rtol=0, atol=1e-7)
    assert float(jnp.max(jnp.abs(want - bias_E))) > 0


def _expected_drops(idx_TK, E, ep, shards, cap):
    """Independent numpy transcription of the capacity rule: per source shard and destination,
    assignments in (token, k) order; those past `cap` are dropped."""
    idx = np.asarray(idx_TK).copy()
    T = idx.shape[0]
    tl, el = T // shards, E // ep
    dropped = 0
    for s in range(shards):
        used = np.zeros(ep, int)
        for t in range(s * tl, (s + 1) * tl):
            for k in range(idx.shape[1]):
                d = idx[t, k] // el
                if used[d] >= cap:
                    idx[t, k] = E
                    dropped += 1
                else:
                    used[d] += 1
    return idx, dropped


def test_capacity_factor_drops_and_counts():
    mesh = sharding.make_mesh(MESHES["ep4_data2"])
    x_TD, idx_TK, w_TK, up_EDF, down_EFD, _r_TD = _case(seed=2, skew=3.0)  # very unbalanced
    T, K = idx_TK.shape
    E, ep, shards = 16, 4, 8
    cf = 1.0
    cap = moe_ep.capacity(T // shards, K, E, ep, cf)
    assert cap == math.ceil(cf * (T // shards) * K / ep)
    idx_kept, n_drop = _expected_drops(idx_TK, E, ep, shards, cap)
    assert n_drop > 0
    y_ref = mb.dense_experts(x_TD, jnp.asarray(idx_kept), w_TK, up_EDF, down_EFD)
    y, dropped = jax.jit(
        lambda *a: moe_ep.expert_parallel_mlp(*a, mesh=mesh, capacity_factor=cf, backend="dense")
    )(*_shard(mesh, x_TD, idx_TK, w_TK, up_EDF, down_EFD))
    assert int(dropped) == n_drop
    np.testing.assert_allclose(y, y_ref, **TOL)


def test_dropless_capacity_is_worst_case_and_errors_are_clear():
    # a token sends at most min(K, E_l) rows to one device
    assert moe_ep.capacity(8, 4, 16, 8, None) == 8 * 2
    assert moe_ep.capacity(8, 4, 16, 4, 100.0) == 8 * 4  # never above the dropless worst case
    with pytest.raises(ValueError, match="capacity_factor"):
        moe_ep.capacity(8, 4, 16, 4, 0.0)
    mesh = sharding.make_mesh(MESHES["ep8"])
    x_TD, idx_TK, w_TK, up_EDF, down_EFD, _ = _case(T=12)
    with pytest.raises(ValueError, match="tokens do not divide"):
        moe_ep.expert_parallel_mlp(x_TD, idx_TK, w_TK, up_EDF, down_EFD, mesh=mesh)
    with pytest.raises(ValueError, match="experts do not divide"):
        moe_ep.expert_parallel_mlp(
            x_TD[:8], idx_TK[:8] % 12, w_TK[:8], up_EDF[:12], down_EFD[:12], mesh=mesh
        )


def test_model_with_expert_mesh_matches_single_device():
    """The whole NemotronH (MoE layers wired through moe_ep) gives the same logits, gradients and
    expert counts with experts sharded 4-way x data 2 as on one device."""
    from flax import nnx

    from nemocascade.model.config import ModelConfig
    from nemocascade.model.nemotron_h import NemotronH

    cfg = ModelConfig.tiny(
        pattern="E", n_routed_experts=8, num_experts_per_tok=2, n_group=1, moe_backend="sorted"
    )
    ids = jax.random.randint(jax.random.key(0), (8, 4), 0, cfg.vocab_size)
    r = jax.random.normal(jax.random.key(1), (8, 4, cfg.vocab_size))

    def run(mesh):
        model = NemotronH(cfg, rngs=nnx.Rngs(0), mesh=mesh)
        assert (model.layers[0].mixer.ep_mesh is None) == (mesh is None)
        graphdef, params, rest = nnx.split(model, nnx.Param, ...)

        def loss(p, ids):
            logits, aux = nnx.merge(graphdef, p, rest)(ids, return_aux=True)
            return jnp.mean(logits * r), (logits, aux["expert_counts"])

        ids_in = ids
        if mesh is not None:
            ids_in = jax.device_put(ids, NamedSharding(mesh, P(sharding.batch_axes(mesh))))
            params = jax.device_put(params, sharding.state_shardings(params, mesh))
        (_, (logits, counts)), g = jax.jit(jax.value_and_grad(loss, has_aux=True))(params, ids_in)
        return logits, counts, g

    logits_ref, counts_ref, g_ref = run(None)
    logits, counts, g = run(sharding.make_mesh(MESHES["ep4_data2"]))
    np.testing.assert_allclose(logits, logits_ref, **TOL)
    np.testing.assert_array_equal(counts, counts_ref)
    for (path, a), b in zip(
        jax.tree_util.tree_leaves_with_path(g), jax.tree.leaves(g_ref), strict=True
    ):
        np.testing.assert_allclose(a, b, **TOL, err_msg=jax.tree_util.keystr(path))


def test_scanned_model_with_expert_mesh_matches_unrolled_single_device():
    """MoE layers inside the `lax.scan` body of a scanned model (`scan_layers`, here with block
    remat) run expert parallel: logits, expert counts (layer order) and gradients (by Hugging Face
    tensor name) equal those of the unrolled model on one device."""
    from flax import nnx

    from nemocascade.model.config import ModelConfig
    from nemocascade.model.hf_io import iter_hf_tensors
    from nemocascade.model.nemotron_h import NemotronH

    cfg = ModelConfig.tiny(
        pattern="EEE", n_routed_experts=8, num_experts_per_tok=2, n_group=1, moe_backend="sorted"
    )
    ids = jax.random.randint(jax.random.key(0), (8, 4), 0, cfg.vocab_size)
    r = jax.random.normal(jax.random.key(1), (8, 4, cfg.vocab_size))

    def run(cfg, mesh):
        model = NemotronH(cfg, rngs=nnx.Rngs(0), mesh=mesh)
        graphdef, params, rest = nnx.split(model, nnx.Param, ...)

        def loss(p, ids):
            logits, aux = nnx.merge(graphdef, p, rest)(ids, return_aux=True)
            return jnp.mean(logits * r), (logits, aux["expert_counts"])

        ids_in = ids
        if mesh is not None:
            assert model.segments[0].blocks[0].mixer.ep_mesh is mesh
            ids_in = jax.device_put(ids, NamedSharding(mesh, P(sharding.batch_axes(mesh))))
            params = jax.device_put(params, sharding.state_shardings(params, mesh))
        (_, (logits, counts)), g = jax.jit(jax.value_and_grad(loss, has_aux=True))(params, ids_in)
        return logits, counts, dict(iter_hf_tensors(nnx.merge(graphdef, g, rest)))

    logits_ref, counts_ref, g_ref = run(cfg, None)
    mesh = sharding.make_mesh(MESHES["ep4_data2"])
    logits, counts, g = run(cfg.replace(scan_layers=True, remat="block"), mesh)
    np.testing.assert_allclose(logits, logits_ref, **TOL)
    np.testing.assert_array_equal(counts, counts_ref)
    assert list(g) == list(g_ref)
    for k in g:
        np.testing.assert_allclose(g[k], g_ref[k], **TOL, err_msg=k)
