"""The built-in reward functions, registered by verifier type (see `nemocascade.rewards` for the
record schema). Each judges `final_answer(response)` and returns (score, details); a record it
cannot judge raises a `VerifierError` (see `registry.py`), never a silent 0."""

from __future__ import annotations

import ast
import re

from nemocascade.rewards import code as code_lib
from nemocascade.rewards import instruction as if_lib
from nemocascade.rewards import math as math_lib
from nemocascade.rewards import structured
from nemocascade.rewards.registry import (
    BadRecordError,
    SandboxError,
    UnsupportedError,
    final_answer,
    register,
    verifier_spec,
)

_LANG = re.compile(r"[ \t]*([A-Za-z0-9_+-]*)")


def extract_code(text: str) -> str | None:
    """The last fenced code block tagged python/py/python3 or untagged; None if there is none.

    A block opens with ``` (an info string up to the end of that line) and ends at the next ```.
    One left-to-right pass: linear in the length of `text`."""
    last, pos = None, 0
    while True:
        start = text.find("```", pos)
        newline = -1 if start < 0 else text.find("\n", start + 3)
        end = -1 if newline < 0 else text.find("```", newline + 1)
        if end < 0:
            return last
        lang = _LANG.match(text, start + 3, newline).group(1).lower()
        if lang in ("", "python", "py", "python3"):
            last = text[newline + 1 : end]
        pos = end + 3


def _reference(answer) -> str:
    """A reference answer; a GSM8K-style solution ("... #### 72") is reduced to what follows
    ####."""
    ref = str(answer)
    return ref.rsplit("####", 1)[1].strip() if "####" in ref else ref.strip()


@register("math", aliases=("math_rl",))
def math_reward(record: dict, response: str, finished: bool) -> tuple[float, dict]:
    """1 if the extracted final answer equals `verifier.answer`, else 0."""
    spec = verifier_spec(record, "answer")
    styles = tuple(spec.get("styles", math_lib.STYLES))
    pred = math_lib.extract_answer(final_answer(response), styles=styles)
    ok = pred is not None and math_lib.is_equivalent(pred, _reference(spec["answer"]))
    return float(ok), {"pred": None if pred is None else pred[:200]}


@register("mcqa", aliases=("stem_mcqa",))
def mcqa_reward(record: dict, response: str, finished: bool) -> tuple[float, dict]:
    """1 if the chosen option letter equals `verifier.answer`, else 0."""
    spec = verifier_spec(record, "answer")
    pred = math_lib.extract_choice(final_answer(response))
    return float(math_lib.choice_equivalent(pred, str(spec["answer"]))), {"pred": pred}


def _code_verdict(res: code_lib.CodeResult) -> tuple[float, dict]:
    """(score, details) of a sandboxed run; a sandbox that did not run is a SandboxError."""
    if res.status == "sandbox_error":
        raise SandboxError(res.detail[:300])
    details = {"status": res.status, "detail": res.detail[:300]}
    return float(res.passed), details


@register("code")
def code_reward(record: dict, response: str, finished: bool) -> tuple[float, dict]:
    """1 if the last code block passes `verifier.tests` (asserts or check(candidate)), else 0."""
    spec = verifier_spec(record, "tests")
    if not isinstance(spec["tests"], str):
        raise BadRecordError(f"verifier.tests must be a str, got {type(spec['tests']).__name__}")
    try:
        ast.parse(spec["tests"], "tests.py")
    except (SyntaxError, ValueError) as e:  # the record's tests, not the response, are broken
        raise BadRecordError(f"verifier.tests do not compile: {e}") from None
    program = extract_code(final_answer(response))
    if program is None:
        return 0.0, {"status": "failed", "detail": "no code block"}
    res = code_lib.run_tests(
        program,
        spec["tests"],
        timeout_s=float(spec.get("timeout_s", 10.0)),
        entry_point=spec.get("entry_point"),
        strict_compare=bool(spec.get("strict_compare", True)),
    )
    return _code_verdict(res)


