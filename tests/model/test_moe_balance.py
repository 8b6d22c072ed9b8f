"""Load balancing: expert counts, the aux-loss-free bias rule, the sequence aux loss, router
freezing, and the bias update on a real model state."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

from nemocascade.model import moe_balance as bal
from nemocascade.model.config import ModelConfig
from nemocascade.model.moe_balance import ExpertBias
from nemocascade.model.nemotron_h import NemotronH
from nemocascade.train.optim import freeze_router, router_labels


def test_expert_counts_masks_invalid_tokens_and_ignores_dropped_slots():
    idx_TK = jnp.array([[0, 1], [1, 2], [2, 4], [0, 3]], jnp.int32)  # 4 = out of range (dropped)
    valid_T = jnp.array([1, 1, 1, 0])
    np.testing.assert_array_equal(bal.expert_counts(idx_TK, 4), [2, 2, 2, 1])
    np.testing.assert_array_equal(bal.expert_counts(idx_TK, 4, valid_T), [1, 2, 2, 0])
    idx_BTK = idx_TK.reshape(2, 2, 2)
    np.testing.assert_array_equal(
        bal.expert_counts(idx_BTK, 4, valid_T.reshape(2, 2)), [1, 2, 2, 0]
    )


def test_bias_update_follows_sign_rule():
    bias = jnp.array([0.5, 0.0, -0.1, 0.2], jnp.float32)
    counts = jnp.array([10.0, 2.0, 4.0, 4.0])  # mean 5
    new = bal.update_expert_bias(bias, counts, rate=0.01)
    np.testing.assert_allclose(new, [0.49, 0.01, -0.09, 0.21], rtol=0, atol=1e-7)
    balanced = bal.update_expert_bias(bias, jnp.full((4,), 3.0), rate=0.01)
    np.testing.assert_array_equal(balanced, bias)  # sign(0) = 0
    stacked = bal.update_expert_bias(jnp.zeros((2, 4)), jnp.stack([counts, counts[::-1]]), rate=1.0)
    np.testing.assert_array_equal(stacked, [[-1, 1, 1, 1], [1, 1, 1, -1]])


def _aux_loss_loop(scores, idx, valid, E, K):
    """Straight per-sequence transcription of the DeepSeek-V3 formula (numpy, float64)."""
    losses = []
    for b in range(scores.shape[0]):
        toks = [t for t in range(scores.shape[1]) if valid[b, t]]
        T = len(toks)
        f = np.zeros(E)
        P = np.zeros(E)
        for t in toks:
            for k in range(K):
                f[idx[b, t, k]] += E / (K * T)
            P += scores[b, t] / scores[b, t].sum() / T
        losses.append(np.sum(f * P))
    return np.mean(losses)


def test_sequence_aux_loss_matches_formula_and_is_one_when_uniform():
    B, T, E, K = 3, 7, 6, 2
    scores = jax.nn.sigmoid(jax.random.normal(jax.random.key(0), (B, T, E)))
    idx = jax.lax.top_k(scores, K)[1]
    valid = np.ones((B, T), bool)
    valid[1, 4:] = False
    got = bal.sequence_aux_loss(scores, idx, E, K, jnp.asarray(valid))
    want = _aux_loss_loop(np.asarray(scores, np.float64), np.asarray(idx), valid, E, K)
    np.testing.assert_allclose(got, want, rtol=1e-6)
    # uniform scores and perfectly balanced choices: loss == 1
    uni_idx = (jnp.arange(6 * K).reshape(1, 6, K) % E).repeat(B, 0)  # each expert twice
    uniform = bal.sequence_aux_loss(jnp.full((B, 6, E), 0.3), uni_idx, E, K)
    np.testing.assert_allclose(uniform, 1.0, rtol=1e-6)
    # gradient flows through the scores only (f is constant)
    g = jax.grad(lambda s: bal.sequence_aux_loss(s, idx, E, K))(scores)
    assert np.all(np.isfinite(g)) and float(jnp.max(jnp.abs(g))) > 0
    with pytest.raises(ValueError, match="sequence_aux_loss"):
        bal.sequence_aux_loss(scores, idx, E + 1, K)


def test_load_metrics():
    counts = jnp.array([[4.0, 4.0, 4.0, 4.0], [8.0, 0.0, 4.0, 4.0]])
    m = bal.load_metrics(counts)
    np.testing.assert_allclose(m["moe/max_violation"], [0.0, 1.0])
    np.testing.assert_allclose(m["moe/min_load"], [1.0, 0.0])
    np.testing.assert_allclose(m["moe/unused_experts"], [0.0, 1.0])
    np.testing.assert_allclose(m["moe/max_violation_mean"], 0.5)


class _Mixer(nnx.Module):
    def __init__(self, e):
        self.bias_E = ExpertBias(jnp.zeros((e,), jnp.float32))


class _Block(nnx.Module):
    def __init__(self, e):
        self.mixer = _Mixer(e)


class _Stack(nnx.Module):
    def __init__(self, n, e):
        self.layers = nnx.List([_Block(e) for _ in range(n)])


def test_update_model_biases_in_layer_order():
    L, E = 11, 4  # 11 layers: layers/2 must come before layers/10
    model = _Stack(L, E)
    _, rest = nnx.split(model, ExpertBias)
    # layer l: expert l % 4 is hot
    counts_LE = jnp.zeros((L, E)).at[jnp.arange(L), jnp.arange(L) % E].set(10.0)
    nnx.update(model, bal.update_model_biases(rest, counts_LE, rate=0.5))
    for layer_i, block in enumerate(model.layers):
        want = np.full(E, 0.5)
        want[layer_i % E] = -0.5
        np.testing.assert_array_equal(block.mixer.bias_E[...], want, err_msg=f"layer {layer_i}")
    with pytest.raises(ValueError, match="ExpertBias"):
        bal.update_model_biases(rest, counts_LE[:3], rate=0.5)


def test_freeze_router_zeroes_router_updates_only():
    cfg = ModelConfig.tiny(pattern="E", n_routed_experts=4, num_experts_per_tok=2, n_group=1)
    model = NemotronH(cfg, rngs=nnx.Rngs(0))
    params = nnx.state(model, nnx.Param)
    grads = jax.tree.map(jnp.ones_like, params)
    tx = freeze_router(optax.adamw(1e-2, weight_decay=0.1))
    updates, _ = tx.update(grads, tx.init(params), params)
    new = optax.apply_updates(params, updates)
    router_old = params["layers"][0]["mixer"]["router_DE"][...]
    np.testing.assert_array_equal(new["layers"][0]["mixer"]["router_DE"][...], router_old)
    up_old = params["layers"][0]["mixer"]["up_EDF"][...]
    assert not np.allclose(new["layers"][0]["mixer"]["up_EDF"][...], up_old)
    labels = jax.tree.leaves(router_labels(params))
    assert labels.count("router") == 1
    # the bias of the real model state follows the rule (the optimizer never sees it)
    _, _, rest = nnx.split(model, nnx.Param, ...)
    nnx.update(model, bal.update_model_biases(rest, jnp.array([[9.0, 1.0, 1.0, 1.0]]), rate=0.25))
    np.testing.assert_array_equal(model.layers[0].mixer.bias_E[...], [-0.25, 0.25, 0.25, 0.25])
