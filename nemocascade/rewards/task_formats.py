"""Task files: JSONL in a standard benchmark format -> prompt records with verifiers.

`read_task_file(path, fmt="auto")` detects the format from the first record's keys (or takes it
by name) and converts each record to a prompt record (`nemocascade.rewards` has the schema),
keeping an `id` (the source's task_id / id / key, else `file:line`):

    format     keys                                                   verifier   domain
    prompt     messages | prompt, verifier (ours, `read_prompt_jsonl`)        as given
    ifeval     prompt, instruction_id_list, kwargs                    instruction  instruction
    humaneval  prompt, test, entry_point (canonical_solution ignored) code       code
    mbpp       text (or prompt), test_list, test_setup_code?          code       code
    mcqa       question, choices | options, answer (or answerKey)     mcqa       mcqa
    math       problem, answer | solution with \\boxed{}              math       math
    gsm8k      question, answer ending in "#### N"                    math       math

A record that cannot be converted raises `DataError` naming file:line and the missing or bad key.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable, Mapping
from typing import Any

from nemocascade.data.sources import DataError, read_prompt_jsonl
from nemocascade.rewards.math import extract_answer

MATH_INSTRUCTION = "Please reason step by step, and put your final answer within \\boxed{}."
CODE_INSTRUCTION = (
    "Write the complete Python program (the imports, any helper functions given, and the "
    "completed function) in one ```python code block."
)
MCQA_INSTRUCTION = "Answer with the letter of the correct option, within \\boxed{}."


class _RecordError(Exception):
    """A record that cannot be converted; the message names the key."""


def _get(raw: Mapping, key: str, fmt: str, kind: type | tuple[type, ...] = str) -> Any:
    if key not in raw:
        raise _RecordError(f"{fmt} record lacks key {key!r}")
    value = raw[key]
    if not isinstance(value, kind) or (isinstance(value, str) and not value.strip()):
        raise _RecordError(f"{fmt} record: key {key!r} must be a non-empty {_names(kind)}")
    return value


def _names(kind) -> str:
    kinds = kind if isinstance(kind, tuple) else (kind,)
    return " or ".join(k.__name__ for k in kinds)


def _from_gsm8k(raw: Mapping) -> dict:
    answer = str(_get(raw, "answer", "gsm8k", (str, int, float)))
    if "####" in answer:
        ref = answer.rsplit("####", 1)[1].strip()
    elif "\n" not in answer.strip():
        ref = answer.strip()  # a bare final answer
    else:
        raise _RecordError("gsm8k record: key 'answer' has no final '#### <answer>' line")
    if not ref:
        raise _RecordError("gsm8k record: key 'answer' has nothing after '####'")
    prompt = f"{_get(raw, 'question', 'gsm8k').strip()}\n{MATH_INSTRUCTION}"
    return {"prompt": prompt, "domain": "math", "verifier": {"type": "math", "answer": ref}}


def _from_math(raw: Mapping) -> dict:
    problem = _get(raw, "problem", "math")
    if "answer" in raw:
        ref = str(_get(raw, "answer", "math", (str, int, float))).strip()
    elif "solution" in raw:
        ref = extract_answer(_get(raw, "solution", "math"), styles=("boxed",))
        if ref is None:
            raise _RecordError("math record lacks key 'answer' and its 'solution' has no \\boxed{}")
    else:
        raise _RecordError("math record lacks key 'answer' (or a 'solution' with \\boxed{})")
    prompt = f"{problem.strip()}\n{MATH_INSTRUCTION}"
    return {"prompt": prompt, "domain": "math", "verifier": {"type": "math", "answer": ref}}


def _from_humaneval(raw: Mapping) -> dict:
    stub = _get(raw, "prompt", "humaneval")
    spec = {
        "type": "code",
        "tests": _get(raw, "test", "humaneval"),
        "entry_point": _get(raw, "entry_point", "humaneval").strip(),
    }
    prompt = f"{CODE_INSTRUCTION}\n\n```python\n{stub.rstrip()}\n```"
    return {"prompt": prompt, "domain": "code", "verifier": spec}


def _from_mbpp(raw: Mapping) -> dict:
    """MBPP (`text`) or its sanitized split (`prompt`, `test_imports`)."""
    text = _get(raw, "prompt" if "text" not in raw and "prompt" in raw else "text", "mbpp")
    asserts = _get(raw, "test_list", "mbpp", list)
    imports = raw.get("test_imports") or []
    setup = raw.get("test_setup_code") or ""
    if not all(isinstance(t, str) for t in [*asserts, *imports]):
        raise _RecordError("mbpp record: keys 'test_list' and 'test_imports' must list strings")
    if not isinstance(setup, str):
        raise _RecordError("mbpp record: key 'test_setup_code' must be a string")
    tests = "\n".join([*imports, *([setup] if setup.strip() else []), *asserts])
    shown = "\n".join(asserts)
    prompt = (
        f"{text.strip()}\nYour code should pass these tests:\n\n{shown}\n\n"
        "Write the function in one ```python code block."
    )
    return {"prompt": prompt, "domain": "code", "verifier": {"type": "code", "tests": tests}}


def _from_ifeval(raw: Mapping) -> dict:
    ids = _get(raw, "instruction_id_list", "ifeval", list)
    kwargs = _get(raw, "kwargs", "ifeval", list)
    if len(ids) != len(kwargs):
        raise _RecordError(
            f"ifeval record: {len(ids)} ids in 'instruction_id_list' but {len(kwargs)} "
            "dicts in 'kwargs'"
        )
    spec = {"type": "instruction", "instruction_id_list": ids, "kwargs": kwargs}
    return {"prompt": _get(raw, "prompt", "ifeval"), "domain": "instruction", "verifier": spec}


def _mcqa_options(raw: Mapping) -> list[tuple[str, str]]:
    """(label, text) of each option: a list, a {label: text} dict, or {"label": [...],
    "text": [...]} (ARC)."""
    key = "choices" if "choices" in raw else "options"
    opts = _get(raw, key, "mcqa", (list, dict))
    if isinstance(opts, dict) and set(opts) == {"label", "text"}:
        opts = dict(zip(opts["label"], opts["text"], strict=True))
    pairs = (
        list(opts.items())
        if isinstance(opts, dict)
        else [(chr(ord("A") + i), t) for i, t in enumerate(opts)]
    )
    if not 2 <= len(pairs) <= 26 or not all(isinstance(t, str | int | float) for _, t in pairs):
        raise _RecordError(f"mcqa record: key {key!r} must hold 2 to 26 options")
    return [(str(label).strip(), str(text)) for label, text in pairs]


def _from_mcqa(raw: Mapping) -> dict:
    question = _get(raw, "question", "mcqa")
    options = _mcqa_options(raw)
    key = "answer" if "answer" in raw or "answerKey" not in raw else "answerKey"
    answer = _get(raw, key, "mcqa", (str, int))
    labels = [label.upper() for label, _ in options]
    texts = [text.strip() for _, text in options]
    if isinstance(answer, int):  # an index (MMLU)
        index = answer if 0 <= answer < len(options) else None
    elif answer.strip().strip("().").strip().upper() in labels:  # a label: "B", "(B)", "2"
        index = labels.index(answer.strip().strip("().").strip().upper())
    elif answer.strip() in texts:  # the option's text
        index = texts.index(answer.strip())
    else:
        index = None
    if index is None:
        raise _RecordError(f"mcqa record: {key} {answer!r} is none of the options {labels}")
    letters = [chr(ord("A") + i) for i in range(len(options))]
    lines = "\n".join(f"{L}. {text}" for L, (_, text) in zip(letters, options, strict=True))
    prompt = f"{question.strip()}\n\n{lines}\n\n{MCQA_INSTRUCTION}"
    return {
        "prompt": prompt,
        "domain": "mcqa",
        "verifier": {"type": "mcqa", "answer": letters[index]},
    }


CONVERTERS: dict[str, Callable[[Mapping], dict]] = {
    "ifeval": _from_ifeval,
    "humaneval": _from_humaneval,
    "mbpp": _from_mbpp,
    "mcqa": _from_mcqa,
    "math": _from_math,
    "gsm8k": _from_gsm8k,
}
FORMATS = ("prompt", *CONVERTERS)
_ID_KEYS = ("task_id", "id", "unique_id", "key", "question_id")


def detect_format(raw: Mapping) -> str | None:
    """The format a record's keys say (see the module docstring), or None."""
    keys = set(raw)
    if "verifier" in keys and keys & {"messages", "prompt"}:
        return "prompt"
    rules = (
        ("ifeval", {"instruction_id_list"}),
        ("humaneval", {"prompt", "test", "entry_point"}),
        ("mbpp", {"test_list"}),
        ("mcqa", {"question", "choices"}),
        ("mcqa", {"question", "options"}),
        ("math", {"problem"}),
        ("gsm8k", {"question", "answer"}),
    )
    return next((fmt for fmt, need in rules if need <= keys), None)


