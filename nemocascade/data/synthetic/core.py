"""The tiny Cascade's three domains (the paper's IF / math / code at toy size):

instruction  "Write the word 'sun' 4 times in uppercase letters."  -> "SUN SUN SUN SUN"
             verified by IFEval ids change_case:* and keywords:frequency (exact count);
math         "What is 347 + 158?"  -> "7+8+0=15, 4+5+1=10, 3+1+1=5. \\boxed{505}"
             verified by math-verify;
code         "Write a Python function f() that returns the letters of 'dgab' in
              alphabetical order."  -> a ```python block; unit tests run in the sandbox.
"""

from __future__ import annotations

import random

from nemocascade.data.synthetic.base import LETTERS, WORDS, Problem, register_domain


@register_domain("instruction")
def _instruction(rng: random.Random) -> Problem:
    word, n = rng.choice(WORDS), rng.randint(2, 8)
    upper = rng.random() < 0.5
    case = "uppercase" if upper else "lowercase"
    shown = word.upper() if upper else word
    prompt = f"Write the word '{word}' {n} times in {case} letters."
    ids = [
        "change_case:english_capital" if upper else "change_case:english_lowercase",
        "keywords:frequency",
        "keywords:frequency",
    ]
    kwargs = [
        {},
        {"keyword": word, "frequency": n, "relation": "at least"},
        {"keyword": word, "frequency": n + 1, "relation": "less than"},
    ]
    return Problem(
        "instruction",
        prompt,
        " ".join([shown] * n),
        {"type": "instruction", "instruction_id_list": ids, "kwargs": kwargs},
    )


@register_domain("math")
def _math(rng: random.Random) -> Problem:
    a, b = rng.randint(100, 999), rng.randint(100, 999)
    # a short worked solution, column by column with the carries, as reasoning traces do
    steps, carry = [], 0
    for place in (1, 10, 100):
        da, db = a // place % 10, b // place % 10
        total = da + db + carry
        steps.append(f"{da}+{db}+{carry}={total}")
        carry = total // 10
    work = ", ".join(steps) + "."
    return Problem(
        "math",
        f"What is {a} + {b}?",
        f"{work} \\boxed{{{a + b}}}",
        {"type": "math", "answer": str(a + b)},
    )


@register_domain("code")
def _code(rng: random.Random) -> Problem:
    s = "".join(rng.sample(LETTERS, rng.randint(3, 5)))
    answer = "".join(sorted(s))
    prompt = f"Write a Python function f() that returns the letters of '{s}' in alphabetical order."
    response = f"```python\ndef f():\n    return '{answer}'\n```"
    tests = f"assert f() == {answer!r}\n"
    return Problem("code", prompt, response, {"type": "code", "tests": tests, "timeout_s": 5.0})
