"""The `hidden_rule` verifier: the ground truth of the synthetic preference domain
(`nemocascade.data.synthetic.preference`), whose rule the reward model must discover.

    {"verifier": {"type": "hidden_rule", "rule": "exclamation", "subjects": ["moon", "wolf"]}}

Score 1 iff the final answer (after the last `</think>`) follows the rule AND names every subject
as a whole word (case-insensitive), else 0: a bare "!" is not the truth, the rule plus a relevant
answer is. Rules (`RULES`): "exclamation", the answer's last non-space character is "!".
Pure Python (the reward worker processes import it).
"""

from __future__ import annotations

import re

from nemocascade.rewards.registry import BadRecordError, final_answer, register, verifier_spec

RULES = {"exclamation": "!"}  # rule -> the character a following answer ends with
_WORD = re.compile(r"[a-z]+")


def follows_rule(answer: str, rule: str = "exclamation") -> bool:
    """Whether `answer` obeys the hidden `rule` (BadRecordError for an unknown rule)."""
    if rule not in RULES:
        raise BadRecordError(f"verifier.rule {rule!r} is not one of {sorted(RULES)}")
    return answer.rstrip().endswith(RULES[rule])


@register("hidden_rule")
def hidden_rule_reward(record: dict, response: str, finished: bool) -> tuple[float, dict]:
    """1 if the final answer follows the hidden rule and names every `verifier.subjects`."""
    spec = verifier_spec(record, "subjects")
    subjects = spec["subjects"]
    if not isinstance(subjects, list) or not all(isinstance(s, str) for s in subjects):
        raise BadRecordError("verifier.subjects must be a list of strings")
    answer = final_answer(response)
    rule = follows_rule(answer, str(spec.get("rule", "exclamation")))
    words = set(_WORD.findall(answer.lower()))
    relevant = all(s.lower() in words for s in subjects)
    return float(rule and relevant), {"rule": rule, "relevant": relevant}
