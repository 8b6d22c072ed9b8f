"""JSONL sources: the samples validate; each kind of bad line is reported as file:line + field."""

import json
import logging
import re

import pytest

from nemocascade.data import DataError, read_chat_jsonl, read_prompt_jsonl
from nemocascade.data.sources import MAX_RECORD_CHARS

GOOD_CHAT = {
    "messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}],
    "domain": "chat",
}
GOOD_PROMPT = {"prompt": "1+1?", "domain": "math", "verifier": {"type": "math", "answer": "2"}}


def _msgs(*pairs):
    return [{"role": r, "content": c} for r, c in pairs]


# (bad record or raw line, field named in the error)
BAD_CHAT = [
    ("[1, 2]", "<record>"),
    ({"domain": "chat"}, "messages"),
    ({"messages": [], "domain": "chat"}, "messages"),
    (
        {"messages": _msgs(("user", "a"), ("assistant", "b"), ("bot", "c")), "domain": "x"},
        "messages[2].role",
    ),
    (
        {"messages": [{"role": "user", "content": 3}, GOOD_CHAT["messages"][1]], "domain": "x"},
        "messages[0].content",
    ),
    (
        {"messages": [GOOD_CHAT["messages"][0], {"role": "assistant"}], "domain": "x"},
        "messages[1].content",
    ),
    (
        {"messages": _msgs(("user", "a"), ("system", "s"), ("assistant", "b")), "domain": "x"},
        "messages[1].role",
    ),
    ({"messages": _msgs(("user", "a")), "domain": "x"}, "messages"),
    ({"messages": GOOD_CHAT["messages"]}, "domain"),
    ({"messages": GOOD_CHAT["messages"], "domain": 7}, "domain"),
    (
        {
            "messages": [
                {"role": "user", "content": "a", "reasoning_content": "r"},
                GOOD_CHAT["messages"][1],
            ],
            "domain": "x",
        },
        "messages[0].reasoning_content",
    ),
]

BAD_PROMPT = [
    ({"domain": "math", "verifier": {"type": "math"}}, "prompt"),
    ({**GOOD_PROMPT, "messages": _msgs(("user", "a"))}, "prompt"),
    ({**GOOD_PROMPT, "prompt": ""}, "prompt"),
    (
        {
            "messages": _msgs(("user", "a"), ("assistant", "b")),
            "domain": "m",
            "verifier": {"type": "t"},
        },
        "messages[1].role",
    ),
    ({k: v for k, v in GOOD_PROMPT.items() if k != "verifier"}, "verifier"),
    ({**GOOD_PROMPT, "verifier": "math"}, "verifier"),
    ({**GOOD_PROMPT, "verifier": {"answer": "2"}}, "verifier.type"),
    ({**GOOD_PROMPT, "domain": ""}, "domain"),
]


def _write(path, lines):
    path.write_text("".join((x if isinstance(x, str) else json.dumps(x)) + "\n" for x in lines))
    return path


def test_samples_validate(chat_path, prompt_path):
    chats, n_bad = read_chat_jsonl(chat_path)
    assert n_bad == 0 and len(chats) == 12
    assert {r["domain"] for r in chats} >= {"math", "code", "chat", "tool_calling"}
    prompts, n_bad = read_prompt_jsonl(prompt_path)
    assert n_bad == 0 and len(prompts) == 4
    assert all("type" in p["verifier"] for p in prompts)


@pytest.mark.parametrize("bad,field", BAD_CHAT)
def test_bad_chat_line_names_file_line_and_field(tmp_path, bad, field):
    # line 1 good, line 2 blank (ignored but counted as a line), line 3 bad, line 4 good
    path = _write(tmp_path / "chat_bad.jsonl", [GOOD_CHAT, "", bad, GOOD_CHAT])
    with pytest.raises(DataError) as e:
        read_chat_jsonl(path)
    assert str(e.value).startswith(f"{path}:3: field {field!r}:"), str(e.value)
    records, n_skipped = read_chat_jsonl(path, skip_bad=True)
    assert records == [GOOD_CHAT, GOOD_CHAT] and n_skipped == 1


@pytest.mark.parametrize("bad,field", BAD_PROMPT)
def test_bad_prompt_line_names_file_line_and_field(tmp_path, bad, field):
    path = _write(tmp_path / "prompts_bad.jsonl", [GOOD_PROMPT, bad, bad, GOOD_PROMPT])
    with pytest.raises(DataError) as e:
        read_prompt_jsonl(path)
    assert str(e.value).startswith(f"{path}:2: field {field!r}:"), str(e.value)
    records, n_skipped = read_prompt_jsonl(path, skip_bad=True)
    assert records == [GOOD_PROMPT, GOOD_PROMPT] and n_skipped == 2


def test_role_error_lists_allowed_roles(tmp_path):
    path = _write(tmp_path / "c.jsonl", [BAD_CHAT[3][0]])
    with pytest.raises(
        DataError, match=r"expected one of \['system', 'user', 'assistant', 'tool'\], got 'bot'"
    ):
        read_chat_jsonl(path)


def test_messages_prompt_record_is_accepted(tmp_path):
    rec = {
        "messages": _msgs(("system", "s"), ("user", "u")),
        "domain": "if",
        "verifier": {"type": "ifeval"},
    }
    path = _write(tmp_path / "p.jsonl", [rec])
    assert read_prompt_jsonl(path) == ([rec], 0)


def _write_bytes(path, lines):
    path.write_bytes(b"".join(line + b"\n" for line in lines))
    return path


GOOD_LINE = json.dumps(GOOD_CHAT).encode()


