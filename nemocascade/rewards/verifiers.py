"""The built-in reward functions, registered by verifier type (see `nemocascade.rewards` for the
record schema). Each judges `final_answer(response)` and returns (score, details)."""

from __future__ import annotations

import re

from nemocascade.rewards import code as code_lib
from nemocascade.rewards import instruction as if_lib
from nemocascade.rewards import math as math_lib
from nemocascade.rewards.registry import final_answer, register, verifier_spec

_FENCE = re.compile(r"```[ \t]*([A-Za-z0-9_+-]*)[^\n]*\n(.*?)```", re.DOTALL)


def extract_code(text: str) -> str | None:
    """The last fenced code block tagged python/py/python3 or untagged; None if there is none."""
    blocks = [
        body
        for lang, body in _FENCE.findall(text)
        if lang.lower() in ("", "python", "py", "python3")
    ]
    return blocks[-1] if blocks else None


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


@register("code")
def code_reward(record: dict, response: str, finished: bool) -> tuple[float, dict]:
    """1 if the last code block passes `verifier.tests` (asserts or check(candidate)), else 0."""
    spec = verifier_spec(record, "tests")
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
    return float(res.passed), {"status": res.status, "detail": res.detail[:300]}


@register("code_io", aliases=("code_stdio",))
def code_io_reward(record: dict, response: str, finished: bool) -> tuple[float, dict]:
    """1 if the last code block passes every stdin/stdout case in `verifier.cases`, else 0."""
    spec = verifier_spec(record, "cases")
    program = extract_code(final_answer(response))
    if program is None:
        return 0.0, {"status": "failed", "detail": "no code block"}
    res = code_lib.run_io_tests(
        program, spec["cases"], time_limit_s=float(spec.get("time_limit_s", 2.0))
    )
    return float(res.passed), {
        "status": res.status,
        "detail": res.detail[:300],
        "cases_passed": res.cases_passed,
    }


@register("instruction", aliases=("if", "ifeval", "instruction_following"))
def instruction_reward(record: dict, response: str, finished: bool) -> tuple[float, dict]:
    """All constraints met -> 1 (or, with `verifier.partial=True`, the fraction met).

    Unsupported instruction ids (verdict None) make the record unscorable: ValueError.
    """
    spec = verifier_spec(record, "instruction_id_list", "kwargs")
    ids = list(spec["instruction_id_list"])
    verdicts = if_lib.verify(final_answer(response), ids, list(spec["kwargs"]))
    unsupported = [i for i, v in zip(ids, verdicts, strict=True) if v is None]
    if unsupported:
        raise ValueError(f"unsupported instruction ids {unsupported}")
    if not verdicts:
        raise ValueError("record['verifier']['instruction_id_list'] is empty")
    frac = sum(verdicts) / len(verdicts)
    score = frac if spec.get("partial", False) else float(all(verdicts))
    return score, {"verdicts": verdicts}
