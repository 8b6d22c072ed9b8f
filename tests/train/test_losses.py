"""Chunked large-vocabulary losses equal the naive (materialised-logits) versions: values and
gradients, odd token counts (padding), and the tiny model's own logits."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from nemocascade.model import ModelConfig, NemotronH
from nemocascade.train import losses

TOL = 1e-5  # fp32, fixed up front


def _inputs(B=2, T=7, D=8, V=50, E=6, seed=0):
    k = jax.random.split(jax.random.key(seed), 6)
    h = 0.7 * jax.random.normal(k[0], (B, T, D))
    w = 0.7 * jax.random.normal(k[1], (D, V))
    t = jax.random.randint(k[2], (B, T), 0, V)
    ht = 0.7 * jax.random.normal(k[3], (B, T, E))
    wt = 0.7 * jax.random.normal(k[4], (E, V))
    c = jax.random.normal(k[5], (B, T))  # arbitrary per-token cotangent weights
    return h, w, t, ht, wt, c


def _close(a, b):
    np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=TOL, atol=TOL)


@pytest.mark.parametrize("chunk", [1, 4, 64])  # 4 leaves a padded chunk; 64 > all 14 tokens
def test_logprob_entropy_values_and_grads(chunk):
    h, w, t, _, _, c = _inputs()

    def f(fn):
        def loss(h, w):
            lp, ent = fn(h, w)
            return jnp.sum(lp * c + ent * jnp.cos(c)), (lp, ent)

        return jax.jit(jax.value_and_grad(loss, argnums=(0, 1), has_aux=True))

    (v1, (lp1, e1)), g1 = f(
        lambda h, w: losses.token_logprobs_and_entropy(h, w, t, chunk_size=chunk)
    )(h, w)
    (v0, (lp0, e0)), g0 = f(lambda h, w: losses.naive_logprobs_and_entropy(h, w, t))(h, w)
    _close(lp1, lp0)
    _close(e1, e0)
    _close(v1, v0)
    for a, b in zip(g1, g0, strict=True):
        _close(a, b)
    # the logprob-only path (no entropy term in the backward rule)
    g2 = jax.grad(
        lambda h, w: jnp.sum(losses.token_logprobs(h, w, t, chunk_size=chunk) * c), argnums=(0, 1)
    )(h, w)
    g3 = jax.grad(
        lambda h, w: jnp.sum(losses.naive_logprobs_and_entropy(h, w, t)[0] * c), argnums=(0, 1)
    )(h, w)
    for a, b in zip(g2, g3, strict=True):
        _close(a, b)


def test_extra_leading_dims_fold_into_rows():
    h, w, _, _, _, _ = _inputs(B=6, T=5)
    h = h.reshape(2, 3, 5, -1)
    t = jnp.arange(30).reshape(2, 3, 5) % w.shape[1]
    lp, ent = losses.token_logprobs_and_entropy(h, w, t, chunk_size=7)
    lp0, ent0 = losses.naive_logprobs_and_entropy(h, w, t)
    assert lp.shape == (2, 3, 5)
    _close(lp, lp0)
    _close(ent, ent0)


def test_cross_entropy_sum_matches_manual():
    h, w, t, _, _, _ = _inputs(seed=1)
    mask = jnp.asarray(np.random.default_rng(0).random(t.shape) < 0.6, jnp.float32)
    nll, count = losses.token_cross_entropy_sum(h, w, t, mask, chunk_size=3)
    logp = jax.nn.log_softmax(jnp.einsum("btd,dv->btv", h, w), -1)
    want = -sum(float(logp[b, i, t[b, i]]) for b in range(2) for i in range(7) if mask[b, i])
    assert float(count) == float(mask.sum())
    np.testing.assert_allclose(float(nll), want, rtol=TOL)


@pytest.mark.parametrize("chunk", [3, 16])
def test_reverse_kl_values_and_grads(chunk):
    h, w, _, ht, wt, c = _inputs(seed=2)

    def loss(fn):
        return lambda h, w, ht, wt: jnp.sum(fn(h, w, ht, wt) * c)

    chunked = loss(lambda *a: losses.reverse_kl_per_token(*a, chunk_size=chunk))
    naive = loss(losses.naive_reverse_kl)
    v1, g1 = jax.jit(jax.value_and_grad(chunked, argnums=(0, 1, 2, 3)))(h, w, ht, wt)
    v0, g0 = jax.value_and_grad(naive, argnums=(0, 1, 2, 3))(h, w, ht, wt)
    _close(v1, v0)
    for a, b in zip(g1, g0, strict=True):
        _close(a, b)
    assert float(jnp.max(jnp.abs(g1[2]))) == 0.0 and float(jnp.max(jnp.abs(g1[3]))) == 0.0
    kl = losses.reverse_kl_per_token(h, w, ht, wt, chunk_size=chunk)
    assert float(kl.min()) >= 0.0
    # KL of a distribution with itself is zero
    np.testing.assert_allclose(np.asarray(losses.reverse_kl_per_token(h, w, h, w)), 0.0, atol=TOL)


def test_shape_errors_name_the_argument():
    h, w, t, ht, wt, _ = _inputs()
    with pytest.raises(ValueError, match="h_BTD"):
        losses.token_logprobs(h[..., :5], w, t)
    with pytest.raises(ValueError, match="teacher"):
        losses.reverse_kl_per_token(h, w, ht, wt[:3])


def test_model_token_logprobs_match_model_logits():
    cfg = ModelConfig.tiny(pattern="M*E")  # one block of each kind: quick to compile
    model = NemotronH(cfg, rngs=nnx.Rngs(0))
    graphdef, params = nnx.split(model)
    rng = np.random.default_rng(0)
    ids = jnp.asarray(rng.integers(1, cfg.vocab_size, (2, 9)), jnp.int32)
    batch = {
        "input_ids": ids,
        "targets": jnp.roll(ids, -1, axis=1),
        "segment_ids": jnp.asarray([[1] * 9, [1] * 5 + [2] * 4], jnp.int32),
    }

    @jax.jit
    def run(params, batch):
        m = nnx.merge(graphdef, params)
        out = losses.model_token_logprobs(m, batch, chunk_size=4, with_entropy=True)
        return out, m(batch["input_ids"], segment_ids=batch["segment_ids"])

    (logp, ent, aux), logits = run(params, batch)
    logp_all = jax.nn.log_softmax(logits, -1)
    _close(logp, jnp.take_along_axis(logp_all, batch["targets"][..., None], -1)[..., 0])
    _close(ent, -jnp.sum(jnp.exp(logp_all) * logp_all, -1))
    assert aux["expert_counts"].shape[1] == cfg.n_routed_experts
