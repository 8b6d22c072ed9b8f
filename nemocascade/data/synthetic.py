"""Synthetic, deterministic data: the tiny Cascade's domains, checked by the real verifiers, and
the arithmetic chats of the tiny SFT run (`arithmetic_records`).

Each domain is a generator of problems with a disjoint train / held-out split (by a hash of the
problem, so the split does not depend on how many are drawn). A problem renders as
  * an SFT chat record  {"messages": [user, assistant], "domain": ...}, and
  * an RL prompt record {"messages": [user], "domain": ..., "verifier": {...}}
in the formats that `nemocascade.data` reads and `nemocascade.rewards` scores.

Domains (the paper's IF / math / code, at toy size):
  instruction  "Write the word 'sun' 4 times in uppercase letters."  -> "SUN SUN SUN SUN"
               verified by IFEval ids change_case:* and keywords:frequency (exact count);
  math         "What is 347 + 158?"  -> "7+8+0=15, 4+5+1=10, 3+1+1=5. \\boxed{505}"
               verified by math-verify;
  code         "Write a Python function f() that returns the letters of 'dgab' in
                alphabetical order."  -> a ```python block; unit tests run in the sandbox.
"""

from __future__ import annotations

import hashlib
import random
from collections.abc import Callable, Iterator
from dataclasses import dataclass

WORDS = (
    "sun",
    "cat",
    "tree",
    "blue",
    "star",
    "rock",
    "fish",
    "moon",
    "rain",
    "bird",
    "lamp",
    "door",
    "milk",
    "leaf",
    "ship",
    "gold",
    "wind",
    "snow",
    "fire",
    "road",
    "bell",
    "king",
    "corn",
    "wolf",
    "rose",
    "sand",
    "coal",
    "frog",
    "hill",
    "nest",
    "boat",
    "cake",
    "desk",
    "drum",
    "duck",
    "farm",
    "gate",
    "goat",
    "harp",
    "iron",
    "jade",
    "kite",
    "lake",
    "lion",
    "mask",
    "nail",
    "oak",
    "owl",
    "pear",
    "pig",
    "pine",
    "plum",
    "ring",
    "rope",
    "salt",
    "seed",
    "silk",
    "sock",
    "soup",
    "swan",
    "tent",
    "toad",
    "town",
    "vase",
    "wave",
    "well",
    "wing",
    "yarn",
    "zinc",
    "apple",
    "bread",
    "chair",
    "cloud",
    "dance",
    "eagle",
    "field",
    "glass",
    "grape",
    "horse",
    "house",
    "juice",
    "knife",
    "lemon",
    "mango",
    "night",
    "ocean",
    "paper",
    "queen",
    "river",
    "sheep",
    "stone",
    "tiger",
    "train",
    "water",
)
LETTERS = "abcdefghijklmnop"


@dataclass(frozen=True)
class Problem:
    domain: str
    prompt: str
    response: str  # a reference response (SFT target)
    verifier: dict


def _held_out(key: str, fraction: float) -> bool:
    h = int.from_bytes(hashlib.sha256(key.encode()).digest()[:8], "big")
    return (h % 10_000) < fraction * 10_000


# ------------------------------------------------------------------------------------ domains
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


def _code(rng: random.Random) -> Problem:
    s = "".join(rng.sample(LETTERS, rng.randint(3, 5)))
    answer = "".join(sorted(s))
    prompt = f"Write a Python function f() that returns the letters of '{s}' in alphabetical order."
    response = f"```python\ndef f():\n    return '{answer}'\n```"
    tests = f"assert f() == {answer!r}\n"
    return Problem("code", prompt, response, {"type": "code", "tests": tests, "timeout_s": 5.0})


DOMAINS: dict[str, Callable[[random.Random], Problem]] = {
    "instruction": _instruction,
    "math": _math,
    "code": _code,
}


def problems(
    domain: str, split: str, n: int, *, seed: int = 0, held_out_fraction: float = 0.2
) -> list[Problem]:
    """`n` distinct problems of `domain` from `split` ('train' or 'test'), deterministic in `seed`.

    Train and test never share a prompt. Raises if the split cannot supply `n` distinct problems.
    """
    if domain not in DOMAINS:
        raise ValueError(f"unknown domain {domain!r}; known: {sorted(DOMAINS)}")
    if split not in ("train", "test"):
        raise ValueError(f"split must be 'train' or 'test', got {split!r}")
    rng = random.Random(f"{domain}/{split}/{seed}")
    seen: set[str] = set()
    out: list[Problem] = []
    for _ in range(200 * n + 1000):
        p = DOMAINS[domain](rng)
        if p.prompt in seen or _held_out(p.prompt, held_out_fraction) != (split == "test"):
            continue
        seen.add(p.prompt)
        out.append(p)
        if len(out) == n:
            return out
    raise ValueError(
        f"domain {domain!r} split {split!r}: only {len(out)} distinct problems, asked {n}"
    )


def sft_record(p: Problem) -> dict:
    return {
        "messages": [
            {"role": "user", "content": p.prompt},
            {"role": "assistant", "content": p.response},
        ],
        "domain": p.domain,
    }


def prompt_record(p: Problem) -> dict:
    return {
        "messages": [{"role": "user", "content": p.prompt}],
        "domain": p.domain,
        "verifier": p.verifier,
    }


def all_texts(n_per_domain: int = 200, seed: int = 0) -> Iterator[str]:
    """Prompt and response texts of every domain (to train the tiny tokenizer on)."""
    for d in DOMAINS:
        for split in ("train", "test"):
            for p in problems(d, split, n_per_domain, seed=seed):
                yield p.prompt
                yield p.response


# ------------------------------------------------------------------------------------ tiny SFT
# Two-number arithmetic chats with the answer in `\\boxed{}` (the format the math verifier reads):
#   {"messages": [{"role": "user", "content": "What is 23+58?"},
#                 {"role": "assistant", "reasoning_content": "23+58=81",
#                  "content": "\\boxed{81}"}],
#    "domain": "math"}
OPS = ("+", "-", "*")


def arithmetic_records(
    num_records: int, *, seed: int = 0, max_operand: int = 99, ops: tuple[str, ...] = OPS
) -> list[dict]:
    """`num_records` distinct chat records, the same list for the same arguments."""
    if num_records < 1 or max_operand < 1:
        raise ValueError(
            f"need num_records >= 1 and max_operand >= 1, got {num_records}, {max_operand}"
        )
    capacity = len(ops) * (max_operand + 1) ** 2
    if num_records > capacity:
        raise ValueError(f"only {capacity} distinct problems with max_operand={max_operand}")
    rng = random.Random(seed)
    seen: set[tuple[int, str, int]] = set()
    records = []
    while len(records) < num_records:
        a, b, op = rng.randint(0, max_operand), rng.randint(0, max_operand), rng.choice(ops)
        if (a, op, b) in seen:
            continue
        seen.add((a, op, b))
        answer = a + b if op == "+" else a - b if op == "-" else a * b
        records.append(
            {
                "messages": [
                    {"role": "user", "content": f"What is {a}{op}{b}?"},
                    {
                        "role": "assistant",
                        "reasoning_content": f"{a}{op}{b}={answer}",
                        "content": f"\\boxed{{{answer}}}",
                    },
                ],
                "domain": "math",
            }
        )
    return records
