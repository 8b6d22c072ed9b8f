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

A bad line raises `DataError("file.jsonl:17: field 'messages[2].role': ...")`;
with `skip_bad=True` it is skipped and counted instead. Blank lines are ignored.
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Callable, Mapping
from typing import Any

from nemocascade.data.chat import ROLES

log = logging.getLogger(__name__)


class DataError(ValueError):
    """A record in a data file is malformed; the message starts with `file:line`."""


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
        _check_str(m, "content", field=f"{name}.content")
        if "reasoning_content" in m and m["reasoning_content"] is not None:
            if m["role"] != "assistant":
                raise _FieldError(
                    f"{name}.reasoning_content", "only assistant messages carry reasoning"
                )
            _check_str(m, "reasoning_content", field=f"{name}.reasoning_content")
    return messages


def validate_chat_record(record: Any) -> None:
    """Raises `_FieldError` if `record` is not a valid chat record."""
    if not isinstance(record, dict):
        raise _FieldError("<record>", f"expected a JSON object, got {_type_name(record)}")
    messages = _check_messages(record)
    if not any(m["role"] == "assistant" for m in messages):
        raise _FieldError("messages", "no assistant message to train on")
    _check_str(record, "domain", nonempty=True)


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


def _read_jsonl(
    path: str | os.PathLike, validate: Callable[[Any], None], *, skip_bad: bool
) -> tuple[list[dict], int]:
    path = os.fspath(path)
    records, n_skipped = [], 0
    with open(path, encoding="utf-8") as f:
        for lineno, line in enumerate(f, start=1):
            if not line.strip():
                continue
            try:
                try:
                    record = json.loads(line)
                except json.JSONDecodeError as e:
                    raise _FieldError(
                        "<json>", f"invalid JSON ({e.msg} at column {e.colno})"
                    ) from None
                validate(record)
            except _FieldError as e:
                message = f"{path}:{lineno}: {e}"
                if not skip_bad:
                    raise DataError(message) from None
                if n_skipped == 0:
                    log.warning("skipping bad records; first: %s", message)
                n_skipped += 1
                continue
            records.append(record)
    return records, n_skipped


def read_chat_jsonl(path: str | os.PathLike, *, skip_bad: bool = False) -> tuple[list[dict], int]:
    """(valid chat records, number of bad lines skipped) of a JSONL file."""
    return _read_jsonl(path, validate_chat_record, skip_bad=skip_bad)


def read_prompt_jsonl(path: str | os.PathLike, *, skip_bad: bool = False) -> tuple[list[dict], int]:
    """(valid RL prompt records, number of bad lines skipped) of a JSONL file."""
    return _read_jsonl(path, validate_prompt_record, skip_bad=skip_bad)
