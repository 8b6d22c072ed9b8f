"""GRPO: advantages (plain, leave-one-out), dynamic/overlong filtering, the clipped loss and k3
term against hand-computed values, the on-policy REINFORCE identity and the jitted step."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from nemocascade.model import ModelConfig, NemotronH
from nemocascade.rl import advantages
from nemocascade.train import grpo, losses, optim
from nemocascade.train.state import create_train_state
from nemocascade.train.steps import loss_denominator

TOL = 1e-5  # fp32, fixed up front
S3 = np.sqrt(1.0 / 3.0)  # unbiased std of [1, 0, 0, 1] and of [0, 0, 1]


# ----------------------------------------------------------------------------- per-token loss
def test_clipped_loss_and_gradient_hand():
    cfg = grpo.GRPOConfig(eps_low=0.2, eps_high=0.28)
    old = jnp.zeros((1, 5))
    # ratios e^x: 1.5 (A>0: clipped), 1.1 (A>0), 0.5 (A<0: clipped), 0.5 (A>0: not), 1.5 (A<0)
    logp = jnp.log(jnp.array([[1.5, 1.1, 0.5, 0.5, 1.5]]))
    adv = jnp.array([[1.0, 1.0, -2.0, 1.0, -1.0]])
    # the clip acts on pi_train / pi_old with the previous policy's log-probs given
    batch = {"advantages": adv, "sampler_logprobs": old, "old_logprobs": old}
    loss, diag = grpo.policy_loss_terms(logp, batch, cfg)
    np.testing.assert_allclose(np.asarray(loss[0]), [-1.28, -1.1, 1.6, -0.5, 1.5], rtol=TOL)
    np.testing.assert_array_equal(np.asarray(diag["clipped"][0]), [1, 0, 1, 0, 0])
    g = jax.grad(lambda lp: jnp.sum(grpo.policy_loss_terms(lp, batch, cfg)[0]))(logp)
    # d/dlogp of -A r = -A r where the clip is inactive; 0 where it is active
    np.testing.assert_allclose(np.asarray(g[0]), [0.0, -1.1, 0.0, -0.5, 1.5], rtol=TOL)


def test_k3_kl_term():
    logp = jnp.array([[-1.0, -2.0]])
    ref = jnp.array([[-1.5, -2.0]])
    np.testing.assert_allclose(
        np.asarray(grpo.k3_kl(logp, ref)[0]), [np.exp(-0.5) + 0.5 - 1.0, 0.0], atol=TOL
    )
    batch = {"advantages": jnp.zeros((1,)), "sampler_logprobs": logp, "ref_logprobs": ref}
    loss, _ = grpo.policy_loss_terms(logp, batch, grpo.GRPOConfig(kl_coef=0.1))
    np.testing.assert_allclose(np.asarray(loss[0]), [0.1 * (np.exp(-0.5) - 0.5), 0.0], atol=TOL)
    with pytest.raises(KeyError, match="ref_logprobs"):
        grpo.policy_loss_terms(
            logp,
            {"advantages": jnp.zeros((1,)), "sampler_logprobs": logp},
            grpo.GRPOConfig(kl_coef=0.1),
        )


def test_sequence_level_aggregation_packed():
    # row 0: two responses packed (segments 1 and 2); row 1: one response
    mask = jnp.array([[0, 1, 1, 0, 1, 1, 1], [0, 0, 1, 1, 1, 1, 0]], jnp.float32)
    seg = jnp.array([[1, 1, 1, 2, 2, 2, 2], [1, 1, 1, 1, 1, 1, 0]])
    per_tok = jnp.arange(14, dtype=jnp.float32).reshape(2, 7)
    num, den = grpo.aggregate(per_tok, mask, seg, token_level=False)
    want = (1 + 2) / 2 + (4 + 5 + 6) / 3 + (9 + 10 + 11 + 12) / 4
    assert float(den) == 3.0
    np.testing.assert_allclose(float(num), want, rtol=TOL)
    num, den = grpo.aggregate(per_tok, mask, seg, token_level=True)
    assert float(den) == 9.0 and float(num) == 1 + 2 + 4 + 5 + 6 + 9 + 10 + 11 + 12


# ----------------------------------------------------------------------------- model steps
@pytest.fixture(scope="module")
def setup():
    cfg = ModelConfig.tiny(pattern="M*E")  # one block of each kind: quick to compile
    model = NemotronH(cfg, rngs=nnx.Rngs(0))
    tx = optim.make_optimizer(optim.OptimConfig(lr=1e-3, min_lr=1e-4, warmup_steps=1), 10)
    graphdef, state = create_train_state(model, tx, jax.random.PRNGKey(0))
    rng = np.random.default_rng(0)
    B, T = 4, 12
    ids = rng.integers(1, cfg.vocab_size, (B, T + 1)).astype(np.int32)
    mask = np.zeros((B, T), np.float32)
    for b, (start, end) in enumerate([(4, 12), (4, 9), (5, 12), (3, 7)]):
        mask[b, start:end] = 1.0
    seg = np.ones((B, T), np.int32)
    seg[3, 8:] = 0  # padding
    batch = {
        "input_ids": jnp.asarray(ids[:, :-1]),
        "targets": jnp.asarray(ids[:, 1:]),
        "loss_mask": jnp.asarray(mask),
        "segment_ids": jnp.asarray(seg),
        "advantages": jnp.asarray(advantages.group_advantages(np.array([1, 0, 0.5, 1.0]), 2)),
    }
    score = jax.jit(
        lambda p, ms, b: losses.model_token_logprobs(nnx.merge(graphdef, p, ms), b, chunk_size=8)[0]
    )
    logp = score(state.params, state.model_state, batch)
    batch["sampler_logprobs"] = logp  # on-policy: ratio == 1
    batch["ref_logprobs"] = logp - 0.1
    return graphdef, state, tx, batch


def test_on_policy_gradient_is_reinforce(setup):
    graphdef, state, _, batch = setup
    cfg = grpo.GRPOConfig(logprob_chunk=8, compute_entropy=False)

    def grpo_loss(p):
        return grpo.grpo_loss(
            p,
            state.model_state,
            batch,
            graphdef=graphdef,
            cfg=cfg,
            denom=loss_denominator(batch),
        )[0]

    def reinforce(p):
        logp = losses.model_token_logprobs(
            nnx.merge(graphdef, p, state.model_state), batch, chunk_size=8
        )[0]
        m = batch["loss_mask"]
        return -jnp.sum(batch["advantages"][:, None] * logp * m) / jnp.sum(m)

    g1 = jax.jit(jax.grad(grpo_loss))(state.params)
    g0 = jax.jit(jax.grad(reinforce))(state.params)
    assert float(optax_norm(g0)) > 0
    for a, b in zip(jax.tree.leaves(g1), jax.tree.leaves(g0), strict=True):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-4, atol=TOL)


def optax_norm(tree):
    return jnp.sqrt(sum(jnp.sum(x**2) for x in jax.tree.leaves(tree)))


def test_train_step_metrics_and_nan_guard(setup):
    graphdef, state, tx, batch = setup
    cfg = grpo.GRPOConfig(logprob_chunk=8, kl_coef=0.05)
    step = jax.jit(functools.partial(grpo.grpo_train_step, graphdef=graphdef, tx=tx, cfg=cfg))
    new_state, m = step(state, batch)
    m = jax.device_get(m)
    mask = np.asarray(batch["loss_mask"])
    adv = np.asarray(batch["advantages"])
    k3 = np.exp(-0.1) + 0.1 - 1.0  # ref = logp - 0.1 on every token
    want_loss = -np.sum(adv[:, None] * mask) / mask.sum() + 0.05 * k3
    np.testing.assert_allclose(m["loss"], want_loss, rtol=1e-4, atol=TOL)
    np.testing.assert_allclose(m["kl"], k3, rtol=1e-4)
    assert m["clip_fraction"] == 0.0 and m["skipped"] == 0 and m["tokens"] == mask.sum()
    assert m["logp_gap_max"] < 1e-5
    np.testing.assert_allclose(m["response_length"], mask.sum() / 4, rtol=TOL)
    assert 0 < m["entropy"] <= np.log(256) + TOL and m["grad_norm"] > 0
    moved = [
        not np.allclose(a, b)
        for a, b in zip(
            jax.tree.leaves(new_state.params), jax.tree.leaves(state.params), strict=True
        )
    ]
    assert any(moved) and int(new_state.step) == 1
    # a stale sampler log-prob (pi_train / pi_sampler = 3 on one token) never enters the ratio:
    # the update is exactly on-policy (nothing clipped, same loss), the gap is measured, and the
    # opt-in ICE-POP correction masks that token out
    stale = dict(batch, sampler_logprobs=batch["sampler_logprobs"].at[0, 5].add(-np.log(3.0)))
    _, m2 = step(state, stale)
    assert float(m2["clip_fraction"]) == 0.0 and float(m2["is_weight_mean"]) == 1.0
    np.testing.assert_allclose(float(m2["loss"]), float(m["loss"]), rtol=TOL)
    np.testing.assert_allclose(float(m2["logp_gap_max"]), np.log(3.0), rtol=1e-4)
    np.testing.assert_allclose(float(m2["logp_off_band_frac"]), 1.0 / mask.sum(), rtol=TOL)
    assert float(m["logp_off_band_frac"]) == 0.0
    icepop = grpo.GRPOConfig(logprob_chunk=8, kl_coef=0.05, importance_correction="icepop")
    step_ice = jax.jit(
        functools.partial(grpo.grpo_train_step, graphdef=graphdef, tx=tx, cfg=icepop)
    )
    _, m4 = step_ice(state, stale)
    np.testing.assert_allclose(float(m4["is_weight_mean"]), 1 - 1.0 / mask.sum(), rtol=TOL)
    # NaN advantages: the update is skipped, params unchanged
    bad = dict(batch, advantages=batch["advantages"].at[0].set(jnp.nan))
    skipped_state, m3 = step(state, bad)
    assert int(m3["skipped"]) == 1 and int(skipped_state.step) == 1
    for a, b in zip(
        jax.tree.leaves(skipped_state.params), jax.tree.leaves(state.params), strict=True
    ):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    with pytest.raises(KeyError, match="sampler_logprobs"):
        step(state, {k: v for k, v in batch.items() if k != "sampler_logprobs"})


def test_accumulation_and_moe_bias(setup):
    graphdef, state, tx, batch = setup
    cfg1 = grpo.GRPOConfig(logprob_chunk=8, token_level=False)
    cfg2 = grpo.GRPOConfig(logprob_chunk=8, token_level=False, grad_accum_steps=2)
    _, m1 = jax.jit(functools.partial(grpo.grpo_train_step, graphdef=graphdef, tx=tx, cfg=cfg1))(
        state, batch
    )
    new_state, m2 = jax.jit(
        functools.partial(
            grpo.grpo_train_step, graphdef=graphdef, tx=tx, cfg=cfg2, moe_bias_rate=1e-3
        )
    )(state, batch)
    # sequence-level: mean over the 4 responses of their token-mean of -A
    mask, adv = np.asarray(batch["loss_mask"]), np.asarray(batch["advantages"])
    np.testing.assert_allclose(float(m1["loss"]), -adv.mean(), rtol=1e-4, atol=TOL)
    for k in ("loss", "grad_norm", "entropy", "tokens", "response_length"):
        np.testing.assert_allclose(float(m2[k]), float(m1[k]), rtol=1e-5, atol=TOL, err_msg=k)
    assert float(m2["logp_gap_max"]) == float(m1["logp_gap_max"])
    assert "moe_max_violation" in m2 and mask.sum() == float(m2["tokens"])
    changed = [
        not np.array_equal(a, b)
        for a, b in zip(
            jax.tree.leaves(new_state.model_state), jax.tree.leaves(state.model_state), strict=True
        )
    ]
    assert any(changed)  # the MoE correction bias moved


def test_ratio_is_exactly_one_on_a_bf16_model():
    """bf16 parameters and compute: the sampler's log-probs differ from the trainer's, yet the
    GRPO update is exactly REINFORCE's (ratio 1 from the trainer's own forward)."""
    cfg = ModelConfig.tiny(pattern="M*E", param_dtype="bfloat16", compute_dtype="bfloat16")
    model = NemotronH(cfg, rngs=nnx.Rngs(1))
    graphdef, params, rest = nnx.split(model, nnx.Param, ...)
    rng = np.random.default_rng(1)
    ids = rng.integers(1, cfg.vocab_size, (4, 11)).astype(np.int32)
    mask = np.zeros((4, 10), np.float32)
    mask[:, 4:] = 1.0
    batch = {
        "input_ids": jnp.asarray(ids[:, :-1]),
        "targets": jnp.asarray(ids[:, 1:]),
        "loss_mask": jnp.asarray(mask),
        "segment_ids": jnp.ones((4, 10), jnp.int32),
        "advantages": jnp.asarray([1.0, -1.0, 0.5, -0.5]),
        # a sampler that disagrees with the trainer by up to 0.3 nats per token
        "sampler_logprobs": jnp.asarray(rng.uniform(-3.0, -2.0, (4, 10)), jnp.float32),
    }
    gcfg = grpo.GRPOConfig(logprob_chunk=8, compute_entropy=False)

    def grpo_loss(p):
        loss, stats = grpo.grpo_loss(
            p, rest, batch, graphdef=graphdef, cfg=gcfg, denom=loss_denominator(batch)
        )
        return loss, stats

    def reinforce(p):
        logp = losses.model_token_logprobs(nnx.merge(graphdef, p, rest), batch, chunk_size=8)[0]
        m = batch["loss_mask"]
        return -jnp.sum(batch["advantages"][:, None] * logp * m) / jnp.sum(m)

    (loss, stats), g1 = jax.jit(jax.value_and_grad(grpo_loss, has_aux=True))(params)
    g0 = jax.jit(jax.grad(reinforce))(params)
    assert float(stats["clipped_sum"]) == 0.0 and float(stats["logp_gap_max"]) > 0.1
    for a, b in zip(jax.tree.leaves(g1), jax.tree.leaves(g0), strict=True):
        np.testing.assert_array_equal(np.asarray(a, np.float32), np.asarray(b, np.float32))


def test_reference_kl_and_temperature_in_the_step(setup):
    """`ref_state` gives the k3 KL against the reference model's own log-probs (computed in the
    step), equal to a naive computation; `temperature` scales the training logits."""
    graphdef, state, tx, batch = setup
    batch = {k: v for k, v in batch.items() if k != "ref_logprobs"}
    ref_model = NemotronH(ModelConfig.tiny(pattern="M*E"), rngs=nnx.Rngs(7))
    _, ref_params, ref_rest = nnx.split(ref_model, nnx.Param, ...)
    cfg = grpo.GRPOConfig(logprob_chunk=8, kl_coef=0.1)
    temp = 0.7
    step = jax.jit(
        functools.partial(grpo.grpo_train_step, graphdef=graphdef, tx=tx, cfg=cfg, temperature=temp)
    )
    _, m = step(state, batch, (ref_params, ref_rest))

    def naive_logp(params, rest):
        logits = nnx.merge(graphdef, params, rest)(batch["input_ids"], batch["segment_ids"])
        logp = jax.nn.log_softmax(logits / temp, axis=-1)
        return jnp.take_along_axis(logp, batch["targets"][..., None], axis=-1)[..., 0]

    lp, ref = naive_logp(state.params, state.model_state), naive_logp(ref_params, ref_rest)
    mask = np.asarray(batch["loss_mask"])
    d = np.asarray(ref - lp)
    k3 = (np.exp(d) - d - 1.0) * mask
    np.testing.assert_allclose(float(m["kl"]), k3.sum() / mask.sum(), rtol=1e-4)
    adv = np.asarray(batch["advantages"])
    want = -np.sum(adv[:, None] * mask) / mask.sum() + 0.1 * k3.sum() / mask.sum()
    np.testing.assert_allclose(float(m["loss"]), want, rtol=1e-4, atol=TOL)
    # the sampler log-probs were computed at temperature 1: the gap measures exactly that
    gap = np.abs(np.asarray(lp) - np.asarray(batch["sampler_logprobs"])) * mask
    np.testing.assert_allclose(float(m["logp_gap_max"]), gap.max(), rtol=1e-4)
    with pytest.raises(KeyError, match="ref_state"):
        step(state, batch)
