"""Routing replay (R3, issue 20), the model side: a forward with `return_aux` returns the experts
every token used (`aux["routes"]`, [n_moe_layers, B, T, K]); a forward given `routes=` uses
exactly those experts, with the gates recomputed from its own router. Replaying a pass's own
routes changes nothing (same logits and gradients, fp32); after the routers move, fresh routing
picks other experts while the replay keeps the recorded ones and still sends gradients to the
routers. Unrolled and scanned models (one with an optional unit position), the cached prefill,
and the expert-parallel path on 8 simulated devices."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from nemocascade import sharding
from nemocascade.model import ModelConfig, NemotronH
from nemocascade.model.moe import MoE

PATTERN = "MEM*EMEM*E-"  # scanned: one M*E scan (attention in copies 2 and 4), then "-"
TOL = {"atol": 1e-6, "rtol": 0}  # fp32, fixed up front


def _cfg(**kw):
    return ModelConfig.tiny(
        **{
            "pattern": PATTERN,
            "chunk_size": 4,
            "n_routed_experts": 8,
            "num_experts_per_tok": 2,
            "n_group": 1,
            "moe_backend": "sorted",
            **kw,
        }
    )


def _batch(cfg, b=4, t=8):
    rng = np.random.default_rng(0)
    ids = jnp.asarray(rng.integers(1, cfg.vocab_size, (b, t)))
    seg = jnp.asarray([[1] * 5 + [2] * 3] + [[1] * t] * (b - 1))  # one packed row
    r = jnp.asarray(rng.normal(size=(b, t, cfg.vocab_size)), jnp.float32)
    return ids, seg, r


@functools.partial(jax.jit, static_argnums=0)
def _jitted_value_and_grad(graphdef, params, rest, ids, seg, r, routes):
    def loss(p):
        logits, aux = nnx.merge(graphdef, p, rest)(ids, seg, return_aux=True, routes=routes)
        return jnp.mean(logits * r), (logits, aux["routes"])

    return jax.value_and_grad(loss, has_aux=True)(params)


def _value_and_grad(model, ids, seg, r, routes=None):
    """(loss, logits, aux routes, parameter gradients) of mean(logits * r); one compiled program
    per model structure and replay / no replay, shared by the tests."""
    graphdef, params, rest = nnx.split(model, nnx.Param, ...)
    (val, (logits, got)), g = _jitted_value_and_grad(graphdef, params, rest, ids, seg, r, routes)
    return val, logits, got, g


def _router_grads(g) -> list[np.ndarray]:
    """Each MoE layer's router gradient [D, E] (stacked [R, D, E] rows split per layer)."""
    out = []
    for path, v in nnx.to_flat_state(g):
        if path[-1] == "router_DE":
            a = np.asarray(v.get_value())
            out += list(a) if a.ndim == 3 else [a]
    return out


@pytest.mark.parametrize("scan_layers,backend", [(False, "dense"), (True, "sorted")])
def test_replaying_own_routes_changes_nothing(scan_layers, backend):
    cfg = _cfg(scan_layers=scan_layers, moe_backend=backend)
    model = NemotronH(cfg, rngs=nnx.Rngs(0))
    ids, seg, r = _batch(cfg)
    v0, l0, routes, g0 = _value_and_grad(model, ids, seg, r)
    n_moe = PATTERN.count("E")
    assert routes.shape == (n_moe, 4, 8, cfg.num_experts_per_tok) and routes.dtype == jnp.int32
    v1, l1, replayed, g1 = _value_and_grad(model, ids, seg, r, routes=routes)
    np.testing.assert_array_equal(replayed, routes)
    np.testing.assert_allclose(l1, l0, **TOL)
    np.testing.assert_allclose(v1, v0, **TOL)
    for (path, a), (_, b) in zip(nnx.to_flat_state(g1), nnx.to_flat_state(g0), strict=True):
        np.testing.assert_allclose(a.get_value(), b.get_value(), **TOL, err_msg=str(path))


def test_scanned_and_unrolled_record_the_same_routes():
    ids, seg, r = _batch(_cfg())
    got = [
        _value_and_grad(NemotronH(_cfg(scan_layers=s), rngs=nnx.Rngs(0)), ids, seg, r)[2]
        for s in (False, True)
    ]
    np.testing.assert_array_equal(got[1], got[0])


