"""SFT loss and step on the tiny NemotronH: packing equivalence, accumulation, NaN skip."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from nemocascade.model import ModelConfig, NemotronH
from nemocascade.train import optim, sft
from nemocascade.train.state import create_train_state, merge_model

TOL = 1e-5  # fp32


@pytest.fixture(scope="module")
def tiny():
    cfg = ModelConfig.tiny(pattern="M*E")  # every segment-aware mixer: Mamba, attention, MoE
    model = NemotronH(cfg, rngs=nnx.Rngs(0))
    ocfg = optim.OptimConfig(lr=1e-3, min_lr=1e-4, warmup_steps=2)
    tx = optim.make_optimizer(ocfg, 10)
    graphdef, state = create_train_state(model, tx, jax.random.PRNGKey(0))
    return cfg, graphdef, state, tx, ocfg


def _docs(vocab, lengths, seed=0):
    rng = np.random.default_rng(seed)
    return [rng.integers(1, vocab, n + 1).astype(np.int32) for n in lengths]


def _row(docs, T):
    """Pack token lists (each len L+1) into one row of length T (docs' inputs/targets)."""
    out = {
        k: np.zeros((T,), np.int32) for k in ("input_ids", "targets", "segment_ids", "positions")
    }
    out["loss_mask"] = np.zeros((T,), np.float32)
    j = 0
    for s, d in enumerate(docs, start=1):
        n = len(d) - 1
        out["input_ids"][j : j + n] = d[:-1]
        out["targets"][j : j + n] = d[1:]
        out["segment_ids"][j : j + n] = s
        out["positions"][j : j + n] = np.arange(n)
        out["loss_mask"][j : j + n] = np.arange(n) % 3 != 0  # a non-trivial mask
        j += n
    assert j <= T
    return out


def _stack(rows):
    return {k: jnp.asarray(np.stack([r[k] for r in rows])) for k in rows[0]}


def test_token_nll_matches_manual():
    logits = jnp.asarray(np.random.default_rng(0).normal(size=(2, 3, 5)), jnp.float32)
    targets = jnp.array([[0, 1, 2], [3, 4, 0]])
    mask = jnp.array([[1, 0, 1], [1, 1, 0]], jnp.float32)
    nll, count = sft.token_nll_sum(logits, targets, mask)
    logp = jax.nn.log_softmax(logits, -1)
    want = -sum(float(logp[b, t, targets[b, t]]) for b in range(2) for t in range(3) if mask[b, t])
    assert float(count) == 4.0
    np.testing.assert_allclose(float(nll), want, rtol=TOL)


def test_packed_equals_unpacked_loss_and_grads(tiny):
    cfg, graphdef, state, _, _ = tiny
    docs = _docs(cfg.vocab_size, [11, 6, 9])
    T = 32
    packed = _stack([_row(docs, T), _row([], T), _row([], T)])  # same shape: one compile
    unpacked = _stack([_row([d], T) for d in docs])
    n = float(packed["loss_mask"].sum())
    assert n == float(unpacked["loss_mask"].sum()) > 0
    grad_fn = jax.jit(
        jax.value_and_grad(
            functools.partial(sft.sft_loss, graphdef=graphdef, denom=jnp.float32(n)), has_aux=True
        )
    )
    (loss_p, (_, _, counts_p)), g_p = grad_fn(state.params, state.model_state, packed)
    (loss_u, (_, _, counts_u)), g_u = grad_fn(state.params, state.model_state, unpacked)
    np.testing.assert_allclose(float(loss_p), float(loss_u), rtol=TOL, atol=TOL)
    np.testing.assert_array_equal(np.asarray(counts_p), np.asarray(counts_u))  # padding not routed
    for a, b in zip(jax.tree.leaves(g_p), jax.tree.leaves(g_u), strict=True):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-4, atol=TOL)
    # the chunked large-vocabulary loss gives the same value
    chunked = jax.jit(
        functools.partial(sft.sft_loss, graphdef=graphdef, denom=jnp.float32(n), loss_chunk_size=8)
    )
    np.testing.assert_allclose(
        float(chunked(state.params, state.model_state, packed)[0]), float(loss_p), rtol=TOL
    )
    # and packing must matter: cross-segment leakage would change the loss
    leaky = dict(packed, segment_ids=jnp.where(packed["segment_ids"] > 0, 1, 0))
    (loss_l, _), _ = grad_fn(state.params, state.model_state, leaky)
    assert abs(float(loss_l - loss_p)) > 1e-3


