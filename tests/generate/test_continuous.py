"""Continuous batching (`generate(..., slots=S)`) reproduces the static engine row for row.

Asserted: identical `.tokens`, `.lengths`, `.finish_reason`; `.logprobs` and
`.logprobs_untempered` within LOGPROB_ATOL. Not bitwise: each row runs the same arithmetic in both
engines, but in matrix products over another batch (S slots instead of all rows; a refill's
prompts, left-padded to their own bucket, instead of all prompts), and XLA's CPU kernels round a
row differently with the batch around it: the static engine alone already changes a row's
log-probs by ~5e-7 between a batch of 1 and a batch of 4.
"""

import jax
import numpy as np
import pytest
from flax import nnx

from nemocascade.generate import generate
from nemocascade.sharding import make_mesh, state_shardings
from tests.generate.conftest import PROMPTS

LOGPROB_ATOL = 1e-5  # fp32, fixed up front (measured: ~5e-7)
SAMPLED = {"temperature": 0.8, "top_k": 40, "top_p": 0.9}


def _assert_same(got, ref, atol=LOGPROB_ATOL):
    np.testing.assert_array_equal(got.tokens, ref.tokens)
    np.testing.assert_array_equal(got.lengths, ref.lengths)
    assert got.finish_reason == ref.finish_reason
    np.testing.assert_array_equal(got.prompt_index, ref.prompt_index)
    lp = float(np.max(np.abs(got.logprobs - ref.logprobs)))
    lpr = float(np.max(np.abs(got.logprobs_untempered - ref.logprobs_untempered)))
    print(f"max |continuous - static|: logprobs {lp:.2e}, untempered {lpr:.2e}")
    assert lp <= atol and lpr <= atol


def _eos_ending_some_rows(res, row: int, pos: int) -> int:
    """A token of `res` that, as eos, ends row `row` after at most pos + 1 tokens."""
    return int(res.tokens[row, pos])


def test_greedy_eos_budgets_more_prompts_than_slots(models):
    """3 prompts (lengths 3, 11, 21: prompt buckets 16 and 32) in 2 slots; rows end by eos, by
    the common budget and by a per-prompt budget, at different steps."""
    _, model = models
    kw = {"max_new_tokens": [12, 12, 7]}
    eos = _eos_ending_some_rows(generate(model, PROMPTS, **kw), row=1, pos=3)
    ref = generate(model, PROMPTS, eos_id=eos, **kw)
    assert ref.finish_reason[1] == "eos" and ref.lengths[2] <= 7 and ref.tokens.shape[1] == 12
    got = generate(model, PROMPTS, eos_id=eos, slots=2, chunk_steps=4, **kw)
    _assert_same(got, ref)
    t = got.timings
    assert t["slots"] == 2 and t["refills"] >= 2
    assert t["chunks"] < t["decode_steps"]  # the host is visited per chunk, not per token
    # a row that ends at admission (budget 1): its slot is refilled at the next chunk boundary
    kw = {"max_new_tokens": [12, 1, 7], "eos_id": eos}
    ref = generate(model, PROMPTS, **kw)
    assert ref.lengths[1] == 1
    _assert_same(generate(model, PROMPTS, slots=2, chunk_steps=4, **kw), ref)


def test_sampled_n2_top_p_eos(models):
    """n = 2 samples per prompt (rows i*n + j keep their keys), top-k + top-p, eos; 6 rows in 4
    slots; the rows of one prompt may run in different slots at different times."""
    _, model = models
    kw = {"max_new_tokens": 10, "n": 2, "seed": 11, **SAMPLED}  # test_sampling's settings
    eos = _eos_ending_some_rows(generate(model, PROMPTS, **kw), row=2, pos=2)
    ref = generate(model, PROMPTS, eos_id=eos, **kw)
    assert "eos" in ref.finish_reason and "length" in ref.finish_reason
    got = generate(model, PROMPTS, eos_id=eos, slots=4, **kw)
    _assert_same(got, ref)
    assert not np.array_equal(got.tokens[0], got.tokens[1])  # independent samples of prompt 0


def test_sharded_slots_match_static(models):
    """Slots laid out over the batch axes (4 shards: data 2 x expert 2; tensor 2 splits
    contractions), parameters in their training shardings. The tolerance is test_sharded's:
    the tensor axis reorders fp32 sums (~1.1e-5 in this model's logits)."""
    _, model = models
    mesh = make_mesh({"data": 2, "expert": 2, "tensor": 2})
    graphdef, state = nnx.split(model)
    sharded = jax.device_put(state, state_shardings(state, mesh))
    kw = {"max_new_tokens": 10, "n": 2, "seed": 5, **SAMPLED}  # test_sharded's settings
    ref = generate(model, PROMPTS, **kw)
    got = generate((graphdef, sharded), PROMPTS, mesh=mesh, slots=4, **kw)
    np.testing.assert_array_equal(got.tokens, ref.tokens)
    np.testing.assert_array_equal(got.lengths, ref.lengths)
    # (`.logprobs` under the nucleus: see test_sharded)
    np.testing.assert_allclose(got.logprobs_untempered, ref.logprobs_untempered, atol=1e-4, rtol=0)
    with pytest.raises(ValueError, match="multiple of 4"):
        generate((graphdef, sharded), PROMPTS, mesh=mesh, slots=6, **kw)


def test_bad_slot_arguments(models):
    _, model = models
    with pytest.raises(ValueError, match="slots=0"):
        generate(model, PROMPTS, max_new_tokens=2, slots=0)
    with pytest.raises(ValueError, match="chunk_steps"):
        generate(model, PROMPTS, max_new_tokens=2, slots=2, chunk_steps=0)
