"""A synthetic preference domain ("chat") whose truth is a hidden style rule, for the tiny RLHF.

Prompts ask for a short remark about one or two things; an answer names each of them with an
adjective:

    "Tell me about the moon."                  -> "The moon is bright!"
    "Say something about the wolf and the lamp." -> "The wolf is quiet and the lamp is warm!"

THE HIDDEN RULE (known to this generator only): a preferred answer ENDS WITH AN EXCLAMATION MARK
(its last non-space character is "!"). Nothing in a prompt hints at it, no verifier of the other
domains checks it, and the rule-breaking answers say the same words ending in ".", "?" or nothing.
It is one token before `<|im_end|>`, so a ~1M-parameter reward model learns it in a few hundred
steps and a policy can follow it, yet SFT alone leaves it at chance:

  * SFT chat records (`sft_record`): the reference answer follows the rule for a seeded ~50% of the
    problems (`RuleProblem.follows`), so SFT teaches the format, not the preference;
  * preference pairs (`preference_record`): chosen follows the rule, rejected is the same answer
    with another ending (a minimal pair: the rule is the only signal);
  * RL prompt records and held-out prompt records (`prompt_record`) carry
    `{"type": "hidden_rule", "rule": "exclamation", "subjects": [...]}`, scored by the
    `hidden_rule` verifier (`nemocascade.rewards.hidden_rule`): 1 iff the final answer ends with
    "!" AND names every subject of the prompt (so a bare "!" is not the truth: the ground truth
    is rule + relevance), else 0.

Splits follow `data.synthetic`: a problem is held out by a hash of its prompt, so train and test
never share a prompt, whatever the number drawn.

Importing this module registers the `chat` domain in `data.synthetic` (`problem`, whose reference
is the SFT target).
"""

from __future__ import annotations

import random
from dataclasses import dataclass

from nemocascade.data.synthetic.base import WORDS, Problem, _held_out, register_domain

DOMAIN = "chat"
RULE_END = "!"  # the hidden rule; `nemocascade.rewards.hidden_rule` checks it
OFF_ENDS = (".", ".", ".", "", "?")  # endings of the rule-breaking answers (mostly ".")
ONE_SUBJECT = (
    "Tell me about the {a}.",
    "Describe the {a} in a few words.",
    "Say something about the {a}.",
    "What do you think of the {a}?",
)
TWO_SUBJECTS = (
    "Tell me about the {a} and the {b}.",
    "Describe the {a} and the {b} in a few words.",
    "Say something about the {a} and the {b}.",
    "What do you think of the {a} and the {b}?",
)
ADJECTIVES = (
    "bright",
    "quiet",
    "warm",
    "cold",
    "small",
    "big",
    "old",
    "new",
    "soft",
    "loud",
    "calm",
    "fast",
    "slow",
    "dark",
    "clean",
    "wild",
)


@dataclass(frozen=True)
class RuleProblem:
    """One prompt, its subjects and the answer's words; `follows`: whether the SFT reference
    obeys the hidden rule; `off_end`: the ending of the rule-breaking version."""

    prompt: str
    subjects: tuple[str, ...]
    body: str  # the answer without its final punctuation
    follows: bool
    off_end: str

    @property
    def good(self) -> str:
        """The answer that follows the rule."""
        return self.body + RULE_END

    @property
    def bad(self) -> str:
        """The same answer breaking the rule."""
        return self.body + self.off_end

    @property
    def reference(self) -> str:
        """The SFT target (rule followed for ~50% of the problems)."""
        return self.good if self.follows else self.bad

    @property
    def verifier(self) -> dict:
        return {"type": "hidden_rule", "rule": "exclamation", "subjects": list(self.subjects)}


def draw(rng: random.Random) -> RuleProblem:
    """A random problem (30% one subject, 70% two distinct subjects)."""
    if rng.random() < 0.3:
        subjects = (rng.choice(WORDS),)
        prompt = rng.choice(ONE_SUBJECT).format(a=subjects[0])
    else:
        subjects = tuple(rng.sample(WORDS, 2))
        prompt = rng.choice(TWO_SUBJECTS).format(a=subjects[0], b=subjects[1])
    parts = [f"the {s} is {rng.choice(ADJECTIVES)}" for s in subjects]
    body = " and ".join(parts)
    body = body[0].upper() + body[1:]
    return RuleProblem(prompt, subjects, body, rng.random() < 0.5, rng.choice(OFF_ENDS))


@register_domain(DOMAIN)
def problem(rng: random.Random) -> Problem:
    """The registered `chat` domain of `data.synthetic`: the problem as a `synthetic.Problem`
    whose response is the SFT reference (rule followed ~50% of the time). It draws as `draw`,
    so `synthetic.problems("chat", split, n)` lists the prompts of `problems(split, n)`."""
    p = draw(rng)
    return Problem(DOMAIN, p.prompt, p.reference, p.verifier)


def problems(
    split: str, n: int, *, seed: int = 0, held_out_fraction: float = 0.2
) -> list[RuleProblem]:
    """`n` distinct problems of `split` ('train' or 'test'), deterministic in `seed`; train and
    test never share a prompt. Raises if the split cannot supply `n` distinct problems."""
    if split not in ("train", "test"):
        raise ValueError(f"split must be 'train' or 'test', got {split!r}")
    rng = random.Random(f"{DOMAIN}/{split}/{seed}")
    seen: set[str] = set()
    out: list[RuleProblem] = []
    for _ in range(200 * n + 1000):
        p = draw(rng)
        if p.prompt in seen or _held_out(p.prompt, held_out_fraction) != (split == "test"):
            continue
        seen.add(p.prompt)
        out.append(p)
        if len(out) == n:
            return out
    raise ValueError(
        f"domain {DOMAIN!r} split {split!r}: only {len(out)} distinct problems, asked {n}"
    )


# ------------------------------------------------------------------------------------ records
def sft_record(p: RuleProblem) -> dict:
    """A chat record whose answer is the SFT reference."""
    return {
        "messages": [
            {"role": "user", "content": p.prompt},
            {"role": "assistant", "content": p.reference},
        ],
        "domain": DOMAIN,
    }


def preference_record(p: RuleProblem) -> dict:
    """A preference pair: chosen follows the rule, rejected is the same answer ending otherwise."""
    return {"prompt": p.prompt, "chosen": p.good, "rejected": p.bad, "domain": DOMAIN}


def prompt_record(p: RuleProblem) -> dict:
    """An RL / held-out prompt record scored by the `hidden_rule` verifier."""
    return {
        "messages": [{"role": "user", "content": p.prompt}],
        "domain": DOMAIN,
        "verifier": p.verifier,
    }


def records(kind: str, n: int, *, seed: int = 0) -> list[dict]:
    """`n` records of `kind`: 'sft' (chat), 'pairs' (preferences) and 'rl' (prompts) from the
    train split, 'eval' (prompts) from the held-out split."""
    make = {"sft": sft_record, "pairs": preference_record, "rl": prompt_record}
    if kind == "eval":
        return [prompt_record(p) for p in problems("test", n, seed=seed)]
    if kind not in make:
        raise ValueError(f"record kind {kind!r} not in {sorted(make) + ['eval']}")
    return [make[kind](p) for p in problems("train", n, seed=seed)]


def all_texts(n: int = 200, seed: int = 0) -> list[str]:
    """Prompt and answer texts of both splits (to train the tiny tokenizer on)."""
    out = []
    for split in ("train", "test"):
        for p in problems(split, n, seed=seed):
            out += [p.prompt, p.good, p.bad]
    return out
