"""The reward-function registry and the rules every verifier shares.

A reward function is `fn(record: dict, response: str, finished: bool) -> (score, details)` with
`score` in [0, 1] and `details` a small picklable dict. `score_one` applies the shared rules:
  * a response cut at the length limit (`finished=False`, no EOS) scores 0 (overlong penalty);
  * in thinking mode (`thinking=True`: the prompt ended with `<think>\\n`, so the response is
    judged as if it began with it) a response that never writes `</think>` has no final answer and
    scores 0 without consulting the verifier;
  * the verifier is chosen by `record["verifier"]["type"]`, else by `record["domain"]`;
  * the score is clamped to [0, 1].
`final_answer(response, thinking=...)` is the text a verifier should judge: what follows the last
`</think>`; a response that opens `<think>` (or, in thinking mode, any response) and never closes
it has no final answer (""); otherwise a response with no thinking block is judged whole.

A verifier that cannot reach a verdict (no sandbox, a record it cannot read, an instruction it
does not support) raises a `VerifierError` subclass rather than returning 0: the batch scorer
reports it as an error of that `kind`, never as a wrong answer, and the reward cache does not
keep it. Any other exception is an error of kind "exception".
"""

from __future__ import annotations

from collections.abc import Callable

RewardFn = Callable[[dict, str, bool], "tuple[float, dict]"]
_REGISTRY: dict[str, RewardFn] = {}
_ALIASES: dict[str, str] = {}


class VerifierError(Exception):
    """A verifier could not judge a response: an infrastructure or data failure, not a wrong
    answer. `kind` names the cause in the batch metrics."""

    kind = "exception"


class BadRecordError(VerifierError, ValueError):
    """The record (or its verifier spec) is malformed: a missing key, a value of the wrong type."""

    kind = "bad_record"


class UnsupportedError(VerifierError, ValueError):
    """The record asks for something the verifier does not implement (an instruction id, a JSON
    Schema keyword)."""

    kind = "unsupported"


class SandboxError(VerifierError, RuntimeError):
    """The code sandbox could not run the program (bwrap missing or unable to start)."""

    kind = "sandbox_error"


def register(name: str, fn: RewardFn | None = None, *, aliases: tuple[str, ...] = ()):
    """Register `fn` under `name` (and `aliases`); usable as a decorator `@register("math")`."""

    def deco(f: RewardFn) -> RewardFn:
        _REGISTRY[name] = f
        for a in aliases:
            _ALIASES[a] = name
        return f

    return deco(fn) if fn is not None else deco


def has_verifier(domain_or_name: str) -> bool:
    """Whether a verifier is registered under this verifier type or domain name (or alias)."""
    return _ALIASES.get(domain_or_name, domain_or_name) in _REGISTRY


def get_verifier(domain_or_name: str) -> RewardFn:
    """The reward function registered under a verifier type or domain name (or an alias)."""
    key = _ALIASES.get(domain_or_name, domain_or_name)
    if key not in _REGISTRY:
        known = sorted(set(_REGISTRY) | set(_ALIASES))
        raise KeyError(f"no verifier named {domain_or_name!r}; known: {known}")
    return _REGISTRY[key]


def verifier_name(record: dict) -> str:
    """`record["verifier"]["type"]`, else `record["domain"]`; ValueError naming the missing key."""
    if not isinstance(record, dict):
        raise TypeError(f"record must be a dict, got {type(record).__name__}")
    spec = record.get("verifier")
    if isinstance(spec, dict) and spec.get("type"):
        return str(spec["type"])
    if record.get("domain"):
        return str(record["domain"])
    raise ValueError("record has neither verifier.type nor domain")


def verifier_spec(record: dict, *required: str) -> dict:
    """`record["verifier"]`, checked to hold the `required` keys (BadRecordError, a ValueError,
    names the key)."""
    spec = record.get("verifier")
    if not isinstance(spec, dict):
        raise BadRecordError(f"record['verifier'] must be a dict, got {type(spec).__name__}")
    for key in required:
        if key not in spec:
            raise BadRecordError(
                f"record['verifier'] lacks key {key!r} (type {spec.get('type')!r})"
            )
    return spec


def final_answer(response: str, *, thinking: bool = False) -> str:
    """The text after the last `</think>`; "" if the reasoning is never closed (it was opened by
    `<think>` in the response, or by the prompt when `thinking`); else the whole response."""
    if "</think>" in response:
        return response.rsplit("</think>", 1)[1]
    if thinking or "<think>" in response:
        return ""
    return response


def score_one(
    record: dict, response: str, finished: bool, *, thinking: bool = False
) -> tuple[float, dict]:
    """Score one response with the shared rules (truncation -> 0, unclosed thinking -> 0,
    clamping) and its verifier. Raises what the verifier raises (see `VerifierError`)."""
    name = verifier_name(record)
    if not finished:
        return 0.0, {"verifier": name, "truncated": True}
    if thinking and "</think>" not in response:
        return 0.0, {"verifier": name, "truncated": False, "no_final_answer": True}
    score, details = get_verifier(name)(record, response, finished)
    score = min(1.0, max(0.0, float(score)))
    return score, {"verifier": name, "truncated": False, **details}
