"""The structured-output verifier: JSON answers checked against a JSON Schema subset."""

import pytest

from nemocascade.rewards import BadRecordError, UnsupportedError, grade_batch, score_one
from nemocascade.rewards.structured import json_equal, parse_json_answer, validate

SCHEMA = {
    "type": "object",
    "properties": {
        "name": {"type": "string"},
        "age": {"type": "integer", "minimum": 0, "maximum": 150},
        "tags": {"type": "array", "items": {"type": "string"}, "minItems": 1, "maxItems": 3},
        "role": {"enum": ["admin", "user"]},
        "address": {
            "type": "object",
            "properties": {"city": {"type": "string"}},
            "required": ["city"],
            "additionalProperties": False,
        },
        "score": {"type": ["number", "null"]},
    },
    "required": ["name", "age"],
    "additionalProperties": False,
    "title": "person",
}
REC = {"domain": "structured_output", "verifier": {"type": "structured_output", "schema": SCHEMA}}
VALID = (
    '{"name": "Ada", "age": 36, "tags": ["math"], "role": "admin", "address": {"city": "London"}}'
)


def test_valid_answers_bare_fenced_and_after_thinking():
    assert score_one(REC, VALID, True) == (
        1.0,
        {"verifier": "structured_output", "truncated": False, "valid": True, "reason": ""},
    )
    assert score_one(REC, f"```json\n{VALID}\n```", True)[0] == 1.0
    assert score_one(REC, f"  ```\n{VALID}```\n", True)[0] == 1.0
    assert (
        score_one(REC, f"plan the fields</think>\n```json\n{VALID}\n```", True, thinking=True)[0]
        == 1.0
    )
    alias = {"verifier": {"type": "json_schema", "schema": SCHEMA}}
    assert score_one(alias, '{"name": "A", "age": 2.0, "score": null}', True)[0] == 1.0


@pytest.mark.parametrize(
    "answer,reason",
    [
        ('{"name": "Ada"}', "missing required property 'age'"),
        ('{"name": "Ada", "age": "36"}', "$.age: expected integer, got string"),
        ('{"name": "Ada", "age": 36.5}', "$.age: expected integer"),
        ('{"name": "Ada", "age": true}', "$.age: expected integer, got boolean"),
        ('{"name": "Ada", "age": -1}', "$.age: below the minimum 0"),
        ('{"name": "Ada", "age": 200}', "$.age: above the maximum 150"),
        ('{"name": "Ada", "age": 3, "tags": []}', "$.tags: fewer than 1 items"),
        ('{"name": "A", "age": 3, "tags": ["a", "b", "c", "d"]}', "$.tags: more than 3 items"),
        ('{"name": "Ada", "age": 3, "tags": [1]}', "$.tags[0]: expected string"),
        ('{"name": "Ada", "age": 3, "role": "root"}', "$.role: not one of the enum values"),
        ('{"name": "Ada", "age": 3, "nick": "A"}', "$.nick: not allowed here"),
        ('{"name": "A", "age": 3, "address": {}}', "$.address: missing required property 'city'"),
        ('{"name": "A", "age": 3, "address": {"city": "X", "zip": 1}}', "$.address.zip"),
        ('{"name": "Ada", "age": 3, "score": "high"}', "expected number or null"),
        ('["name", "age"]', "$: expected object, got array"),
    ],
)
def test_invalid_answers_score_zero_with_the_reason(answer, reason):
    score, details = score_one(REC, answer, True)
    assert score == 0.0 and not details["valid"] and reason in details["reason"], details


@pytest.mark.parametrize(
    "answer",
    [
        "",
        "name: Ada",
        '{"name": "Ada", "age": 36',
        f"Here is the JSON: {VALID}",  # prose around it: not JSON only
        f"```json\n{VALID}\n```\nHope this helps!",
        f"```json\n{VALID}\n```\n```json\n{VALID}\n```",
        f"```python\n{VALID}\n```",
        '{"name": "Ada", "age": NaN}',
        "[" * 100_000,  # deeper than the parser's recursion limit
    ],
)
def test_unparseable_answers_score_zero(answer):
    score, details = score_one(REC, answer, True)
    assert score == 0.0 and not details["valid"] and details["reason"], details


def test_parse_and_json_equality():
    assert parse_json_answer(" ```JSON\n[1, 2]\n``` ") == [1, 2]
    with pytest.raises(ValueError, match="Infinity is not JSON"):
        parse_json_answer("Infinity")
    assert json_equal(1, 1.0) and not json_equal(True, 1) and not json_equal(0, False)
    assert json_equal({"a": [1, {"b": None}]}, {"a": [1.0, {"b": None}]})
    assert validate(True, {"enum": [1]}) is not None and validate(1.0, {"enum": [1]}) is None
    assert validate(5, {"const": 5}) is None and validate(6, {"const": 5}) is not None
    assert validate({"x": 1}, {"additionalProperties": {"type": "string"}}) is not None


def test_schemas_outside_the_subset_are_errors_not_verdicts():
    pattern = {
        "verifier": {"type": "structured_output", "schema": {"type": "string", "pattern": "a"}}
    }
    with pytest.raises(UnsupportedError, match="pattern"):
        score_one(pattern, '"a"', True)
    nested = {"properties": {"a": {"anyOf": [{"type": "string"}]}}}
    bad_type = {"type": "str"}
    recs = [{"verifier": {"type": "structured_output", "schema": s}} for s in (nested, bad_type)]
    with pytest.raises(BadRecordError, match="type must be one of"):
        score_one(recs[1], '"a"', True)
    recs.append({"verifier": {"type": "structured_output"}})  # no schema
    res = grade_batch(recs, ["not json"] * 3, num_workers=0)  # judged whatever the answer
    assert res.errors == [True, True, True]
    assert res.error_kinds == ["unsupported", "bad_record", "bad_record"]