def test_step_metrics_accumulation_and_nan_skip(tiny):
    cfg, graphdef, state, tx, ocfg = tiny
    lr_fn = optim.lr_schedule(ocfg, 10)
    docs = _docs(cfg.vocab_size, [7, 12, 5, 9, 8, 10, 6, 11], seed=1)
    batch = _stack([_row(docs[i : i + 2], 24) for i in range(0, 8, 2)])  # [4, 24]

    def make(n):
        return jax.jit(
            functools.partial(
                sft.sft_step,
                graphdef=graphdef,
                tx=tx,
                lr_fn=lr_fn,
                grad_accum_steps=n,
                moe_bias_rate=1e-3,
            )
        )

    step1 = make(1)
    s1, m1 = step1(state, batch)
    s2, m2 = make(2)(state, batch)
    assert float(m1["tokens"]) == float(batch["loss_mask"].sum())
    np.testing.assert_allclose(float(m1["lr"]), float(lr_fn(0)), rtol=1e-7)
    assert int(m1["skipped"]) == 0 and int(s1.step) == 1
    np.testing.assert_allclose(float(m1["loss"]), float(m2["loss"]), rtol=TOL)
    np.testing.assert_allclose(float(m1["grad_norm"]), float(m2["grad_norm"]), rtol=1e-4)
    for a, b in zip(jax.tree.leaves(s1.params), jax.tree.leaves(s2.params), strict=True):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-4, atol=TOL)
    assert not all(
        np.array_equal(a, b)
        for a, b in zip(jax.tree.leaves(s1.params), jax.tree.leaves(state.params), strict=True)
    )
    # the MoE correction bias moved by +-rate, outside the optimizer, the same with accumulation
    for new, acc, old in zip(
        jax.tree.leaves(s1.model_state),
        jax.tree.leaves(s2.model_state),
        jax.tree.leaves(state.model_state),
        strict=True,
    ):
        np.testing.assert_array_equal(np.asarray(new), np.asarray(acc))
        step_E = np.abs(np.asarray(new) - np.asarray(old))
        assert np.all(np.isclose(step_E, 1e-3) | (step_E == 0)) and step_E.max() > 0
    assert 0 <= float(m1["moe_max_violation"])

    # a NaN parameter makes loss and gradients NaN: the update is skipped and counted
    bad_params = jax.tree.map(lambda x: x, state.params)
    leaf = bad_params["lm_head_DV"]
    leaf.set_value(leaf.get_value().at[0, 0].set(jnp.nan))
    bad = state.replace(params=bad_params)
    s3, m3 = step1(bad, batch)
    assert int(m3["skipped"]) == 1 and int(s3.step) == 1
    assert not np.isfinite(float(m3["loss"]))
    for a, b in zip(
        jax.tree.leaves((s3.params, s3.opt_state, s3.model_state)),
        jax.tree.leaves((bad.params, bad.opt_state, bad.model_state)),
        strict=True,
    ):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def test_merge_model_roundtrip(tiny):
    cfg, graphdef, state, _, _ = tiny
    model = merge_model(graphdef, state)
    assert isinstance(model, NemotronH) and model.cfg == cfg
    _, params, model_state = nnx.split(model, nnx.Param, ...)
    for a, b in zip(
        jax.tree.leaves((params, model_state)),
        jax.tree.leaves((state.params, state.model_state)),
        strict=True,
    ):
        assert a is b or np.array_equal(np.asarray(a), np.asarray(b))
