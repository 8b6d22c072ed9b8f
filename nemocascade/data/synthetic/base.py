"""The registry of synthetic domains and what every domain shares: `Problem`, the deterministic
train / held-out split, and the record builders."""

from __future__ import annotations

import hashlib
import random
from collections.abc import Callable, Iterator, Sequence
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
    tools: tuple = ()  # tool declarations of the conversation (agentic domains)
    tool_calls: tuple = ()  # the reference response's tool calls (its SFT target)
    system: str = ""  # the system turn's text (agentic domains: what the environment says)
    # a multi-turn SFT target: the messages after the prompt (assistant turns and the tool
    # messages answering them), or a callable building them only when an SFT record needs them
    # (a generator may run code to get the tool outputs); replaces `response` / `tool_calls`
    turns: tuple | Callable[[], tuple] = ()

    def conversation(self) -> tuple:
        """The multi-turn target's messages (() when the target is one response)."""
        return tuple(self.turns()) if callable(self.turns) else tuple(self.turns)


def _held_out(key: str, fraction: float) -> bool:
    h = int.from_bytes(hashlib.sha256(key.encode()).digest()[:8], "big")
    return (h % 10_000) < fraction * 10_000


DOMAINS: dict[str, Callable[[random.Random], Problem]] = {}


def register_domain(name: str):
    """Decorator: `fn(rng) -> Problem` generates problems of domain `name`."""

    def deco(fn: Callable[[random.Random], Problem]) -> Callable[[random.Random], Problem]:
        DOMAINS[name] = fn
        return fn

    return deco


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
    """The chat record of a problem: the prompt and its reference response (and tool calls), or
    its multi-turn reference conversation (`turns`)."""
    assistant = {"role": "assistant", "content": p.response}
    if p.tool_calls:
        assistant["tool_calls"] = [dict(c) for c in p.tool_calls]
    turns = p.conversation()
    after = [dict(m) for m in turns] if turns else [assistant]
    messages = [{"role": "user", "content": p.prompt}, *after]
    if p.system:
        messages.insert(0, {"role": "system", "content": p.system})
    record = {"messages": messages, "domain": p.domain}
    if p.tools:
        record["tools"] = [dict(t) for t in p.tools]
    return record


def prompt_record(p: Problem) -> dict:
    """The RL / evaluation record of a problem: the prompt, its tools and its verifier."""
    messages = [{"role": "user", "content": p.prompt}]
    if p.system:
        messages.insert(0, {"role": "system", "content": p.system})
    record = {"messages": messages, "domain": p.domain, "verifier": p.verifier}
    if p.tools:
        record["tools"] = [dict(t) for t in p.tools]
    return record


def all_texts(
    n_per_domain: int = 200, seed: int = 0, domains: Sequence[str] | None = None
) -> Iterator[str]:
    """Prompt and response texts of `domains` (default: every registered domain), in
    registration order, to train a tiny tokenizer on."""
    for d in DOMAINS:
        if domains is not None and d not in domains:
            continue
        for split in ("train", "test"):
            for p in problems(d, split, n_per_domain, seed=seed):
                yield p.prompt
                yield p.response
                for m in p.conversation():  # a multi-turn target: tool outputs too
                    yield m["content"]
                for t in p.tools:  # the declarations the tokenizer will see rendered
                    yield str(t.get("name", "")) + " " + str(t.get("description", ""))
