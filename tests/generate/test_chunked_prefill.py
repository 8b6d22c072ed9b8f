"""Chunked prefill (`generate(..., prefill_chunk=C)`): prompts enter the cache in slices of C
positions (a remainder slice first, then a loop over equal slices); the tokens equal one-pass
prefill and the log-probs agree to fp32 1e-5, static and continuous engines, greedy and sampled,
and with the blockwise attention path over the cache."""

import dataclasses

import jax
import numpy as np
import pytest
from flax import nnx

from nemocascade.generate import generate
from nemocascade.generate.slots import prefill
from nemocascade.model.nemotron_h import NemotronH
from tests.generate.conftest import PROMPTS

TOL = dict(rtol=1e-5, atol=1e-5)


def _same(a, b):
    np.testing.assert_array_equal(a.tokens, b.tokens)
    np.testing.assert_array_equal(a.lengths, b.lengths)
    np.testing.assert_allclose(a.logprobs, b.logprobs, **TOL)


def test_chunked_prefill_matches_one_pass(models, chunk=5):
    """Prompt bucket 32 = 2 + 6 x 5: a remainder slice, then the loop (whole slices only:
    the cache test below, chunk 16)."""
    _, ours = models
    kw = dict(max_new_tokens=6, eos_id=None)
    _same(generate(ours, PROMPTS, prefill_chunk=chunk, **kw), generate(ours, PROMPTS, **kw))
    kw = dict(max_new_tokens=6, temperature=1.0, top_p=0.9, seed=3, n=2, eos_id=None)
    _same(generate(ours, PROMPTS, prefill_chunk=chunk, **kw), generate(ours, PROMPTS, **kw))
    kw = dict(max_new_tokens=[3, 7, 5], eos_id=None, slots=2)
    _same(generate(ours, PROMPTS, prefill_chunk=chunk, **kw), generate(ours, PROMPTS, **kw))


def test_chunked_prefill_cache_with_blockwise_attention(models):
    """The cache after a chunked prefill (KV, positions, conv and SSM states) equals one pass's,
    with the blockwise attention over the cache prefix (block sizes smaller than a slice)."""
    _, ours = models
    cfg = dataclasses.replace(
        ours.cfg, attention_impl="blockwise", attention_block_q=4, attention_block_k=4
    )
    model = NemotronH(cfg, rngs=nnx.Rngs(0))
    nnx.update(model, nnx.state(ours))
    graphdef, state = nnx.split(model)
    ids = np.array([[0] * 11 + list(range(1, 22))], np.int32)
    seg = (ids > 0).astype(np.int32)
    one = prefill(graphdef, state, ids, seg, cache_len=40, mesh=None)
    for chunk in (3, 16):
        got = prefill(graphdef, state, ids, seg, cache_len=40, mesh=None, chunk=chunk)
        np.testing.assert_allclose(got[0], one[0], **TOL)
        for x, y in zip(jax.tree.leaves(got[1]), jax.tree.leaves(one[1]), strict=True):
            np.testing.assert_allclose(np.asarray(x, np.float32), np.asarray(y, np.float32), **TOL)


def test_bad_prefill_chunk(models):
    _, ours = models
    with pytest.raises(ValueError, match="prefill_chunk must be >= 0"):
        generate(ours, PROMPTS, max_new_tokens=2, prefill_chunk=-1)
    with pytest.raises(TypeError, match="prefill_chunk must be an integer"):
        generate(ours, PROMPTS, max_new_tokens=2, prefill_chunk=2.5)