@register("code_io", aliases=("code_stdio",))
def code_io_reward(record: dict, response: str, finished: bool) -> tuple[float, dict]:
    """1 if the last code block passes every stdin/stdout case in `verifier.cases`, else 0."""
    spec = verifier_spec(record, "cases")
    cases = spec["cases"]
    if not isinstance(cases, list) or not cases:
        raise BadRecordError("verifier.cases must be a non-empty list")
    for i, case in enumerate(cases):
        if not (
            isinstance(case, dict)
            and isinstance(case.get("input"), str)
            and isinstance(case.get("output"), str)
        ):
            raise BadRecordError(f"verifier.cases[{i}] needs str 'input' and 'output'")
    program = extract_code(final_answer(response))
    if program is None:
        return 0.0, {"status": "failed", "detail": "no code block"}
    res = code_lib.run_io_tests(program, cases, time_limit_s=float(spec.get("time_limit_s", 2.0)))
    score, details = _code_verdict(res)
    return score, {**details, "cases_passed": res.cases_passed}


@register("instruction", aliases=("if", "ifeval", "instruction_following"))
def instruction_reward(record: dict, response: str, finished: bool) -> tuple[float, dict]:
    """All constraints met -> 1 (or, with `verifier.partial=True`, the fraction met).

    Unsupported instruction ids (verdict None) make the record unscorable (UnsupportedError);
    malformed ids or kwargs raise BadRecordError naming the instruction.
    """
    spec = verifier_spec(record, "instruction_id_list", "kwargs")
    ids = spec["instruction_id_list"]
    try:
        verdicts = if_lib.verify(final_answer(response), ids, spec["kwargs"])
    except ValueError as e:
        raise BadRecordError(str(e)) from None
    unsupported = [i for i, v in zip(ids, verdicts, strict=True) if v is None]
    if unsupported:
        raise UnsupportedError(f"unsupported instruction ids {unsupported}")
    if not verdicts:
        raise BadRecordError("record['verifier']['instruction_id_list'] is empty")
    frac = sum(verdicts) / len(verdicts)
    score = frac if spec.get("partial", False) else float(all(verdicts))
    return score, {"verdicts": verdicts}


@register("structured_output", aliases=("json_schema",))
def structured_output_reward(record: dict, response: str, finished: bool) -> tuple[float, dict]:
    """1 if the final answer is JSON (bare or in one ```json fence) that satisfies
    `verifier.schema` (the JSON Schema subset of `structured.py`), else 0."""
    spec = verifier_spec(record, "schema")
    structured.check_schema(spec["schema"])
    try:
        value = structured.parse_json_answer(final_answer(response))
    except ValueError as e:
        return 0.0, {"valid": False, "reason": str(e)[:200]}
    err = structured.validate(value, spec["schema"])
    return float(err is None), {"valid": err is None, "reason": (err or "")[:200]}


@register("tool_call", aliases=("function_call",))
def tool_call_reward(record: dict, response: str, finished: bool) -> tuple[float, dict]:
    """1 if the reply's tool calls, parsed against the record's declared `tools`, are exactly
    `verifier.calls` (same order, names and arguments) with no malformed call, else 0."""
    from nemocascade.data.tools import ToolCall, parse_tool_calls  # lazy: workers stay light

    spec = verifier_spec(record, "calls")
    tools = record.get("tools")
    if not isinstance(tools, list) or not tools:
        raise BadRecordError("a tool_call record needs its declared `tools` (a non-empty list)")
    try:
        want = [ToolCall.from_mapping(c) for c in spec["calls"]]
        calls, errors = parse_tool_calls(final_answer(response), tools)
    except (TypeError, ValueError) as e:
        raise BadRecordError(f"tool_call record: {e}") from e
    got = [(c.name, dict(c.arguments)) for c in calls]
    ok = not errors and got == [(c.name, dict(c.arguments)) for c in want]
    return float(ok), {"calls": [c.name for c in calls], "errors": [e.kind for e in errors][:8]}
