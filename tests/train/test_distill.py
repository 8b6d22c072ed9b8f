"""On-policy distillation / MOPD: Eq. 2-4 terms and the ICE-POP band against hand-computed values,
teacher scoring and per-domain routing, and steps that move the student toward its teacher."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from nemocascade.model import ModelConfig, NemotronH
from nemocascade.train import distill, optim
from nemocascade.train.state import create_train_state

TOL = 1e-5  # fp32, fixed up front


def test_mopd_terms_and_band_hand():
    # ratios pi_train / pi_sampler: 1, 0.4 (out), 0.55 (in), 1.9 (in), 2.5 (out)
    p_train = np.array([0.2, 0.1, 0.275, 0.38, 0.5])
    p_teacher = np.array([0.4, 0.3, 0.05, 0.2, 0.1])
    logp = jnp.log(jnp.asarray([p_train], jnp.float32))
    sampler = jnp.log(jnp.array([[0.2, 0.25, 0.5, 0.2, 0.2]]))
    teacher = jnp.log(jnp.asarray([p_teacher], jnp.float32))
    cfg = distill.DistillConfig()  # band [0.5, 2.0]
    loss, d = distill.mopd_token_terms(logp, teacher, sampler, cfg)
    a = np.log(p_teacher / p_train)
    w = np.array([1.0, 0.0, 0.55, 1.9, 0.0])
    np.testing.assert_allclose(np.asarray(d["advantage"][0]), a, rtol=TOL)
    np.testing.assert_allclose(np.asarray(d["weight"][0]), w, rtol=TOL, atol=TOL)
    np.testing.assert_array_equal(np.asarray(d["in_band"][0]), [1, 0, 1, 1, 0])
    np.testing.assert_allclose(
        np.asarray(loss[0]), -w * a * np.asarray(logp[0]), rtol=TOL, atol=TOL
    )
    # a_t and w_t are stop-gradients: d loss_t / d logp_t = -w_t a_t
    g = jax.grad(lambda lp: jnp.sum(distill.mopd_token_terms(lp, teacher, sampler, cfg)[0]))(logp)
    np.testing.assert_allclose(np.asarray(g[0]), -w * a, rtol=TOL, atol=TOL)
    # a narrower band, and no importance weighting
    _, d2 = distill.mopd_token_terms(logp, teacher, sampler, distill.DistillConfig(is_high=1.5))
    np.testing.assert_array_equal(np.asarray(d2["in_band"][0]), [1, 0, 1, 0, 0])
    _, d3 = distill.mopd_token_terms(
        logp, teacher, sampler, distill.DistillConfig(importance_weighting=False)
    )
    np.testing.assert_array_equal(np.asarray(d3["weight"][0]), np.ones(5))
    with pytest.raises(ValueError, match="is_low"):
        distill.DistillConfig(is_low=1.5)


@pytest.fixture(scope="module")
def setup():
    cfg = ModelConfig.tiny(pattern="M*E")  # one block of each kind: quick to compile
    tx = optim.make_optimizer(
        optim.OptimConfig(lr=1e-3, min_lr=1e-3, warmup_steps=0, weight_decay=0.0), 10
    )
    graphdef, state = create_train_state(
        NemotronH(cfg, rngs=nnx.Rngs(0)), tx, jax.random.PRNGKey(0)
    )
    teachers = []
    for seed in (1, 2):
        teacher = NemotronH(cfg, rngs=nnx.Rngs(seed))
        assert not cfg.tie_word_embeddings
        teacher.lm_head_DV[...] = teacher.lm_head_DV[...] * 10.0  # peaked, far from the student
        t_graphdef, *t_states = nnx.split(teacher, nnx.Param, ...)
        teachers.append(distill.Teacher(t_graphdef, tuple(t_states)))
    rng = np.random.default_rng(0)
    B, T = 4, 10
    ids = rng.integers(1, cfg.vocab_size, (B, T + 1)).astype(np.int32)
    mask = np.zeros((B, T), np.float32)
    mask[:, 3:] = 1.0
    mask[2, 8:] = 0.0
    batch = {
        "input_ids": jnp.asarray(ids[:, :-1]),
        "targets": jnp.asarray(ids[:, 1:]),
        "loss_mask": jnp.asarray(mask),
        "segment_ids": jnp.ones((B, T), jnp.int32),
    }
    batch["sampler_logprobs"] = distill.teacher_logprobs(graphdef, state, batch, chunk=8)
    return graphdef, state, tx, teachers, batch


def test_teacher_scoring_and_mopd_routing(setup):
    _, _, _, (ta, tb), batch = setup
    domains = np.array([0, 1, 2, 1])
    teachers = {0: ta, 1: tb, 2: ta}  # domain 2 shares teacher A: A scores rows 0 and 2 once
    gathered = distill.mopd_teacher_logprobs(dict(batch, domain=domains), teachers, chunk=8)
    everything = distill.mopd_teacher_logprobs(
        batch, teachers, domains_B=domains, chunk=8, mode="all"
    )
    full_a = distill.teacher_logprobs(ta.graphdef, ta.state, batch, chunk=8)
    full_b = distill.teacher_logprobs(tb.graphdef, tb.state, batch, chunk=8)
    want = np.where((domains == 1)[:, None], np.asarray(full_b), np.asarray(full_a))
    np.testing.assert_allclose(np.asarray(gathered), want, rtol=TOL, atol=TOL)
    np.testing.assert_allclose(np.asarray(everything), want, rtol=TOL, atol=TOL)
    # the scores are the teacher's own log-softmax of the targets
    direct = jnp.take_along_axis(
        _log_softmax(ta.graphdef, ta.state, batch), batch["targets"][..., None], -1
    )[..., 0]
    np.testing.assert_allclose(np.asarray(full_a), np.asarray(direct), rtol=TOL, atol=TOL)
    assert not np.allclose(np.asarray(full_a), np.asarray(full_b))
    with pytest.raises(KeyError, match="no teacher for domains"):
        distill.mopd_teacher_logprobs(batch, teachers, domains_B=np.array([0, 1, 5, 1]))


@functools.partial(jax.jit, static_argnums=0)
def _log_softmax(graphdef, states, batch):
    logits = nnx.merge(graphdef, *states)(batch["input_ids"], segment_ids=batch["segment_ids"])
    return jax.nn.log_softmax(logits, -1)


def _gap(logp, teacher_lp, mask):
    return float(jnp.sum(jnp.abs(logp - teacher_lp) * mask) / jnp.sum(mask))


def test_sampled_token_step_moves_student_toward_teacher(setup):
    graphdef, state, tx, (ta, _), batch = setup
    batch = dict(
        batch, teacher_logprobs=distill.teacher_logprobs(ta.graphdef, ta.state, batch, chunk=8)
    )
    cfg = distill.DistillConfig(logprob_chunk=8)
    step = jax.jit(functools.partial(distill.distill_train_step, graphdef=graphdef, tx=tx, cfg=cfg))
    mask = batch["loss_mask"]
    a = batch["teacher_logprobs"] - batch["sampler_logprobs"]
    gaps = [_gap(batch["sampler_logprobs"], batch["teacher_logprobs"], mask)]
    st, first = None, None
    for _ in range(5):
        st, m = step(state if st is None else st, batch)
        first = first or jax.device_get(m)
        logp = distill.teacher_logprobs(graphdef, st, batch, chunk=8)
        gaps.append(_gap(logp, batch["teacher_logprobs"], mask))
        assert int(m["skipped"]) == 0
    # first step is on-policy: w = 1, loss = -mean(a * logp), advantage = mean(a)
    want_loss = -jnp.sum(a * batch["sampler_logprobs"] * mask) / jnp.sum(mask)
    np.testing.assert_allclose(first["loss"], float(want_loss), rtol=1e-4, atol=TOL)
    np.testing.assert_allclose(
        first["advantage"], float(jnp.sum(a * mask) / jnp.sum(mask)), rtol=1e-4, atol=TOL
    )
    assert first["in_band_fraction"] == 1.0 and first["logp_gap_max"] < 1e-5
    # the student's log-probs approach the teacher's (2.0 -> 1.2 nats when written)
    assert gaps[1] < gaps[0] and gaps[-1] < 0.7 * gaps[0], gaps


def test_reverse_kl_step(setup):
    graphdef, state, tx, (ta, _), batch = setup
    cfg = distill.DistillConfig(objective="reverse_kl", logprob_chunk=8)
    step = jax.jit(
        functools.partial(
            distill.distill_train_step,
            graphdef=graphdef,
            tx=tx,
            cfg=cfg,
            teacher_graphdef=ta.graphdef,
        )
    )
    kls = []
    st = state
    for _ in range(4):
        st, m = step(st, batch, teacher_state=ta.state)
        kls.append(float(m["reverse_kl"]))
    # the first value is the naive full-vocabulary KL(student || teacher) over response tokens
    ls = _log_softmax(graphdef, (state.params, state.model_state), batch)
    lt = _log_softmax(ta.graphdef, ta.state, batch)
    kl = jnp.sum(jnp.exp(ls) * (ls - lt), -1)
    mask = batch["loss_mask"]
    np.testing.assert_allclose(kls[0], float(jnp.sum(kl * mask) / jnp.sum(mask)), rtol=1e-4)
    assert kls[-1] < kls[0], kls
    with pytest.raises(ValueError, match="needs teacher"):
        distill.distill_train_step(state, batch, graphdef=graphdef, tx=tx, cfg=cfg)
    with pytest.raises(KeyError, match="teacher_logprobs"):
        distill.distill_train_step(
            state, batch, graphdef=graphdef, tx=tx, cfg=distill.DistillConfig()
        )


def test_reverse_kl_routes_rows_to_their_teachers(setup):
    """MOPD with the full-vocabulary objective: row b's KL is against teacher_index[b]'s model."""
    graphdef, state, tx, (ta, tb), batch = setup
    cfg = distill.DistillConfig(objective="reverse_kl", logprob_chunk=8)
    index = np.array([1, 0, 0, 1], np.int32)
    step = jax.jit(
        functools.partial(
            distill.distill_train_step,
            graphdef=graphdef,
            tx=tx,
            cfg=cfg,
            teacher_graphdef=(ta.graphdef, tb.graphdef),
        )
    )
    _, m = step(
        state, dict(batch, teacher_index=jnp.asarray(index)), teacher_state=(ta.state, tb.state)
    )
    ls = _log_softmax(graphdef, (state.params, state.model_state), batch)
    kl = {
        name: jnp.sum(jnp.exp(ls) * (ls - _log_softmax(t.graphdef, t.state, batch)), -1)
        for name, t in (("a", ta), ("b", tb))
    }
    want_BT = jnp.where(jnp.asarray(index == 1)[:, None], kl["b"], kl["a"])
    mask = batch["loss_mask"]
    np.testing.assert_allclose(
        float(m["reverse_kl"]), float(jnp.sum(want_BT * mask) / jnp.sum(mask)), rtol=1e-4
    )
    # differs from either teacher alone (the routing is not a no-op)
    for one in kl.values():
        assert abs(float(jnp.sum(one * mask) / jnp.sum(mask)) - float(m["reverse_kl"])) > 1e-3

    # the gradient is the per-row teacher's: equal to the sum of two single-teacher losses on
    # the complementary rows
    def split_loss(params):
        total = 0.0
        for t, rows in ((ta, index == 0), (tb, index == 1)):
            b = dict(batch, loss_mask=mask * jnp.asarray(rows, jnp.float32)[:, None])
            total = (
                total
                + distill.distill_loss(
                    params,
                    state.model_state,
                    b,
                    graphdef=graphdef,
                    cfg=cfg,
                    denom=jnp.sum(mask),
                    teacher_graphdef=t.graphdef,
                    teacher_state=t.state,
                )[0]
            )
        return total

    g_split = jax.jit(jax.grad(split_loss))(state.params)
    g_routed = jax.jit(
        jax.grad(
            lambda p: distill.distill_loss(
                p,
                state.model_state,
                dict(batch, teacher_index=jnp.asarray(index)),
                graphdef=graphdef,
                cfg=cfg,
                denom=jnp.sum(mask),
                teacher_graphdef=(ta.graphdef, tb.graphdef),
                teacher_state=(ta.state, tb.state),
            )[0]
        )
    )(state.params)
    for x, y in zip(jax.tree.leaves(g_split), jax.tree.leaves(g_routed), strict=True):
        np.testing.assert_allclose(np.asarray(x), np.asarray(y), rtol=1e-4, atol=1e-6)
    with pytest.raises(KeyError, match="teacher_index"):
        step(state, batch, teacher_state=(ta.state, tb.state))
    with pytest.raises(ValueError, match="as many teacher"):
        step(state, dict(batch, teacher_index=jnp.asarray(index)), teacher_state=(ta.state,))
