"""Sampling: top-k / top-p masks against transformers' warpers, on-policy log-probs against the
trainer's forward pass, seed reproducibility, n samples per prompt, stops and bucketing."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from transformers.generation.logits_process import TopKLogitsWarper, TopPLogitsWarper

from nemocascade.generate import compiled_program_counts, generate, precompile
from nemocascade.generate.sampling import SamplingMode, sample_step, sampling_logits
from tests.generate.conftest import PROMPTS

LOGPROB_ATOL = 1e-4  # fp32 log-probs (logit tolerance), fixed up front
SAMPLED = {"temperature": 0.8, "top_k": 40, "top_p": 0.9}


def _hf_mask(logits, top_k, top_p):
    x = torch.tensor(logits)
    if top_k:
        x = TopKLogitsWarper(top_k)(None, x)
    if top_p < 1:
        x = TopPLogitsWarper(top_p)(None, x)
    return torch.isinf(x).numpy()


@pytest.mark.parametrize("top_k,top_p", [(5, 1.0), (0, 0.6), (20, 0.8), (1, 0.5)])
def test_masks_equal_transformers_warpers(top_k, top_p):
    logits = np.random.default_rng(top_k).normal(size=(6, 97)).astype(np.float32) * 2
    mode = SamplingMode(greedy=False, top_k=top_k, top_p=top_p < 1)
    ours = np.isinf(np.asarray(sampling_logits(jnp.asarray(logits), mode, 1.0, jnp.float32(top_p))))
    np.testing.assert_array_equal(ours, _hf_mask(logits, top_k, top_p))


def test_top_p_hand_case_and_samples_stay_inside_mask():
    # probs 0.5, 0.2, 0.15, 0.1, 0.05: top_p 0.75 keeps the first three (0 + .5 + .2 < .75)
    logits = jnp.log(jnp.asarray([[0.1, 0.5, 0.05, 0.2, 0.15]]))
    mode = SamplingMode(greedy=False, top_k=0, top_p=True)
    kept = ~np.isinf(np.asarray(sampling_logits(logits, mode, 1.0, jnp.float32(0.75))))[0]
    assert kept.tolist() == [False, True, False, True, True]
    keys = jax.random.split(jax.random.key(0), 512)
    sample = jax.jit(lambda lg, k: sample_step(lg, k, 0, mode, jnp.float32(1.0), jnp.float32(0.75)))
    toks, lp, lpr = sample(jnp.repeat(logits, 512, 0), keys)
    assert set(np.asarray(toks).tolist()) == {1, 3, 4}
    renorm = np.log(np.array([0.1, 0.5, 0.05, 0.2, 0.15]) / 0.85)
    np.testing.assert_allclose(lp, renorm[np.asarray(toks)], atol=1e-6)
    np.testing.assert_allclose(
        lpr, np.log([0.1, 0.5, 0.05, 0.2, 0.15])[np.asarray(toks)], atol=1e-6
    )


def _trainer_logits(model, prompts, res):
    """The trainer's view: one forward pass over prompt + generated tokens (right-padded)."""
    seqs = [
        prompts[res.prompt_index[r]] + res.tokens[r, : res.lengths[r]].tolist()
        for r in range(len(res.lengths))
    ]
    width = max(map(len, seqs))
    ids = np.zeros((len(seqs), width), np.int32)
    seg = np.zeros((len(seqs), width), np.int32)
    for r, s in enumerate(seqs):
        ids[r, : len(s)], seg[r, : len(s)] = s, 1
    return np.asarray(jax.jit(lambda i, s: model(i, segment_ids=s))(ids, seg))


def test_sampled_logprobs_equal_trainer_forward(models):
    """The on-policy guarantee: rollout log-probs == the trainer's log-probs of the same tokens."""
    _, model = models
    n, new = 2, 10
    res = generate(model, PROMPTS, max_new_tokens=new, n=n, seed=11, **SAMPLED)
    assert res.tokens.shape == (len(PROMPTS) * n, new)
    assert res.prompt_index.tolist() == [0, 0, 1, 1, 2, 2]
    logits = _trainer_logits(model, PROMPTS, res)
    mode = SamplingMode(greedy=False, top_k=SAMPLED["top_k"], top_p=True)
    worst_raw = worst_sampled = 0.0
    for r in range(len(res.lengths)):
        p, L = len(PROMPTS[res.prompt_index[r]]), int(res.lengths[r])
        step_logits = jnp.asarray(logits[r, p - 1 : p - 1 + L])  # predicts tokens 0..L-1
        toks = res.tokens[r, :L]
        raw = np.asarray(jax.nn.log_softmax(step_logits, -1))[np.arange(L), toks]
        used = sampling_logits(
            step_logits, mode, SAMPLED["temperature"], jnp.float32(SAMPLED["top_p"])
        )
        assert not np.isinf(np.asarray(used)[np.arange(L), toks]).any(), "token outside top-k/top-p"
        tempered = np.asarray(jax.nn.log_softmax(used, -1))[np.arange(L), toks]
        worst_raw = max(worst_raw, float(np.max(np.abs(raw - res.logprobs_untempered[r, :L]))))
        worst_sampled = max(worst_sampled, float(np.max(np.abs(tempered - res.logprobs[r, :L]))))
    print(
        f"max |rollout - trainer| log-prob: untempered {worst_raw:.2e}, "
        f"sampled dist {worst_sampled:.2e}"
    )
    assert worst_raw <= LOGPROB_ATOL and worst_sampled <= LOGPROB_ATOL
    # two samples of one prompt differ (independent per-row keys)
    assert not np.array_equal(res.tokens[0], res.tokens[1])


