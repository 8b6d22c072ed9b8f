"""Routing replay (R3, issue 20), the pipeline side: the sampler records the experts of every
position a training forward runs (`generate(record_routes=True)`: the prompt from the prefill,
each generated token as it was fed back), the rollout batch carries them to the right positions
(`training_batch`, `assemble`, `device_batch` over 8 simulated devices), and the GRPO step
replays them: on the sampler's own routes it trains exactly as fresh routing does, and it logs
how often the router would now choose otherwise (`route_change_frac`)."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

from nemocascade import sharding
from nemocascade.generate import generate
from nemocascade.model import ModelConfig, NemotronH
from nemocascade.rl import batching
from nemocascade.rl.config import RLStageConfig
from nemocascade.rl.rollouts import Rollouts, training_batch
from nemocascade.train import grpo
from nemocascade.train.state import create_train_state

PROMPTS = [[5, 9, 2, 7], [7, 3], [1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11]]
BUDGETS = [6, 9, 5]
# fp32: the sampler's expert choices equal a training forward's except at an exact near-tie of
# two router scores, which another CPU's rounding may flip; a position shifted by one would
# disagree on most (position, layer) pairs. Fixed up front.
MAX_ROUTE_MISMATCH = 0.01
TOL = 1e-5


@functools.lru_cache(maxsize=1)
def _model():
    cfg = ModelConfig.tiny(vocab_size=64, n_routed_experts=8, num_experts_per_tok=2, n_group=1)
    return NemotronH(cfg, rngs=nnx.Rngs(0))


def _rollouts(res, n):
    rows = len(res.lengths)
    prompt_ids = [PROMPTS[i] for i in res.prompt_index]
    return Rollouts(
        records=[{"domain": "a"}] * rows,
        prompt_ids=prompt_ids,
        response_ids=[res.tokens[r, : res.lengths[r]].tolist() for r in range(rows)],
        responses=[""] * rows,
        finished=np.ones(rows, bool),
        sampler_logprobs=[res.logprobs[r, : res.lengths[r]] for r in range(rows)],
        rewards=np.arange(rows, dtype=np.float32) % 2,
        errors=np.zeros(rows, bool),
        n=n,
        timings={},
        reward_metrics={},
        routes=res.routes,
    )


@functools.partial(jax.jit, static_argnums=0)
def _forward(graphdef, state, ids, seg, routes):
    logits, aux = nnx.merge(graphdef, state)(ids, seg, return_aux=True, routes=routes)
    return logits, aux["routes"], aux["route_changes"]


@pytest.mark.parametrize(
    "engine", [dict(), dict(slots=2), dict(prefill_chunk=4), dict(slots=2, prefill_chunk=4)]
)
def test_sampler_records_the_routes_a_training_forward_uses(engine):
    model = _model()
    cfg = model.cfg
    n_moe, k = cfg.block_types.count("moe"), cfg.num_experts_per_tok
    res = generate(
        model,
        PROMPTS,
        max_new_tokens=BUDGETS,
        temperature=1.0,
        n=2,
        seed=3,
        record_routes=True,
        **engine,
    )
    assert generate(model, PROMPTS, max_new_tokens=2, n=1).routes is None
    for r, routes in enumerate(res.routes):
        p = len(PROMPTS[res.prompt_index[r]])
        assert routes.shape == (p + res.lengths[r] - 1, n_moe, k) and routes.dtype == np.int16
        assert routes.min() >= 0 and routes.max() < cfg.n_routed_experts
    batch = training_batch(_rollouts(res, 2), seq_len=32)
    seg = batch["segment_ids"]
    assert batch["routes"].shape == (6, 32, n_moe, k)
    assert np.all(batch["routes"][seg == 0] == -1)  # nothing recorded: the router chooses there
    graphdef, state = nnx.split(model)
    ids, seg_d = jnp.asarray(batch["input_ids"]), jnp.asarray(seg)
    logits, fresh, _ = _forward(graphdef, state, ids, seg_d, None)
    fresh = np.moveaxis(np.sort(np.asarray(fresh), -1), 0, 2)  # [B, T, n_moe, K]
    recorded = np.sort(batch["routes"], -1)
    mismatch = np.any(fresh != recorded, -1)[seg > 0]
    assert mismatch.mean() <= MAX_ROUTE_MISMATCH, mismatch.mean()
    # replaying the recorded routes: the same logits where they agree with the fresh choice
    replay = jnp.moveaxis(jnp.asarray(batch["routes"]), 2, 0)
    logits_r, used, changes = _forward(graphdef, state, ids, seg_d, replay)
    np.testing.assert_array_equal(
        np.moveaxis(np.asarray(used), 0, 2)[seg > 0], batch["routes"][seg > 0]
    )
    assert float(changes) == mismatch.sum()
    if not mismatch.any():
        np.testing.assert_allclose(np.asarray(logits_r), np.asarray(logits), atol=TOL, rtol=0)


def test_routes_survive_assembly_and_sharding():
    model = _model()
    res = generate(
        model, PROMPTS, max_new_tokens=BUDGETS, temperature=1.0, n=2, seed=5, record_routes=True
    )
    roll = _rollouts(res, 2)
    parts = [batching.Part(roll, np.array([4, 5, 0, 1]), None)]
    batch = batching.assemble(parts, rows=8, seq_len=32, pad_id=0)
    assert batch["routes"].shape[:2] == (8, 32)
    assert np.all(batch["routes"][4:] == -1)  # padding rows: nothing recorded
    for i, r in enumerate([4, 5, 0, 1]):
        n_in = len(roll.prompt_ids[r]) + len(roll.response_ids[r]) - 1
        np.testing.assert_array_equal(batch["routes"][i, :n_in], roll.routes[r])
        assert np.all(batch["routes"][i, n_in:] == -1)
    mesh = sharding.make_mesh({"data": 2, "fsdp": 1, "expert": 4, "tensor": 1})
    on_devices = sharding.device_batch(batch, mesh, process_local=False)
    assert on_devices["routes"].sharding.spec[0] is not None  # rows over the batch axes
    np.testing.assert_array_equal(np.asarray(on_devices["routes"]), batch["routes"])
    short = dict(roll.__dict__, routes=[x[:-1] for x in roll.routes])
    with pytest.raises(ValueError, match="routes for"):
        training_batch(Rollouts(**short), seq_len=32)


def test_grpo_step_replays_the_samplers_routes():
    model = _model()
    res = generate(
        model, PROMPTS, max_new_tokens=BUDGETS, temperature=1.0, n=2, seed=7, record_routes=True
    )
    roll = _rollouts(res, 2)
    batch = batching.assemble(
        [
            batching.Part(
                roll,
                np.arange(6),
                {"advantages": roll.rewards - 0.5, "sample_weight": np.ones(6, np.float32)},
            )
        ],
        rows=8,
        seq_len=32,
        pad_id=0,
    )
    graphdef, state = create_train_state(model, optax.sgd(0.1), jax.random.PRNGKey(0))
    step = jax.jit(
        functools.partial(
            grpo.grpo_train_step, graphdef=graphdef, tx=optax.sgd(0.1), cfg=grpo.GRPOConfig()
        )
    )
    fresh_batch = {k: v for k, v in batch.items() if k != "routes"}
    new_fresh, m_fresh = step(state, {k: jnp.asarray(v) for k, v in fresh_batch.items()})
    new_replay, m_replay = step(state, {k: jnp.asarray(v) for k, v in batch.items()})
    assert "route_change_frac" not in m_fresh
    assert float(m_replay["route_change_frac"]) <= MAX_ROUTE_MISMATCH
    if float(m_replay["route_change_frac"]) == 0.0:  # the same experts: the same update
        for key in ("loss", "logp_gap_max", "grad_norm", "entropy"):
            np.testing.assert_allclose(m_replay[key], m_fresh[key], atol=TOL, rtol=TOL)
        jax.tree.map(
            lambda a, b: np.testing.assert_allclose(a, b, atol=TOL, rtol=0),
            new_replay.params,
            new_fresh.params,
        )
    # other experts replayed: every valid (position, layer) pair counts as changed, and the
    # step trains through the replayed experts (other log-probs than fresh routing)
    e = model.cfg.n_routed_experts
    moved = dict(batch, routes=np.where(batch["routes"] >= 0, (batch["routes"] + 1) % e, -1))
    moved_sorted = np.sort(moved["routes"][batch["segment_ids"] > 0], -1)
    assert not np.any(moved_sorted[..., :-1] == moved_sorted[..., 1:])  # still distinct experts
    _, m_moved = step(state, {k: jnp.asarray(v) for k, v in moved.items()})
    assert float(m_moved["route_change_frac"]) > 0.9
    assert abs(float(m_moved["logp_gap_max"]) - float(m_fresh["logp_gap_max"])) > 1e-4


def test_routing_replay_is_a_stage_option(grpo_stage_section):
    base = grpo_stage_section
    assert not RLStageConfig.from_mapping(base, "stages.x").routing_replay  # off by default
    on = RLStageConfig.from_mapping(dict(base, routing_replay=True), "stages.x")
    assert on.routing_replay
    agentic = dict(base, routing_replay=True, env={"name": "swe"})
    assert RLStageConfig.from_mapping(agentic, "stages.x").routing_replay
    with pytest.raises(Exception, match="routing_replay"):
        RLStageConfig.from_mapping(dict(base, routing_replay="yes"), "stages.x")
