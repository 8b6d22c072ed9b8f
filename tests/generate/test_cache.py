"""Caches: cached prefill + single-step decode equal the no-cache forward pass (fp32, 1e-5)."""

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from nemocascade.model import ModelConfig, NemotronH
from nemocascade.model.mamba2 import ssd_scan, ssd_step

ATOL = 1e-5  # fp32 cached vs uncached logits, fixed up front


def _cached_and_reference(model, ids, seg, seqs, p_len, decode):
    """Jitted: cached logits [B, p_len + decode, V] (prefill chunks of 4 + rest, then T=1 steps
    in a scan) and the no-cache logits of the sequences right-padded (padding after a sequence
    cannot reach it: causal), [B, max len, V]."""
    graphdef, state = nnx.split(model)
    width = max(map(len, seqs))
    full = np.zeros((len(seqs), width), np.int32)
    full_seg = np.zeros((len(seqs), width), np.int32)
    for i, s in enumerate(seqs):
        full[i, : len(s)], full_seg[i, : len(s)] = s, 1

    @jax.jit
    def run(state, ids, seg, steps_BT, full, full_seg):
        m = nnx.merge(graphdef, state)
        cache = m.init_cache(ids.shape[0], p_len + decode)
        la, cache = m(ids[:, :4], segment_ids=seg[:, :4], cache=cache)
        lb, cache = m(ids[:, 4:], segment_ids=seg[:, 4:], cache=cache)  # continues with T > 1

        def step(cache, tok_B):
            lt, cache = nnx.merge(graphdef, state)(
                tok_B[:, None], segment_ids=jnp.ones_like(tok_B)[:, None], cache=cache
            )
            return cache, lt[:, 0]

        _, l_TBV = jax.lax.scan(step, cache, steps_BT.T)
        got = jnp.concatenate([la, lb, jnp.swapaxes(l_TBV, 0, 1)], axis=1)
        return got, m(full, segment_ids=full_seg)

    steps = jnp.asarray([s[len(s) - decode :] for s in seqs], jnp.int32)
    got, ref = run(state, jnp.asarray(ids), jnp.asarray(seg), steps, full, full_seg)
    return np.asarray(got), [np.asarray(ref[i, : len(s)]) for i, s in enumerate(seqs)]


def test_cached_prefill_and_decode_match_full_forward():
    """Ragged left-padded prefill in two chunks (the short row's first chunk is all padding), then
    T=1 decode steps, against the no-cache forward of each unpadded sequence; every block type
    (Mamba, attention, MoE, MLP) is in the pattern."""
    cfg = ModelConfig.tiny(pattern="M*EM-E", chunk_size=4)
    model = NemotronH(cfg, rngs=nnx.Rngs(3))
    rng = np.random.default_rng(0)
    p_len, decode = 6, 3
    seqs = [rng.integers(0, cfg.vocab_size, size=L).tolist() for L in (2 + decode, 6 + decode)]
    prompts = [s[: len(s) - decode] for s in seqs]
    ids = np.zeros((2, p_len), np.int32)
    seg = np.zeros((2, p_len), np.int32)
    for i, p in enumerate(prompts):
        ids[i, p_len - len(p) :], seg[i, p_len - len(p) :] = p, 1
    got, refs = _cached_and_reference(model, ids, seg, seqs, p_len, decode)
    worst = max(
        float(np.max(np.abs(got[i, p_len - len(prompts[i]) :] - refs[i]))) for i in range(len(seqs))
    )
    print(f"max |cached - uncached| = {worst:.2e}")
    assert worst <= ATOL


def test_ssd_step_recurrence_matches_chunked_scan():
    """The single-step Mamba-2 recurrence iterated over T equals the chunked SSD scan."""
    ks = jax.random.split(jax.random.key(0), 6)
    b, t, h, p, g, n = 2, 11, 4, 8, 2, 16
    x = jax.random.normal(ks[0], (b, t, h, p))
    dt = jax.nn.softplus(jax.random.normal(ks[1], (b, t, h)))
    a = -jnp.exp(jax.random.normal(ks[2], (h,)))
    bb = jax.random.normal(ks[3], (b, t, g, n))
    cc = jax.random.normal(ks[4], (b, t, g, n))
    init = jax.random.normal(ks[5], (b, h, p, n))
    y_scan, final_scan = jax.jit(ssd_scan, static_argnums=6)(
        x, dt, a, bb, cc, jnp.ones((b, t), jnp.int32), 4, init
    )

    def step(state, inputs):
        x_i, dt_i, b_i, c_i = inputs
        y, state = ssd_step(state, x_i, dt_i, a, b_i, c_i)
        return state, y

    def swap(z):
        return jnp.swapaxes(z, 0, 1)

    state, ys = jax.jit(lambda s0, xs: jax.lax.scan(step, s0, xs))(
        init, (swap(x), swap(dt), swap(bb), swap(cc))
    )
    np.testing.assert_allclose(swap(ys), y_scan, atol=ATOL, rtol=0)
    np.testing.assert_allclose(state, final_scan, atol=ATOL, rtol=0)
