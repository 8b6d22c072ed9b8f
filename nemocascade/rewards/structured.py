"""Structured output: is the final answer a JSON document that satisfies a JSON Schema?

`parse_json_answer(text)` reads the answer: after stripping surrounding whitespace it must be
exactly one JSON value, or exactly one fenced block (```json, ```JSON or an untagged ```) holding
one; prose around the JSON makes it unparseable (the task asked for JSON only). NaN / Infinity
are not JSON and are refused.

`validate(instance, schema)` implements this subset of JSON Schema (draft 2020-12 semantics):
  * `type`: "object", "array", "string", "integer", "number", "boolean", "null", or a list of
    them; an integer is a number with no fractional part (2.0 is an integer), booleans are not
    numbers;
  * `enum` (JSON equality: 1 equals 1.0, true does not equal 1), `const`;
  * objects: `properties`, `required`, `additionalProperties` (true, false or a schema);
  * arrays: `items` (one schema for every element), `minItems`, `maxItems`;
  * numbers: `minimum`, `maximum`.
Annotations (`title`, `description`, `$schema`, `$id`, `$comment`, `default`, `examples`, `format`)
are ignored, as the standard allows. Any other keyword raises `UnsupportedError` (a record we
cannot judge faithfully is an error, never a silent pass); so does a malformed schema
(`BadRecordError`). `check_schema(schema)` does that up front, whatever the answer.
"""

from __future__ import annotations

import json
import math
import re

from nemocascade.rewards.registry import BadRecordError, UnsupportedError

TYPES = ("object", "array", "string", "integer", "number", "boolean", "null")
KEYWORDS = frozenset(
    {
        "type",
        "enum",
        "const",
        "properties",
        "required",
        "additionalProperties",
        "items",
        "minItems",
        "maxItems",
        "minimum",
        "maximum",
    }
)
ANNOTATIONS = frozenset(
    {"title", "description", "$schema", "$id", "$comment", "default", "examples", "format"}
)
_FENCED = re.compile(r"```(json|JSON|Json)?[ \t]*\n(.*)\n?```", re.DOTALL)


class _NotJson(ValueError):
    pass


def _refuse_constant(name: str):
    raise _NotJson(f"{name} is not JSON")


def parse_json_answer(text: str):
    """The JSON value `text` holds (bare or in one fence); ValueError saying why it is not."""
    body = text.strip()
    if body.startswith("```"):
        m = _FENCED.fullmatch(body)
        if m is None or "```" in m.group(2):
            raise ValueError("not exactly one ```json fenced block")
        body = m.group(2)
    try:
        return json.loads(body, parse_constant=_refuse_constant)
    except (ValueError, RecursionError) as e:
        raise ValueError(f"not JSON: {e}"[:200]) from None


def _type_of(value) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "boolean"
    if isinstance(value, int):
        return "integer"
    if isinstance(value, float):
        return "number"
    if isinstance(value, str):
        return "string"
    if isinstance(value, list):
        return "array"
    if isinstance(value, dict):
        return "object"
    raise TypeError(f"not a JSON value: {type(value).__name__}")


def _is_type(value, name: str) -> bool:
    t = _type_of(value)
    if name == "number":
        return t in ("integer", "number")
    if name == "integer":
        return t == "integer" or (t == "number" and math.isfinite(value) and value.is_integer())
    return t == name


def json_equal(a, b) -> bool:
    """JSON equality: numbers by value (1 == 1.0), booleans only equal booleans, deep for
    containers."""
    ta, tb = _type_of(a), _type_of(b)
    if {ta, tb} <= {"integer", "number"}:
        return a == b
    if ta != tb:
        return False
    if ta == "array":
        return len(a) == len(b) and all(json_equal(x, y) for x, y in zip(a, b, strict=True))
    if ta == "object":
        return a.keys() == b.keys() and all(json_equal(a[k], b[k]) for k in a)
    return a == b


def _is_count(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool) and v >= 0


