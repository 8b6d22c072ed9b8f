"""JSONL sources of chat records (SFT) and RL prompts, validated line by line.

Chat record (one JSON object per line)::

    {"messages": [{"role": "user", "content": "..."},
                  {"role": "assistant", "content": "...", "reasoning_content": "..."}],
     "domain": "math", ...}

RL prompt record::

    {"prompt": "..."} or {"messages": [...]},  "domain": "math",
    "verifier": {"type": "math", ...}

Rules: `messages` is a non-empty list of objects with `role` in
system/user/assistant/tool and `content` a string; `reasoning_content`
(optional) is a string and only on assistant messages; a `system` message may
only come first. A chat record needs at least one assistant message; a prompt's
messages must not end with one. `domain` is a non-empty string. A prompt has
exactly one of `prompt` (non-empty string) / `messages`, and `verifier` is an
object with a string `type`. Other keys are kept as they are.

Tool calling (see `tools.py`): a record may declare `tools` (a list of tool declarations,
ours or OpenAI's `{"type": "function", "function": {...}}`); an assistant message may carry
`tool_calls` (a list of `{"name", "arguments"}` or `{"function": {"name", "arguments"}}`,
`arguments` an object or a JSON string of one), and then its `content` may be missing or null.

A bad line raises `DataError("file.jsonl:17: field 'messages[2].role': ...")`;
a line that is not UTF-8 or not JSON raises `DataError("file.jsonl:17:42: ...")`
(42: the 1-based character column in that line, as editors show it). With
`skip_bad=True` a bad line is skipped and counted instead. Blank lines are ignored.

Size cap. A line longer than `max_record_chars` characters (default
`MAX_RECORD_CHARS`, measured on the JSON text of the line) is skipped with a
warning naming `file:line` and its size, and counted, whatever `skip_bad`
says: one pathological record (a 10 MiB line) would otherwise stall tokenizer
training and everything downstream. The default, 4,000,000 characters, is
about the model's longest context (1M tokens) at ~4 characters per token, so
no record that could be trained on is dropped.

A file with no records left (empty, only blank lines, or everything skipped)
raises `DataError("file.jsonl: no records ...")`.
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Callable, Mapping
from typing import Any

from nemocascade.data.chat import ROLES
from nemocascade.data.tools import ToolCall, ToolSpec

log = logging.getLogger(__name__)

# Longest JSONL line (in characters) a reader keeps; see the module docstring.
MAX_RECORD_CHARS = 4_000_000


class DataError(ValueError):
    """A data file is malformed; the message starts with `file:line[:column]` (or `file:`)."""


class SkipCount(int):
    """Lines a reader skipped: an int (their total) that also tells them apart.

    `bad`: malformed lines skipped under `skip_bad=True`; `too_long`: lines over
    `max_record_chars` (always skipped).
    """

    bad: int
    too_long: int

    def __new__(cls, bad: int = 0, too_long: int = 0) -> SkipCount:
        self = super().__new__(cls, bad + too_long)
        self.bad, self.too_long = bad, too_long
        return self

    def __repr__(self) -> str:
        return f"SkipCount(bad={self.bad}, too_long={self.too_long})"


class _BadLine(Exception):
    """A bad line; the message is complete (`file:line[:column]: ...`)."""


class _FieldError(Exception):
    def __init__(self, field: str, problem: str):
        super().__init__(f"field {field!r}: {problem}")


def _type_name(x: Any) -> str:
    return type(x).__name__


def _check_str(
    record: Mapping, key: str, *, field: str | None = None, nonempty: bool = False
) -> None:
    field = field or key
    if key not in record:
        raise _FieldError(field, "missing")
    value = record[key]
    if not isinstance(value, str):
        raise _FieldError(field, f"expected a string, got {_type_name(value)}")
    if nonempty and not value.strip():
        raise _FieldError(field, "expected a non-empty string")


def _check_messages(record: Mapping) -> list[Mapping]:
    if "messages" not in record:
        raise _FieldError("messages", "missing")
    messages = record["messages"]
    if not isinstance(messages, list) or not messages:
        raise _FieldError("messages", f"expected a non-empty list, got {messages!r:.60}")
    for i, m in enumerate(messages):
        name = f"messages[{i}]"
        if not isinstance(m, dict):
            raise _FieldError(name, f"expected an object, got {_type_name(m)}")
        if m.get("role") not in ROLES:
            got = m.get("role", "<missing>")
            raise _FieldError(f"{name}.role", f"expected one of {list(ROLES)}, got {got!r}")
        if m["role"] == "system" and i != 0:
            raise _FieldError(f"{name}.role", "a system message may only come first")
        has_calls = _check_tool_calls(m, name)
        if not (has_calls and m.get("content") is None):
            _check_str(m, "content", field=f"{name}.content")
        if "reasoning_content" in m and m["reasoning_content"] is not None:
            if m["role"] != "assistant":
                raise _FieldError(
                    f"{name}.reasoning_content", "only assistant messages carry reasoning"
                )
            _check_str(m, "reasoning_content", field=f"{name}.reasoning_content")
    return messages


def _check_tool_calls(message: Mapping, name: str) -> bool:
    """Whether `message` carries tool calls; raises `_FieldError` if they are malformed."""
    calls = message.get("tool_calls")
    if calls is None:
        return False
    if message["role"] != "assistant":
        raise _FieldError(f"{name}.tool_calls", "only assistant messages carry tool calls")
    if not isinstance(calls, list):
        raise _FieldError(f"{name}.tool_calls", f"expected a list, got {_type_name(calls)}")
    for j, call in enumerate(calls):
        try:
            ToolCall.from_mapping(call)
        except ValueError as e:
            raise _FieldError(f"{name}.tool_calls[{j}]", str(e)) from None
    return bool(calls)


def _check_tools(record: Mapping) -> None:
    if "tools" not in record:
        return
    tools = record["tools"]
    if not isinstance(tools, list):
        raise _FieldError("tools", f"expected a list, got {_type_name(tools)}")
    for i, tool in enumerate(tools):
        try:
            ToolSpec.from_mapping(tool)
        except ValueError as e:
            raise _FieldError(f"tools[{i}]", str(e)) from None


def validate_chat_record(record: Any) -> None:
    """Raises `_FieldError` if `record` is not a valid chat record."""
    if not isinstance(record, dict):
        raise _FieldError("<record>", f"expected a JSON object, got {_type_name(record)}")
    messages = _check_messages(record)
    if not any(m["role"] == "assistant" for m in messages):
        raise _FieldError("messages", "no assistant message to train on")
    _check_str(record, "domain", nonempty=True)
    _check_tools(record)


def validate_prompt_record(record: Any) -> None:
    """Raises `_FieldError` if `record` is not a valid RL prompt record."""
    if not isinstance(record, dict):
        raise _FieldError("<record>", f"expected a JSON object, got {_type_name(record)}")
    has_prompt, has_messages = "prompt" in record, "messages" in record
    if has_prompt == has_messages:
        raise _FieldError("prompt", "expected exactly one of 'prompt' or 'messages'")
    if has_prompt:
        _check_str(record, "prompt", nonempty=True)
    else:
        messages = _check_messages(record)
        if messages[-1]["role"] == "assistant":
            raise _FieldError(
                f"messages[{len(messages) - 1}].role",
                "a prompt must not end with an assistant message",
            )
    _check_str(record, "domain", nonempty=True)
    if "verifier" not in record:
        raise _FieldError("verifier", "missing")
    verifier = record["verifier"]
    if not isinstance(verifier, dict):
        raise _FieldError("verifier", f"expected an object, got {_type_name(verifier)}")
    _check_str(verifier, "type", field="verifier.type", nonempty=True)
    _check_tools(record)


def _decode_line(raw: bytes, where: str) -> str:
    """The line's text without its line terminator; `_BadLine` if it is not UTF-8."""
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        column = len(raw[: e.start].decode("utf-8")) + 1
        raise _BadLine(f"{where}:{column}: not valid UTF-8 (byte 0x{raw[e.start]:02x})") from None
    return text.rstrip("\r\n")


