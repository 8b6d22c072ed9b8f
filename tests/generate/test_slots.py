"""Slot caches: per-row positions equal the model's own cached call, and a conversation taken out
of its slot, put back into another one and continued with only its new tokens equals one forward
pass over the whole sequence (fp32 logits, 1e-5)."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from nemocascade.generate import slots as sl
from tests.generate.conftest import CFG

ATOL = 1e-5  # fp32 logits, cached vs uncached (tests/generate/test_cache.py), fixed up front
CACHE_LEN = 48


def _prefill_rows(graphdef, state, prompts, p_len=16):
    ids = np.zeros((len(prompts), p_len), np.int32)
    seg = np.zeros((len(prompts), p_len), np.int32)
    for i, p in enumerate(prompts):
        ids[i, p_len - len(p) :], seg[i, p_len - len(p) :] = p, 1
    return sl.prefill(graphdef, state, ids, seg, cache_len=CACHE_LEN, mesh=None)


@functools.partial(jax.jit, static_argnames="graphdef")
def _full_logits(state, ids, *, graphdef):
    return nnx.merge(graphdef, state)(ids)


def test_pieces():
    assert sl.pieces(13) == [8, 4, 1] and sl.pieces(1) == [1] and sl.pieces(16) == [16]


def test_per_row_forward_equals_model_cached_call(models):
    """With every row at the same index, `slots.forward` is `model(ids, cache=...)`."""
    _, model = models
    graphdef, state = nnx.split(model)
    prompts = [[5, 17, 33], [9, 8, 7, 6, 5, 4, 3, 250, 1, 77, 12]]
    _, cache = _prefill_rows(graphdef, state, prompts)
    tok = jnp.asarray([[7], [11]], jnp.int32)

    @jax.jit
    def both(state, cache, tok):
        m = nnx.merge(graphdef, state)
        ref, ref_cache = m(tok, segment_ids=jnp.ones_like(tok), cache=cache)
        h, got_cache = sl.forward(m, tok, jnp.ones_like(tok), sl.slot_layout(cache))
        return ref, m.logits(h), sl.slot_layout(ref_cache), got_cache

    ref, got, ref_cache, got_cache = both(state, cache, tok)
    diff = float(jnp.max(jnp.abs(ref - got)))
    print(f"max |per-row forward - model cached call| logits = {diff:.2e}")
    assert diff <= ATOL
    for a, b in zip(jax.tree.leaves(ref_cache), jax.tree.leaves(got_cache), strict=True):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=ATOL, rtol=0)


def test_continuation_in_another_slot_equals_one_prefill(models):
    """Slot 2 prefills A, all slots decode 3 tokens each at their own position, slot 2 is taken
    aside and refilled with another prompt, the conversation re-enters in slot 0 (released) and
    is extended with B (6 tokens: pieces 4 + 2) -> its logits over A + D + B equal one forward
    pass over the whole sequence; the other slots are untouched by the continuation."""
    _, model = models
    graphdef, state = nnx.split(model)
    rng = np.random.default_rng(0)
    a = rng.integers(3, CFG.vocab_size, 5).tolist()
    others = [rng.integers(3, CFG.vocab_size, k).tolist() for k in (9, 2)]
    d = rng.integers(3, CFG.vocab_size, (3, 3)).astype(np.int32)  # decoded tokens, per slot
    b = rng.integers(3, CFG.vocab_size, 6).tolist()

    cache = sl.init_slots(model, 3, CACHE_LEN)
    logits, pre = _prefill_rows(graphdef, state, [others[0], others[1], a])
    cache = sl.put_rows(cache, jnp.arange(3), sl.slot_layout(pre))  # slot 2 holds A

    @jax.jit
    def decode(state, cache, tok_S1):
        m = nnx.merge(graphdef, state)
        h, cache = sl.forward(m, tok_S1, jnp.ones_like(tok_S1), cache)
        return m.logits(h)[:, 0], cache

    step_logits = []
    for t in range(3):
        lt, cache = decode(state, cache, jnp.asarray(d[:, t : t + 1]))
        step_logits.append(np.asarray(lt))
    kept = sl.take_rows(cache, jnp.asarray([2]))  # the conversation, aside
    _, pre2 = _prefill_rows(graphdef, state, [[42, 43, 44, 45]])
    cache = sl.put_rows(cache, jnp.asarray([2]), sl.slot_layout(pre2))  # slot 2 reused
    cache = sl.put_rows(cache, jnp.asarray([0]), kept)  # re-enters in slot 0
    before = jax.tree.map(np.asarray, sl.take_rows(cache, jnp.asarray([1, 2])))
    ext, cache = sl.extend((graphdef, state), cache, [0], [b], all_logits=True)
    after = jax.tree.map(np.asarray, sl.take_rows(cache, jnp.asarray([1, 2])))

    seq = a + d[2].tolist() + b
    full = np.asarray(_full_logits(state, jnp.asarray([seq]), graphdef=graphdef))[0]
    got = np.concatenate(
        [
            np.asarray(logits)[2:3],  # predicts d[2, 0] (end of A)
            np.stack([s[2] for s in step_logits]),  # after d[2, 0..2]; the last predicts b[0]
            np.asarray(ext)[0, :-1],  # after b[0..4]
        ]
    )
    want = full[len(a) - 1 : len(seq) - 1]
    worst = float(np.max(np.abs(got - want)))
    print(f"max |slot continuation - one prefill| logits = {worst:.2e}")
    assert worst <= ATOL
    assert np.abs(np.asarray(ext)[0, -1] - full[-1]).max() <= ATOL
    for x, y in zip(jax.tree.leaves(before), jax.tree.leaves(after), strict=True):
        np.testing.assert_array_equal(x, y)
