"""The arithmetic chats of the tiny SFT run (`configs/sft_tiny.py`): two-number arithmetic with
the answer in `\\boxed{}` (the format the math verifier reads).
"""

from __future__ import annotations

import random

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