def _move_routers(model, scale=3.0, seed=1):
    """Adds noise to every router so that fresh routing picks other experts."""
    key = jax.random.key(seed)
    for _, node in nnx.iter_graph(model):
        if isinstance(node, MoE):
            key, sub = jax.random.split(key)
            w = node.router_DE.get_value()
            node.router_DE.set_value(w + scale * jax.random.normal(sub, w.shape))


@pytest.mark.parametrize("scan_layers", [False, True])
def test_replay_keeps_the_recorded_experts_after_the_router_moves(scan_layers):
    cfg = _cfg(scan_layers=scan_layers)
    model = NemotronH(cfg, rngs=nnx.Rngs(0))
    ids, seg, r = _batch(cfg)
    _, _, recorded, _ = _value_and_grad(model, ids, seg, r)
    _move_routers(model)
    _, l_fresh, fresh, _ = _value_and_grad(model, ids, seg, r)
    _, l_replay, replayed, g = _value_and_grad(model, ids, seg, r, routes=recorded)
    assert np.mean(np.asarray(fresh) != np.asarray(recorded)) > 0.1  # the choice moved
    np.testing.assert_array_equal(replayed, recorded)  # the replay did not
    assert not np.allclose(l_fresh, l_replay)
    grads = _router_grads(g)  # gates from the current router: gradients reach every router
    assert len(grads) == PATTERN.count("E")
    assert all(np.abs(x).max() > 0 for x in grads)


def test_cached_prefill_replays_routes():
    cfg = _cfg()
    model = NemotronH(cfg, rngs=nnx.Rngs(0))
    ids, seg, r = _batch(cfg)
    _, logits, routes, _ = _value_and_grad(model, ids, seg, r)
    _move_routers(model)
    graphdef, state = nnx.split(model)

    @jax.jit
    def prefill(st, routes):
        return nnx.merge(graphdef, st)(ids, seg, cache=model.init_cache(4, 8), routes=routes)

    replayed, _ = prefill(state, routes)
    fresh, _ = prefill(state, None)
    _, want, _, _ = _value_and_grad(model, ids, seg, r, routes=routes)
    np.testing.assert_allclose(replayed, want, **TOL)  # cached == uncached, same experts
    assert not np.allclose(fresh, replayed)
    del logits


def test_routes_of_the_wrong_shape_name_the_argument():
    cfg = _cfg()
    model = NemotronH(cfg, rngs=nnx.Rngs(0))
    ids, seg, _ = _batch(cfg)
    bad = jnp.zeros((PATTERN.count("E") - 1, 4, 8, 2), jnp.int32)
    with pytest.raises(ValueError, match="routes"):
        model(ids, seg, routes=bad)


def test_replay_on_the_expert_parallel_path_matches_one_device():
    """data 2 x expert 4: the routes recorded on one device, replayed through moe_ep's exchange,
    give the one-device replay's logits and gradients."""
    cfg = _cfg(scan_layers=True)
    ids, seg, r = _batch(cfg, b=8)
    ref_model = NemotronH(cfg, rngs=nnx.Rngs(0))
    _, _, routes, _ = _value_and_grad(ref_model, ids, seg, r)
    _move_routers(ref_model)
    _, l_ref, _, g_ref = _value_and_grad(ref_model, ids, seg, r, routes=routes)

    mesh = sharding.make_mesh(sharding.MeshConfig(data=2, expert=4), jax.devices()[:8])
    model = NemotronH(cfg, rngs=nnx.Rngs(0), mesh=mesh)
    _move_routers(model)
    nnx.update(
        model, jax.device_put(nnx.state(model), sharding.state_shardings(nnx.state(model), mesh))
    )
    rows = NamedSharding(mesh, P(sharding.batch_axes(mesh)))
    ids, seg, routes_in = (
        jax.device_put(ids, rows),
        jax.device_put(seg, rows),
        jax.device_put(routes, NamedSharding(mesh, P(None, sharding.batch_axes(mesh)))),
    )
    _, logits, replayed, g = _value_and_grad(model, ids, seg, r, routes=routes_in)
    np.testing.assert_array_equal(replayed, routes)
    np.testing.assert_allclose(logits, l_ref, atol=1e-5, rtol=0)
    for (path, a), (_, b) in zip(nnx.to_flat_state(g), nnx.to_flat_state(g_ref), strict=True):
        np.testing.assert_allclose(
            a.get_value(), b.get_value(), atol=1e-5, rtol=0, err_msg=str(path)
        )