def _parse_json(text: str, where: str) -> Any:
    try:
        return json.loads(text)
    except json.JSONDecodeError as e:
        # `text` is one line, so the character offset gives the column.
        raise _BadLine(f"{where}:{e.pos + 1}: invalid JSON: {e.msg}") from None


def _read_jsonl(
    path: str | os.PathLike,
    validate: Callable[[Any], None],
    *,
    skip_bad: bool,
    max_record_chars: int,
) -> tuple[list[dict], SkipCount]:
    path = os.fspath(path)
    if max_record_chars < 1:
        raise ValueError(f"max_record_chars={max_record_chars} must be >= 1")
    records, n_bad, n_long = [], 0, 0
    with open(path, "rb") as f:
        for lineno, raw in enumerate(f, start=1):
            where = f"{path}:{lineno}"
            try:
                text = _decode_line(raw, where)
                if not text.strip():
                    continue
                if len(text) > max_record_chars:
                    log.warning(
                        "%s: skipping a record of %d characters (max_record_chars=%d)",
                        where,
                        len(text),
                        max_record_chars,
                    )
                    n_long += 1
                    continue
                record = _parse_json(text, where)
                try:
                    validate(record)
                except _FieldError as e:
                    raise _BadLine(f"{where}: {e}") from None
            except _BadLine as e:
                if not skip_bad:
                    raise DataError(str(e)) from None
                if n_bad == 0:
                    log.warning("skipping bad records; first: %s", e)
                n_bad += 1
                continue
            records.append(record)
    if not records:
        detail = (
            f"{n_bad} bad line(s) and {n_long} over max_record_chars={max_record_chars} skipped"
            if n_bad or n_long
            else "the file is empty or blank"
        )
        raise DataError(f"{path}: no records ({detail})")
    return records, SkipCount(n_bad, n_long)


def read_chat_jsonl(
    path: str | os.PathLike, *, skip_bad: bool = False, max_record_chars: int = MAX_RECORD_CHARS
) -> tuple[list[dict], SkipCount]:
    """(valid chat records, lines skipped) of a JSONL file; see the module docstring."""
    return _read_jsonl(
        path, validate_chat_record, skip_bad=skip_bad, max_record_chars=max_record_chars
    )


def read_prompt_jsonl(
    path: str | os.PathLike, *, skip_bad: bool = False, max_record_chars: int = MAX_RECORD_CHARS
) -> tuple[list[dict], SkipCount]:
    """(valid RL prompt records, lines skipped) of a JSONL file; see the module docstring."""
    return _read_jsonl(
        path, validate_prompt_record, skip_bad=skip_bad, max_record_chars=max_record_chars
    )
