"""`generate` refuses bad arguments before compiling anything, naming the argument (issue 15).

Before these checks, `pad_id >= vocab` returned all-zero tokens with NaN log-probs, and float
token ids, `temperature=inf` and an eos id outside the vocabulary were accepted. Every case here
raises in `make_request`, so no program is compiled and the file runs in seconds.
"""

import numpy as np
import pytest
from flax import nnx

from nemocascade.generate import generate
from nemocascade.generate.request import make_request
from nemocascade.model import ModelConfig, NemotronH

VOCAB = 256  # ModelConfig.tiny()


@pytest.fixture(scope="module")
def model():
    return NemotronH(ModelConfig.tiny(pattern="-"), rngs=nnx.Rngs(0))  # one layer: fast init


def _request(model, prompts=([1, 2],), **kw):
    args = dict(
        max_new_tokens=4,
        temperature=0.0,
        top_p=1.0,
        top_k=0,
        seed=0,
        eos_id=None,
        stop_ids=(),
        stop_strings=(),
        tokenizer=None,
        n=1,
        pad_id=0,
        mesh=None,
    )
    args.update(kw)
    return make_request(model, list(prompts), **args)


@pytest.mark.parametrize(
    "kw,error,match",
    [
        ({"pad_id": VOCAB}, ValueError, r"pad_id=256 is outside the model's vocabulary \[0, 256\)"),
        ({"pad_id": -1}, ValueError, "pad_id=-1 is outside"),
        ({"pad_id": 1.0}, TypeError, "pad_id must be an integer token id"),
        ({"eos_id": 999}, ValueError, "eos_id=999 is outside"),
        ({"eos_id": [2, 300]}, ValueError, r"eos_id\[1\]=300 is outside"),
        ({"eos_id": 2.0}, TypeError, r"eos_id must be an int or a sequence"),
        ({"eos_id": [True]}, TypeError, r"eos_id\[0\] must be an integer token id"),
        ({"stop_ids": [5, -2]}, ValueError, r"stop_ids\[1\]=-2 is outside"),
        ({"stop_ids": "5"}, TypeError, "stop_ids must be an int or a sequence"),
        ({"temperature": float("inf")}, ValueError, "temperature must be finite"),
        ({"temperature": float("nan")}, ValueError, "temperature must be finite"),
        ({"temperature": -0.5}, ValueError, "temperature must be >= 0"),
        ({"temperature": "0.7"}, TypeError, "temperature must be a number"),
        ({"temperature": 1.0, "top_p": 1.5}, ValueError, r"top_p must be in \(0, 1\]"),
        ({"temperature": 1.0, "top_p": float("nan")}, ValueError, "top_p must be finite"),
        ({"top_k": -1}, ValueError, "top_k must be >= 0"),
        ({"top_k": 2.5}, TypeError, "top_k must be an integer"),
        ({"n": 0}, ValueError, "n must be >= 1"),
        ({"n": 2.0}, TypeError, "n must be an integer"),
        ({"max_new_tokens": 0}, ValueError, "max_new_tokens must be >= 1"),
        ({"max_new_tokens": 4.0}, TypeError, "max_new_tokens must be an int or one int per"),
        ({"max_new_tokens": [4.5, 4]}, TypeError, r"max_new_tokens\[0\] must be an integer"),
        ({"max_new_tokens": [4, 0]}, ValueError, r"max_new_tokens\[1\] must be >= 1"),
        ({"seed": 0.5}, TypeError, "seed must be an integer"),
        ({"stop_strings": "</s>"}, TypeError, "stop_strings must be a list of strings"),
    ],
)
def test_bad_arguments_name_the_argument(model, kw, error, match):
    prompts = [[1, 2], [3]] if isinstance(kw.get("max_new_tokens"), list) else [[1, 2]]
    with pytest.raises(error, match=f"^generate: {match}"):
        _request(model, prompts, **kw)


@pytest.mark.parametrize(
    "prompts,error,match",
    [
        (
            [[1, 2], [3.0, 4.0]],
            TypeError,
            r"prompt_ids\[1\] has non-integer token ids \[3.0, 4.0\]",
        ),
        ([[1, True]], TypeError, r"prompt_ids\[0\] has non-integer token ids \[True\]"),
        ([[1], np.array([2.0, 3.0])], TypeError, r"prompt_ids\[1\] must be a 1-D .* float64"),
        (np.array([[1.0, 2.0]], np.float32), TypeError, r"prompt_ids\[0\] must be .* float32"),
        ([[1], np.array([True])], TypeError, r"prompt_ids\[1\] must be .* bool"),
        ([[1], "abc"], TypeError, r"prompt_ids\[1\] must be a 1-D"),
        ([[1], [2, VOCAB]], ValueError, r"prompt_ids\[1\] has ids \[256\] outside \[0, 256\)"),
        ([[1], [-3]], ValueError, r"prompt_ids\[1\] has ids \[-3\] outside"),
        ([[1], []], ValueError, r"prompt_ids\[1\] is empty"),
        ([], ValueError, "prompt_ids must be a non-empty list"),
    ],
)
def test_bad_prompts_name_the_prompt(model, prompts, error, match):
    with pytest.raises(error, match=f"^generate: {match}"):
        make_request(
            model,
            prompts,
            max_new_tokens=4,
            temperature=0.0,
            top_p=1.0,
            top_k=0,
            seed=0,
            eos_id=None,
            stop_ids=(),
            stop_strings=(),
            tokenizer=None,
            n=1,
            pad_id=0,
            mesh=None,
        )


def test_the_public_entry_point_checks_before_compiling(model):
    with pytest.raises(ValueError, match="pad_id=256 is outside"):
        generate(model, [[1, 2]], max_new_tokens=2, pad_id=VOCAB)
    with pytest.raises(ValueError, match="temperature must be finite"):
        generate(model, [[1, 2]], max_new_tokens=2, temperature=float("inf"))


def test_integer_forms_are_accepted(model):
    req = _request(
        model,
        [np.array([1, 2], np.int32), (np.int64(3), 4), [VOCAB - 1]],
        max_new_tokens=[np.int64(2), 3, 1],
        pad_id=np.int32(VOCAB - 1),
        eos_id=np.array([2, 3]),
        stop_ids=[np.int16(7)],
        temperature=1,
        top_p=np.float32(0.5),
        top_k=np.int64(4),
        n=2,
        seed=np.uint32(7),
    )
    assert req.prompts == [[1, 2], [3, 4], [VOCAB - 1]]
    assert req.budgets == (2, 3, 1) and req.pad_id == VOCAB - 1
    assert req.eos == (2, 3) and req.stops == (7,) and req.n == 2 and req.seed == 7
    assert req.mode.top_k == 4 and req.mode.top_p and req.temperature == 1.0
    rows = _request(model, np.array([[5, 6], [7, 8]], np.int64))
    assert rows.prompts == [[5, 6], [7, 8]] and rows.eos == () and rows.mode.greedy