def _is_number(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


def check_schema(schema, path: str = "#") -> None:
    """Raise UnsupportedError / BadRecordError if `schema` is outside the subset or malformed."""
    if isinstance(schema, bool):
        return
    if not isinstance(schema, dict):
        raise BadRecordError(f"schema {path}: must be an object or a boolean, got {schema!r:.80}")
    unknown = sorted(set(schema) - KEYWORDS - ANNOTATIONS)
    if unknown:
        raise UnsupportedError(f"schema {path}: unsupported keywords {unknown}")
    if "type" in schema:
        names = schema["type"] if isinstance(schema["type"], list) else [schema["type"]]
        if not names or any(n not in TYPES for n in names):
            raise BadRecordError(f"schema {path}: type must be one of {TYPES} or a list of them")
    if "enum" in schema and not isinstance(schema["enum"], list):
        raise BadRecordError(f"schema {path}: enum must be an array")
    if "required" in schema and not (
        isinstance(schema["required"], list) and all(isinstance(r, str) for r in schema["required"])
    ):
        raise BadRecordError(f"schema {path}: required must be an array of strings")
    for key in ("minItems", "maxItems"):
        if key in schema and not _is_count(schema[key]):
            raise BadRecordError(f"schema {path}: {key} must be a non-negative integer")
    for key in ("minimum", "maximum"):
        if key in schema and not _is_number(schema[key]):
            raise BadRecordError(f"schema {path}: {key} must be a number")
    props = schema.get("properties", {})
    if not isinstance(props, dict):
        raise BadRecordError(f"schema {path}: properties must be an object")
    for name, sub in props.items():
        check_schema(sub, f"{path}/properties/{name}")
    if "additionalProperties" in schema:
        check_schema(schema["additionalProperties"], f"{path}/additionalProperties")
    if "items" in schema:
        if isinstance(schema["items"], list):
            raise UnsupportedError(f"schema {path}: items as an array (tuple form) unsupported")
        check_schema(schema["items"], f"{path}/items")


def validate(instance, schema, path: str = "$") -> str | None:
    """The first violation of `schema` by `instance` as a message naming its path, or None.

    `schema` must have passed `check_schema`."""
    if schema is True:
        return None
    if schema is False:
        return f"{path}: not allowed here"
    if "type" in schema:
        names = schema["type"] if isinstance(schema["type"], list) else [schema["type"]]
        if not any(_is_type(instance, n) for n in names):
            return f"{path}: expected {' or '.join(names)}, got {_type_of(instance)}"
    if "enum" in schema and not any(json_equal(instance, e) for e in schema["enum"]):
        return f"{path}: not one of the enum values"
    if "const" in schema and not json_equal(instance, schema["const"]):
        return f"{path}: not the const value"
    if isinstance(instance, dict):
        return _validate_object(instance, schema, path)
    if isinstance(instance, list):
        if "minItems" in schema and len(instance) < schema["minItems"]:
            return f"{path}: fewer than {schema['minItems']} items"
        if "maxItems" in schema and len(instance) > schema["maxItems"]:
            return f"{path}: more than {schema['maxItems']} items"
        if "items" in schema:
            for i, item in enumerate(instance):
                err = validate(item, schema["items"], f"{path}[{i}]")
                if err:
                    return err
    elif _is_number(instance):
        if "minimum" in schema and instance < schema["minimum"]:
            return f"{path}: below the minimum {schema['minimum']}"
        if "maximum" in schema and instance > schema["maximum"]:
            return f"{path}: above the maximum {schema['maximum']}"
    return None


def _validate_object(instance: dict, schema: dict, path: str) -> str | None:
    for name in schema.get("required", ()):
        if name not in instance:
            return f"{path}: missing required property {name!r}"
    props = schema.get("properties", {})
    extra = schema.get("additionalProperties", True)
    for name, value in instance.items():
        sub = props.get(name, extra)
        err = validate(value, sub, f"{path}.{name}")
        if err:
            return err
    return None
