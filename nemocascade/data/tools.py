"""Tool calls in the Nemotron-3 chat format: declarations, calls, responses, and a parser.

Wire format (`shared/reference/nemotron3_tool_calls.md`). An assistant turn calls tools with one
block per call, after any `<think>...</think>` and optional prose::

    <tool_call>
    <function=NAME>
    <parameter=KEY>
    VALUE
    </parameter>
    </function>
    </tool_call>

A string VALUE is written as it is (it may span lines); any other value as JSON
(`true`, `3`, `[1, 2]`, `{"a": 1}`). Several blocks are joined by `\\n`; prose
before them is separated by a blank line. Results come back in a `user` turn,
one `<tool_response>\\n{result}\\n</tool_response>\\n` block per call, in order
(`render_tool_responses`).

Declarations go in the system turn, after the system text (a blank line
between): `# Tools`, a `<tools>` list with one `<function>` entry per tool
(name, description, its parameters with name/type/description and any extra
schema keys, the `required` list as JSON), then an instruction describing the
call format. The entry layout follows the Qwen3-Coder-style templates that
emit these blocks; the instruction's wording is ours: check both against the
released `tokenizer_config.json` template before serving the released
checkpoint (the released template wins).

Parsing (`parse_tool_calls`) never raises on model output: it returns the
well-formed calls, with arguments converted to their declared types, and one
`ToolCallError` per problem, whose `message` is short enough to send back to
the model as the tool's response. Like parsers in the wild it accepts
`<toolcall>` for `<tool_call>` and missing newlines around tags and values.
"""

from __future__ import annotations

import dataclasses
import json
import math
import re
from collections.abc import Mapping, Sequence
from typing import Any

from nemocascade.data.tokenizer import THINK, THINK_END, TOOL_CALL, TOOL_CALL_END

# JSON-schema types a parameter may declare.
JSON_TYPES = ("string", "integer", "number", "boolean", "object", "array")
TOOL_RESPONSE, TOOL_RESPONSE_END = "<tool_response>", "</tool_response>"

_CALL_INSTRUCTION = f"""\
To call a function, reply with one block per call in exactly this format, after any reasoning:

{TOOL_CALL}
<function=example_function_name>
<parameter=example_parameter_1>
value_1
</parameter>
<parameter=example_parameter_2>
a value may
span several lines
</parameter>
</function>
{TOOL_CALL_END}

- Every <function=...></function> block sits inside its own {TOOL_CALL}{TOOL_CALL_END} block.
- Give every required parameter; write objects and arrays as JSON.
- Write nothing after the last call.
- If no function fits, answer normally and do not mention the functions."""