def test_seed_reproducible_and_no_recompile_within_buckets(models):
    _, model = models
    a = generate(model, PROMPTS, max_new_tokens=10, n=2, seed=11, **SAMPLED)
    before = compiled_program_counts()
    b = generate(model, PROMPTS, max_new_tokens=10, n=2, seed=11, **SAMPLED)
    np.testing.assert_array_equal(a.tokens, b.tokens)
    np.testing.assert_array_equal(a.logprobs, b.logprobs)
    c = generate(model, PROMPTS, max_new_tokens=10, n=2, seed=12, **SAMPLED)
    assert not np.array_equal(a.tokens, c.tokens)
    # other prompt lengths / max_new_tokens / temperature / top_p, same buckets: no new program
    shorter = [p[: max(1, len(p) - 2)] for p in PROMPTS]
    generate(model, shorter, max_new_tokens=7, n=2, seed=3, temperature=1.3, top_k=40, top_p=0.5)
    assert compiled_program_counts() == before
    times = precompile(model, shorter, max_new_tokens=7, n=2, temperature=1.3, top_k=40, top_p=0.5)
    assert set(times) == {"prefill_compile_s", "decode_compile_s"} and min(times.values()) > 0


class _CharTokenizer:
    """Test tokenizer: token t decodes to one letter."""

    def decode(self, ids):
        return "".join(chr(ord("a") + t % 26) for t in ids)


def test_eos_stop_ids_and_stop_strings(models):
    _, model = models
    base = generate(model, PROMPTS, max_new_tokens=12)
    assert base.finish_reason == ["length"] * 3 and base.lengths.tolist() == [12] * 3
    row = base.tokens[1].tolist()
    target = row[4]
    first = row.index(target)
    res = generate(model, PROMPTS, max_new_tokens=12, stop_ids=[target])
    assert res.finish_reason[1] == "stop" and res.lengths[1] == first + 1
    assert (
        res.tokens[1, : first + 1].tolist() == row[: first + 1]
        and (res.tokens[1, first + 1 :] == 0).all()
    )
    unused = min(set(range(256)) - set(row))  # an eos id this row never produces
    eos = generate(model, PROMPTS, max_new_tokens=12, eos_id=[unused, target])
    assert eos.finish_reason[1] == "eos" and eos.lengths[1] == first + 1
    tok = _CharTokenizer()
    stop = tok.decode(row[5:7])
    cut = tok.decode(row).index(stop) + len(stop)  # one letter per token
    s = generate(model, PROMPTS, max_new_tokens=12, stop_strings=[stop], tokenizer=tok)
    assert s.finish_reason[1] == "stop" and s.lengths[1] == cut
    assert (s.tokens[1, cut:] == 0).all() and (s.logprobs[1, cut:] == 0).all()


def test_per_prompt_max_new_tokens(models):
    """One budget per prompt: each row is the common-budget row cut at its own budget."""
    _, model = models
    full = generate(model, PROMPTS, max_new_tokens=12)
    res = generate(model, PROMPTS, max_new_tokens=[12, 5, 9])
    assert res.tokens.shape == (3, 12) and res.lengths.tolist() == [12, 5, 9]
    assert res.finish_reason == ["length"] * 3
    for r, m in enumerate([12, 5, 9]):
        np.testing.assert_array_equal(res.tokens[r, :m], full.tokens[r, :m])
        assert (res.tokens[r, m:] == 0).all() and (res.logprobs[r, m:] == 0).all()
    with pytest.raises(ValueError, match="2 entries for 3 prompts"):
        generate(model, PROMPTS, max_new_tokens=[4, 4])


def test_bad_inputs_raise_clear_errors(models):
    _, model = models
    with pytest.raises(ValueError, match=r"prompt_ids\[1\] is empty"):
        generate(model, [[1], []], max_new_tokens=2)
    with pytest.raises(ValueError, match=r"outside \[0, 256\)"):
        generate(model, [[1, 300]], max_new_tokens=2)
    with pytest.raises(ValueError, match="need a tokenizer"):
        generate(model, [[1]], max_new_tokens=2, stop_strings=["x"])
    with pytest.raises(ValueError, match="top_p"):
        generate(model, [[1]], max_new_tokens=2, temperature=1.0, top_p=0.0)
    with pytest.raises(TypeError, match="nnx.Module or a"):
        generate(object(), [[1]], max_new_tokens=2)