def _jsonl(path: str) -> list[tuple[int, Any]]:
    """(line number, parsed JSON) of each non-blank line; DataError file:line[:column]."""
    out = []
    with open(path, "rb") as f:
        for lineno, raw in enumerate(f, start=1):
            try:
                text = raw.decode("utf-8")
            except UnicodeDecodeError as e:
                raise DataError(f"{path}:{lineno}: not valid UTF-8 ({e.reason})") from None
            if not text.strip():
                continue
            try:
                out.append((lineno, json.loads(text)))
            except json.JSONDecodeError as e:
                raise DataError(f"{path}:{lineno}:{e.pos + 1}: invalid JSON: {e.msg}") from None
    if not out:
        raise DataError(f"{path}: no records (the file is empty or blank)")
    return out


def read_task_file(path: str | os.PathLike, fmt: str = "auto") -> tuple[list[dict], str]:
    """(prompt records, format) of a task file; `fmt="auto"` detects it from the first record.

    Each record keeps an `id` (the source's task_id / id / key, else `file:line`). Raises
    `DataError` naming file:line and the missing or bad key."""
    path = os.fspath(path)
    if fmt != "auto" and fmt not in FORMATS:
        raise ValueError(f"unknown task format {fmt!r}; known: auto, {', '.join(FORMATS)}")
    lines = _jsonl(path)
    first_line, first = lines[0]
    if fmt == "auto":
        found = detect_format(first) if isinstance(first, dict) else None
        if found is None:
            keys = sorted(first) if isinstance(first, dict) else type(first).__name__
            raise DataError(
                f"{path}:{first_line}: cannot tell the task format from keys {keys}; "
                f"name it (one of {', '.join(FORMATS)})"
            )
        fmt = found
    if fmt == "prompt":  # ours: `read_prompt_jsonl` validates it (and skips over-long lines)
        records, skipped = read_prompt_jsonl(path)
        where = (
            [f"record{i + 1}" for i in range(len(records))] if skipped else [n for n, _ in lines]
        )
        name = os.path.basename(path)
        return [_with_id(r, f"{name}:{w}") for w, r in zip(where, records, strict=True)], fmt
    records = []
    for lineno, raw in lines:
        try:
            if not isinstance(raw, dict):
                raise _RecordError(f"expected a JSON object, got {type(raw).__name__}")
            record = CONVERTERS[fmt](raw)
            records.append(_with_id(record, f"{os.path.basename(path)}:{lineno}", raw))
        except _RecordError as e:
            raise DataError(f"{path}:{lineno}: {e}") from None
    return records, fmt


def _with_id(record: dict, default: str, raw: Mapping | None = None) -> dict:
    """`record` with an `id`: the source's (`raw`, else the record's) task_id / id / key, else
    `default` (file:line)."""
    src = record if raw is None else raw
    found = next((src[k] for k in _ID_KEYS if isinstance(src.get(k), str | int)), None)
    return {**record, "id": default if found is None else str(found)}
