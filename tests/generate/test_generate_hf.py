"""Greedy generation equals Hugging Face transformers' `generate` (per prompt, do_sample=False)."""

import numpy as np
import torch

from nemocascade.generate import generate
from tests.generate.conftest import PROMPTS

EOS = 2


def test_greedy_tokens_equal_transformers_generate(models):
    ref, ours = models
    new = 12
    res = generate(ours, PROMPTS, max_new_tokens=new, eos_id=EOS)
    assert res.tokens.shape == (len(PROMPTS), new) and res.tokens.dtype == np.int32
    for i, p in enumerate(PROMPTS):
        with torch.no_grad():
            out = ref.generate(
                torch.tensor([p]),
                attention_mask=torch.ones(1, len(p), dtype=torch.long),
                max_new_tokens=new,
                do_sample=False,
                eos_token_id=EOS,
                pad_token_id=0,
            )
        hf_new = out[0, len(p) :].tolist()
        if EOS in hf_new:
            hf_new = hf_new[: hf_new.index(EOS) + 1]
        n = int(res.lengths[i])
        assert res.tokens[i, :n].tolist() == hf_new, f"prompt {i}"
        assert res.finish_reason[i] == ("eos" if hf_new[-1] == EOS else "length")
        assert (res.tokens[i, n:] == 0).all()
        # greedy: the reported log-prob is the model's own (untempered) log-prob, always <= 0
        np.testing.assert_array_equal(res.logprobs[i], res.logprobs_untempered[i])
        assert (res.logprobs[i, :n] <= 0).all() and (res.logprobs[i, n:] == 0).all()
