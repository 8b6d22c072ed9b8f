"""Toy versions of the paper's other RL domains, for the rehearsal of the full pipeline:

mcqa               "Which number is the largest? A) 12 B) 7 C) 30 D) 3"  -> "The answer is C."
                   (STEM multiple choice; the mcqa verifier)
structured_output  "Return a JSON object with the field 'word' set to 'sun' and 'count' set
                   to 3."  -> {"word": "sun", "count": 3}  (a JSON Schema with const values)
workplace          a request that one of three declared tools serves ("What is the weather in
                   Paris on Monday?")  -> a <tool_call> of get_weather(city, day); the
                   tool_call verifier parses the call against the declared tools
long_context       a document of numbered facts among filler sentences, then a question about
                   one fact  -> \\boxed{number}  (retrieval over the whole context; math verifier)
long_document      the same facts, 1 to 16 of them (log-uniform), with the question before the
                   document and again after it
long_needle        one fact at a random place among 0-60 filler sentences (a needle in a
                   haystack of up to ~400 tokens), the question before and after the document
"""

from __future__ import annotations

import dataclasses
import json
import math
import random

from nemocascade.data.synthetic.base import WORDS, Problem, register_domain

CITIES = ("Paris", "Lima", "Oslo", "Cairo", "Delhi", "Tokyo", "Quito", "Rome", "Seoul", "Accra")
DAYS = ("Monday", "Tuesday", "Wednesday", "Thursday", "Friday", "Saturday", "Sunday")
NAMES = ("Ada", "Ben", "Cleo", "Dan", "Eve", "Finn", "Gus", "Hana", "Ivy", "Jon")
ADJECTIVES = ("red", "blue", "green", "small", "old", "tall", "quiet", "fast", "round", "dark")

TOOLS = (
    {
        "name": "get_weather",
        "description": "The weather forecast of a city on a day.",
        "parameters": {
            "city": {"type": "string", "description": "city name"},
            "day": {"type": "string", "description": "day of the week"},
        },
        "required": ["city", "day"],
    },
    {
        "name": "send_email",
        "description": "Send an email.",
        "parameters": {
            "to": {"type": "string", "description": "recipient"},
            "subject": {"type": "string", "description": "subject line"},
        },
        "required": ["to", "subject"],
    },
    {
        "name": "lookup_order",
        "description": "Where an order is.",
        "parameters": {"order_id": {"type": "integer", "description": "the order number"}},
        "required": ["order_id"],
    },
)


@register_domain("mcqa")
def _mcqa(rng: random.Random) -> Problem:
    nums = rng.sample(range(1, 100), 4)
    largest = rng.random() < 0.5
    letter = "ABCD"[nums.index(max(nums) if largest else min(nums))]
    options = " ".join(f"{x}) {n}" for x, n in zip("ABCD", nums, strict=True))
    prompt = f"Which number is the {'largest' if largest else 'smallest'}? {options}"
    return Problem("mcqa", prompt, f"The answer is {letter}.", {"type": "mcqa", "answer": letter})


@register_domain("structured_output")
def _structured_output(rng: random.Random) -> Problem:
    key = rng.choice(("word", "name", "item"))
    word, count = rng.choice(WORDS), rng.randint(1, 20)
    prompt = (
        f"Return a JSON object with the field '{key}' set to '{word}' and 'count' set to {count}."
    )
    schema = {
        "type": "object",
        "properties": {key: {"const": word}, "count": {"const": count}},
        "required": [key, "count"],
        "additionalProperties": False,
    }
    response = json.dumps({key: word, "count": count})
    verifier = {"type": "structured_output", "schema": schema}
    return Problem("structured_output", prompt, response, verifier)


@register_domain("workplace")
def _workplace(rng: random.Random) -> Problem:
    kind = rng.randrange(3)
    if kind == 0:
        city, day = rng.choice(CITIES), rng.choice(DAYS)
        prompt = f"What is the weather in {city} on {day}?"
        call = {"name": "get_weather", "arguments": {"city": city, "day": day}}
    elif kind == 1:
        to, subject = rng.choice(NAMES), rng.choice(WORDS)
        prompt = f"Send an email to {to} about {subject}."
        call = {"name": "send_email", "arguments": {"to": to, "subject": subject}}
    else:
        order = rng.randint(100, 999)
        prompt = f"Where is order {order}?"
        call = {"name": "lookup_order", "arguments": {"order_id": order}}
    verifier = {"type": "tool_call", "calls": [call]}
    return Problem("workplace", prompt, "", verifier, tools=TOOLS, tool_calls=(call,))


def long_context(
    rng: random.Random, *, facts: int = 12, filler: int = 1, question_first: bool = False
) -> Problem:
    """A document of `facts` facts ("The red fox has the number 417."), each followed by
    `filler` filler sentences, then a question about one fact chosen uniformly (also before the
    document when `question_first`: the reader knows what to look for while it reads)."""
    keys = rng.sample([(a, w) for a in ADJECTIVES for w in WORDS], facts)
    numbers = [rng.randint(100, 999) for _ in keys]
    lines = []
    for (adj, noun), num in zip(keys, numbers, strict=True):
        lines.append(f"The {adj} {noun} has the number {num}.")
        lines += [f"Nothing happened on {rng.choice(DAYS)}." for _ in range(filler)]
    i = rng.randrange(facts)
    adj, noun = keys[i]
    question = f"What number does the {adj} {noun} have?"
    prompt = (f"{question}\n" if question_first else "") + " ".join(lines) + f"\n{question}"
    answer = str(numbers[i])
    return Problem(
        "long_context", prompt, f"\\boxed{{{answer}}}", {"type": "math", "answer": answer}
    )


register_domain("long_context")(long_context)


@register_domain("long_document")
def _long_document(rng: random.Random, max_facts: int = 16) -> Problem:
    """`long_context` with 1 to `max_facts` facts, log-uniform (as many documents of 1 fact as
    of 2-3, 4-7, 8-15 and 16), the question before and after the document. Measured on the tiny
    Cascade model (experiments/tiny_cascade/README.md): after 1876 SFT steps it copies the number
    of a 1-fact document (85%) but does not pick the asked fact among several (4 or more facts:
    under 1%), and RL does not change that; `long_needle` is what it learns."""
    n = min(max_facts, int(2 ** rng.uniform(0, math.log2(max_facts) + 1)))
    p = long_context(rng, facts=n, filler=1, question_first=True)
    return dataclasses.replace(p, domain="long_document")


@register_domain("long_needle")
def _long_needle(rng: random.Random, max_filler: int = 60) -> Problem:
    """One fact at a uniformly random place among 0 to `max_filler` filler sentences (uniform),
    the question before and after the document: the single needle of long-context retrieval
    tests, which the tiny Cascade model learns where it does not learn `long_document`'s
    choice among several facts."""
    adj, noun = rng.choice(ADJECTIVES), rng.choice(WORDS)
    number = rng.randint(100, 999)
    lines = [f"Nothing happened on {rng.choice(DAYS)}." for _ in range(rng.randint(0, max_filler))]
    lines.insert(rng.randint(0, len(lines)), f"The {adj} {noun} has the number {number}.")
    question = f"What number does the {adj} {noun} have?"
    prompt = f"{question}\n" + " ".join(lines) + f"\n{question}"
    verifier = {"type": "math", "answer": str(number)}
    return Problem("long_needle", prompt, f"\\boxed{{{number}}}", verifier)