@pytest.mark.parametrize(
    "bad,column,problem",
    [
        (b'{"messages": [', 15, "invalid JSON: Expecting value"),  # truncated line
        ('{"domain": "日本語", x}'.encode(), 19, "invalid JSON"),  # characters, not bytes
        (b'{"domain": "caf\xe9"}', 16, "not valid UTF-8 (byte 0xe9)"),
        ('{"domain": "日本'.encode() + b"\xff", 15, "not valid UTF-8 (byte 0xff)"),
    ],
)
def test_undecodable_or_invalid_json_line_names_file_line_column(tmp_path, bad, column, problem):
    path = _write_bytes(tmp_path / "c.jsonl", [GOOD_LINE, b"", bad, GOOD_LINE])
    with pytest.raises(DataError) as e:
        read_chat_jsonl(path)
    assert str(e.value).startswith(f"{path}:3:{column}: {problem}"), str(e.value)
    records, n_skipped = read_chat_jsonl(path, skip_bad=True)
    assert records == [GOOD_CHAT, GOOD_CHAT] and n_skipped == 1 and n_skipped.bad == 1


@pytest.mark.parametrize("content", ["", "\n  \n", "not json\n"])
def test_file_without_records_is_named(tmp_path, content):
    path = tmp_path / "empty.jsonl"
    path.write_text(content)
    with pytest.raises(DataError, match=f"^{re.escape(str(path))}: no records"):
        read_chat_jsonl(path, skip_bad=True)
    with pytest.raises(DataError, match=f"^{re.escape(str(path))}"):
        read_prompt_jsonl(path)


def test_record_over_the_cap_is_skipped_with_a_warning(tmp_path, caplog):
    long_chat = {**GOOD_CHAT, "note": "x" * 300}
    path = _write(tmp_path / "c.jsonl", [GOOD_CHAT, long_chat, GOOD_CHAT])
    size = len(json.dumps(long_chat))
    with caplog.at_level(logging.WARNING, logger="nemocascade.data.sources"):
        records, n_skipped = read_chat_jsonl(path, max_record_chars=300)
    assert records == [GOOD_CHAT, GOOD_CHAT]
    assert (n_skipped, n_skipped.too_long, n_skipped.bad) == (1, 1, 0)
    assert f"{path}:2: skipping a record of {size} characters" in caplog.text
    assert read_chat_jsonl(path, max_record_chars=size) == ([GOOD_CHAT, long_chat, GOOD_CHAT], 0)


def test_default_cap_skips_a_huge_line(tmp_path, caplog):
    huge = {**GOOD_PROMPT, "prompt": "y" * MAX_RECORD_CHARS}
    path = _write(tmp_path / "p.jsonl", [huge, GOOD_PROMPT])
    with caplog.at_level(logging.WARNING, logger="nemocascade.data.sources"):
        records, n_skipped = read_prompt_jsonl(path)
    assert records == [GOOD_PROMPT] and n_skipped.too_long == 1
    assert f"{path}:1: skipping a record of {len(json.dumps(huge))} characters" in caplog.text


TOOL_CALL = {"name": "get_weather", "arguments": {"city": "Paris"}}
TOOL_DECL = {"name": "get_weather", "parameters": {"city": {"type": "string"}}}


def test_tool_calling_records_validate(tmp_path):
    chat = {
        "messages": [
            {"role": "user", "content": "Weather?"},
            {"role": "assistant", "content": None, "tool_calls": [TOOL_CALL]},
            {"role": "tool", "content": "sunny"},
            {
                "role": "assistant",
                "content": "",
                "tool_calls": [{"function": {**TOOL_CALL, "arguments": '{"city": "Oslo"}'}}],
            },
        ],
        "tools": [TOOL_DECL, {"type": "function", "function": TOOL_DECL}],
        "domain": "tool_calling",
    }
    prompt = {**GOOD_PROMPT, "tools": [TOOL_DECL]}
    assert read_chat_jsonl(_write(tmp_path / "c.jsonl", [chat])) == ([chat], 0)
    assert read_prompt_jsonl(_write(tmp_path / "p.jsonl", [prompt])) == ([prompt], 0)


def _tool_chat(assistant, **extra):
    return {"messages": [GOOD_CHAT["messages"][0], assistant], "domain": "t", **extra}


@pytest.mark.parametrize(
    "bad,field",
    [
        (_tool_chat({"role": "assistant", "content": "a", "tool_calls": {}}), "tool_calls"),
        (_tool_chat({"role": "assistant", "tool_calls": [{"arguments": {}}]}), "tool_calls[0]"),
        (
            _tool_chat({"role": "assistant", "tool_calls": [{**TOOL_CALL, "arguments": "{x"}]}),
            "tool_calls[0]",
        ),
        (_tool_chat(GOOD_CHAT["messages"][1], tools={}), "tools"),
        (
            _tool_chat(GOOD_CHAT["messages"][1], tools=[{"name": "t", "parameters": {"x": {}}}]),
            "tools[0]",
        ),
    ],
)
def test_bad_tool_fields_are_named(tmp_path, bad, field):
    path = _write(tmp_path / "c.jsonl", [bad])
    pattern = rf"^{re.escape(str(path))}:1: field '(messages\[1\]\.)?{re.escape(field)}'"
    with pytest.raises(DataError, match=pattern):
        read_chat_jsonl(path)


def test_tool_calls_only_on_assistant_messages(tmp_path):
    bad = {"messages": [{"role": "user", "content": "a", "tool_calls": [TOOL_CALL]}], "domain": "t"}
    path = _write(tmp_path / "c.jsonl", [bad])
    with pytest.raises(DataError, match="only assistant messages carry tool calls"):
        read_chat_jsonl(path)