# ------------------------------------------------------------------ declarations
@dataclasses.dataclass(frozen=True)
class ToolSpec:
    """A tool the model may call.

    `parameters` maps each parameter name to its JSON schema: `type` (one of
    `JSON_TYPES`), `description` and any extra keys (e.g. `enum`), kept in order.
    """

    name: str
    description: str = ""
    parameters: Mapping[str, Mapping[str, Any]] = dataclasses.field(default_factory=dict)
    required: tuple[str, ...] = ()

    def __post_init__(self):
        if not isinstance(self.name, str) or not self.name.strip():
            raise ValueError(f"tool name: expected a non-empty string, got {self.name!r}")
        if not isinstance(self.description, str):
            raise ValueError(f"tool {self.name!r}: description must be a string")
        if not isinstance(self.parameters, Mapping):
            raise ValueError(f"tool {self.name!r}: parameters must be a mapping")
        for key, schema in self.parameters.items():
            kind = schema.get("type") if isinstance(schema, Mapping) else None
            if kind not in JSON_TYPES:
                raise ValueError(
                    f"tool {self.name!r}, parameter {key!r}: type must be one of "
                    f"{list(JSON_TYPES)}, got {kind!r}"
                )
        object.__setattr__(self, "required", tuple(self.required))
        unknown = [r for r in self.required if r not in self.parameters]
        if unknown:
            raise ValueError(f"tool {self.name!r}: required names unknown parameters {unknown}")

    @classmethod
    def from_mapping(cls, tool: Any) -> ToolSpec:
        """A `ToolSpec` from our form or the OpenAI / Hugging Face one.

        Ours: `{"name", "description", "parameters": {name: schema}, "required": [...]}`.
        OpenAI: `{"type": "function", "function": {"name", "description", "parameters":
        {"type": "object", "properties": {name: schema}, "required": [...]}}}`
        (the inner `function` object alone is accepted too). Raises `ValueError`.
        """
        if isinstance(tool, ToolSpec):
            return tool
        if not isinstance(tool, Mapping):
            raise ValueError(f"expected a tool object, got {type(tool).__name__}")
        if isinstance(tool.get("function"), Mapping):
            tool = tool["function"]
        params = tool.get("parameters") or {}
        required = tool.get("required", ())
        if isinstance(params, Mapping) and params.get("type") == "object":
            required = params.get("required", ())
            params = params.get("properties") or {}
        if not isinstance(required, list | tuple) or not all(isinstance(r, str) for r in required):
            raise ValueError(f"tool {tool.get('name')!r}: required must be a list of names")
        return cls(
            name=tool.get("name"),
            description=tool.get("description") or "",
            parameters=params,
            required=tuple(required),
        )


def _schema_line(key: str, value: Any) -> str:
    text = value if isinstance(value, str) else json.dumps(value, ensure_ascii=False)
    return f"\n<{key}>{text}</{key}>"


def render_tool_declarations(tools: Sequence[ToolSpec | Mapping]) -> str:
    """The system turn's tool section: `# Tools`, the `<tools>` list and the call instruction."""
    out = "# Tools\n\nYou have access to the following functions:\n\n<tools>"
    for tool in map(ToolSpec.from_mapping, tools):
        out += f"\n<function>\n<name>{tool.name}</name>"
        if tool.description.strip():
            out += f"\n<description>{tool.description.strip()}</description>"
        out += "\n<parameters>"
        for key, schema in tool.parameters.items():
            out += f"\n<parameter>\n<name>{key}</name>"
            for field, value in schema.items():
                out += _schema_line(field, value.strip() if isinstance(value, str) else value)
            out += "\n</parameter>"
        if tool.required:
            out += _schema_line("required", list(tool.required))
        out += "\n</parameters>\n</function>"
    return out + "\n</tools>\n\n" + _CALL_INSTRUCTION


def render_system(system: str, tools: Sequence[ToolSpec | Mapping] | None) -> str:
    """System turn text: `system`, then the tool declarations (a blank line between)."""
    if not tools:
        return system
    declarations = render_tool_declarations(tools)
    return f"{system}\n\n{declarations}" if system else declarations


# ------------------------------------------------------------------ calls and responses
@dataclasses.dataclass(frozen=True)
class ToolCall:
    """One call: the tool's name and its arguments; `index` is the call's place in its turn."""

    name: str
    arguments: Mapping[str, Any]
    index: int = 0

    @classmethod
    def from_mapping(cls, call: Any) -> ToolCall:
        """A `ToolCall` from `{"name", "arguments"}` or OpenAI's `{"function": {...}}`.

        `arguments` may be an object or a JSON string of one. Raises `ValueError`.
        """
        if isinstance(call, ToolCall):
            return call
        if not isinstance(call, Mapping):
            raise ValueError(f"expected a tool call object, got {type(call).__name__}")
        if isinstance(call.get("function"), Mapping):
            call = call["function"]
        name, arguments = call.get("name"), call.get("arguments", {})
        if not isinstance(name, str) or not name.strip():
            raise ValueError(f"name: expected a non-empty string, got {name!r}")
        if isinstance(arguments, str):
            try:
                arguments = json.loads(arguments)
            except json.JSONDecodeError as e:
                raise ValueError(f"arguments: invalid JSON ({e.msg})") from None
        if not isinstance(arguments, Mapping):
            raise ValueError(f"arguments: expected an object, got {type(arguments).__name__}")
        return cls(name=name, arguments=dict(arguments))


