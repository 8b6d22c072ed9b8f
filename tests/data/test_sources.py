"""JSONL sources: the samples validate; each kind of bad line is reported as file:line + field."""

import json

import pytest

from nemocascade.data import DataError, read_chat_jsonl, read_prompt_jsonl

GOOD_CHAT = {
    "messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}],
    "domain": "chat",
}
GOOD_PROMPT = {"prompt": "1+1?", "domain": "math", "verifier": {"type": "math", "answer": "2"}}


def _msgs(*pairs):
    return [{"role": r, "content": c} for r, c in pairs]


# (bad record or raw line, field named in the error)
BAD_CHAT = [
    ('{"messages": [', "<json>"),
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
    path = _write(tmp_path / "c.jsonl", [BAD_CHAT[4][0]])
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