def _value_text(value: Any) -> str:
    return value if isinstance(value, str) else json.dumps(value, ensure_ascii=False)


def render_tool_calls(calls: Sequence[ToolCall | Mapping]) -> str:
    """The `<tool_call>` blocks of an assistant turn, joined by newlines."""
    blocks = []
    for call in map(ToolCall.from_mapping, calls):
        params = "".join(
            f"<parameter={key}>\n{_value_text(value)}\n</parameter>\n"
            for key, value in call.arguments.items()
        )
        blocks.append(f"{TOOL_CALL}\n<function={call.name}>\n{params}</function>\n{TOOL_CALL_END}")
    return "\n".join(blocks)


def render_tool_responses(results: Sequence[Any]) -> str:
    """One `<tool_response>` block per result, in order (non-strings written as JSON)."""
    return "".join(f"{TOOL_RESPONSE}\n{_value_text(r)}\n{TOOL_RESPONSE_END}\n" for r in results)


# ------------------------------------------------------------------ parsing
@dataclasses.dataclass(frozen=True)
class ToolCallError:
    """A malformed call. `index`: its place among the turn's `<tool_call>` blocks.

    `kind` is one of `unclosed_tag`, `malformed`, `unknown_tool`,
    `missing_parameter`, `unknown_parameter`, `duplicate_parameter`, `bad_value`;
    `message` is meant for the model (sent back as the call's tool response).
    """

    kind: str
    message: str
    index: int
    name: str | None = None
    parameter: str | None = None


_OPEN = re.compile(r"<tool_?call>")
_CLOSE = re.compile(r"</tool_?call>")
_FUNCTION = re.compile(r"\s*<function=([^>\n]*)>")
_FUNCTION_END = "</function>"
_PARAMETER = re.compile(r"<parameter=([^>\n]*)>")
_PARAMETER_END = "</parameter>"


def _strip_one_newline(value: str) -> str:
    value = value[1:] if value.startswith("\n") else value
    return value[:-1] if value.endswith("\n") else value


def _convert(value: str, kind: str) -> Any:
    """`value` as its declared JSON type; `ValueError` if it is not one."""
    if kind == "string":
        return value
    text = value.strip()
    if kind == "boolean":
        if text.lower() not in ("true", "false"):
            raise ValueError
        return text.lower() == "true"
    parsed = json.loads(text)  # JSONDecodeError is a ValueError
    if kind == "integer" and isinstance(parsed, float) and parsed.is_integer():
        parsed = int(parsed)  # 3.0 is an integer in JSON schema
    expected = {"integer": int, "number": (int, float), "object": dict, "array": list}[kind]
    if isinstance(parsed, bool) or not isinstance(parsed, expected):
        raise ValueError
    if kind == "number" and not math.isfinite(parsed):
        raise ValueError
    return parsed


def _raw_parameters(inner: str, index: int, name: str) -> tuple[dict[str, str], list]:
    """({key: raw value}, structural errors) of the text inside `<function=name>`."""
    raw, errors, pos = {}, [], 0
    while True:
        while pos < len(inner) and inner[pos].isspace():
            pos += 1
        if pos == len(inner):
            return raw, errors
        m = _PARAMETER.match(inner, pos)
        if m is None:
            snippet = inner[pos : pos + 30]
            message = f"unexpected text {snippet!r} in <function={name}>; expected <parameter=...>"
            return raw, [ToolCallError("malformed", message, index, name)]
        key = m.group(1).strip()
        end = inner.find(_PARAMETER_END, m.end())
        if end < 0:
            message = f"<parameter={key}> of {name} is not closed by {_PARAMETER_END}"
            return raw, [ToolCallError("unclosed_tag", message, index, name, key)]
        if key in raw:
            message = f"parameter {key!r} of {name} is given more than once"
            errors.append(ToolCallError("duplicate_parameter", message, index, name, key))
        raw[key] = _strip_one_newline(inner[m.end() : end])
        pos = end + len(_PARAMETER_END)


def _parse_block(body: str, index: int, tools: Mapping[str, ToolSpec]) -> ToolCall | list:
    """A `ToolCall` from the text between `<tool_call>` and `</tool_call>`, or its errors."""
    m = _FUNCTION.match(body)
    if m is None:
        message = f"expected <function=NAME> right after {TOOL_CALL}"
        return [ToolCallError("malformed", message, index)]
    name = m.group(1).strip()
    end = body.rfind(_FUNCTION_END)
    if end < m.end():
        message = f"<function={name}> is not closed by {_FUNCTION_END}"
        return [ToolCallError("unclosed_tag", message, index, name)]
    if body[end + len(_FUNCTION_END) :].strip():
        message = f"unexpected text after {_FUNCTION_END} in the call of {name}"
        return [ToolCallError("malformed", message, index, name)]
    raw, errors = _raw_parameters(body[m.end() : end], index, name)
    if errors and errors[-1].kind in ("malformed", "unclosed_tag"):
        return errors
    spec = tools.get(name)
    if spec is None:
        message = f"unknown tool {name!r}; available: {', '.join(tools) or 'none'}"
        return [*errors, ToolCallError("unknown_tool", message, index, name)]
    arguments = {}
    for key, value in raw.items():
        schema = spec.parameters.get(key)
        if schema is None:
            known = ", ".join(spec.parameters) or "none"
            message = f"unknown parameter {key!r} of {name}; its parameters: {known}"
            errors.append(ToolCallError("unknown_parameter", message, index, name, key))
            continue
        try:
            arguments[key] = _convert(value, schema["type"])
        except (ValueError, RecursionError):  # RecursionError: absurdly deep JSON
            message = f"parameter {key!r} of {name}: expected {schema['type']}, got {value[:40]!r}"
            errors.append(ToolCallError("bad_value", message, index, name, key))
    for key in spec.required:
        if key not in raw:
            message = f"missing required parameter {key!r} of {name}"
            errors.append(ToolCallError("missing_parameter", message, index, name, key))
    return errors or ToolCall(name=name, arguments=arguments, index=index)


def parse_tool_calls(
    text: str, tools: Sequence[ToolSpec | Mapping], *, thinking: bool = False
) -> tuple[list[ToolCall], list[ToolCallError]]:
    """(well-formed calls, errors) of an assistant reply, both in order of appearance.

    Only the text after the reasoning counts: after the first `</think>`, or
    nothing if reasoning is never closed (a `<think>` without `</think>`, or
    none at all with `thinking=True`: the prompt opened `<think>`). Each
    `<tool_call>` block yields a `ToolCall` (arguments converted to their
    declared types: strings as they are, less exactly one leading and one
    trailing newline) or its errors. Never raises on model output (`tools`
    must be valid declarations).
    """
    specs = {spec.name: spec for spec in map(ToolSpec.from_mapping, tools)}
    if THINK_END in text:
        text = text.split(THINK_END, 1)[1]
    elif thinking or THINK in text:
        return [], []
    opens = list(_OPEN.finditer(text))
    calls, errors = [], []
    close = _CLOSE.search(text)  # the first closing tag after the current opening one
    for index, m in enumerate(opens):
        if close is not None and close.start() < m.end():
            close = _CLOSE.search(text, m.end())
        following = opens[index + 1] if index + 1 < len(opens) else None
        if close is None or (following is not None and following.start() < close.start()):
            message = f"{TOOL_CALL} is not closed by {TOOL_CALL_END}"
            errors.append(ToolCallError("unclosed_tag", message, index))
            continue
        parsed = _parse_block(text[m.end() : close.start()], index, specs)
        if isinstance(parsed, ToolCall):
            calls.append(parsed)
        else:
            errors.extend(parsed)
    return calls, errors
