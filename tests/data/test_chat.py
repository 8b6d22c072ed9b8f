"""Chat template: exact rendered text, loss masks (thinking on/off, multi-turn, tools), prompts."""

import pytest

from nemocascade.data import render_chat, render_prompt, render_text

SYS = "<|im_start|>system\n<|im_end|>\n"

SINGLE = [
    {"role": "user", "content": "What is 2+2?"},
    {"role": "assistant", "reasoning_content": "2+2=4.", "content": "4"},
]

MULTI = [
    {"role": "system", "content": "Be brief."},
    {"role": "user", "content": "Pick a prime."},
    {"role": "assistant", "reasoning_content": "Take 2.", "content": "2"},
    {"role": "user", "content": "Another?"},
    {"role": "assistant", "content": "Three"},
    {"role": "user", "content": "Last one?"},
    {"role": "assistant", "reasoning_content": "Five is prime.", "content": "5"},
]


def masked_runs(tokenizer, ids, mask):
    """Decoded text of each maximal run of masked tokens."""
    runs, cur = [], []
    for i, m in zip(ids, mask, strict=True):
        if m:
            cur.append(i)
        elif cur:
            runs.append(tokenizer.decode(cur))
            cur = []
    if cur:
        runs.append(tokenizer.decode(cur))
    return runs


def test_single_turn_thinking(tokenizer):
    text = render_text(SINGLE, thinking=True)
    assert text == (
        SYS + "<|im_start|>user\nWhat is 2+2?<|im_end|>\n"
        "<|im_start|>assistant\n<think>\n2+2=4.\n</think>\n4<|im_end|>\n"
    )
    ids, mask = render_chat(tokenizer, SINGLE, thinking=True)
    assert ids == tokenizer.encode(text) and len(mask) == len(ids)
    assert tokenizer.decode(ids) == text
    assert masked_runs(tokenizer, ids, mask) == ["2+2=4.\n</think>\n4<|im_end|>"]


def test_single_turn_non_thinking(tokenizer):
    text = render_text(SINGLE, thinking=False)
    assert text == (
        SYS + "<|im_start|>user\nWhat is 2+2?<|im_end|>\n"
        "<|im_start|>assistant\n<think></think>4<|im_end|>\n"
    )
    ids, mask = render_chat(tokenizer, SINGLE, thinking=False)
    assert masked_runs(tokenizer, ids, mask) == ["4<|im_end|>"]
    assert tokenizer.think_end_id in ids and mask[ids.index(tokenizer.think_end_id)] == 0


def test_think_prefix_in_content_equals_reasoning_field(tokenizer):
    inline = [SINGLE[0], {"role": "assistant", "content": "<think>\n2+2=4.\n</think>\n4"}]
    for thinking in (True, False):
        assert render_chat(tokenizer, inline, thinking=thinking) == render_chat(
            tokenizer, SINGLE, thinking=thinking
        )


def test_empty_think_block_is_non_thinking(tokenizer):
    for reply in ({"content": "<think></think>4"}, {"reasoning_content": "", "content": "4"}):
        msgs = [SINGLE[0], {"role": "assistant", **reply}]
        assert render_text(msgs, thinking=True) == render_text(SINGLE, thinking=False)
        assert render_chat(tokenizer, msgs) == render_chat(tokenizer, SINGLE, thinking=False)


def test_assistant_body_is_right_trimmed(tokenizer):
    msgs = [
        {"role": "user", "content": "a"},
        {"role": "assistant", "reasoning_content": "r1", "content": "  x \n"},
        {"role": "user", "content": "b"},
        {"role": "assistant", "reasoning_content": "\nr2\n", "content": ""},
    ]
    assert render_text(msgs) == (
        SYS + "<|im_start|>user\na<|im_end|>\n"
        "<|im_start|>assistant\n<think></think>\n  x<|im_end|>\n"
        "<|im_start|>user\nb<|im_end|>\n"
        "<|im_start|>assistant\n<think>\nr2\n</think><|im_end|>\n"
    )
    ids, mask = render_chat(tokenizer, msgs)
    assert masked_runs(tokenizer, ids, mask) == ["\n  x<|im_end|>", "r2\n</think><|im_end|>"]


def test_multi_turn_strips_history_reasoning(tokenizer):
    text = render_text(MULTI, thinking=True)
    assert text == (
        "<|im_start|>system\nBe brief.<|im_end|>\n"
        "<|im_start|>user\nPick a prime.<|im_end|>\n"
        "<|im_start|>assistant\n<think></think>\n2<|im_end|>\n"
        "<|im_start|>user\nAnother?<|im_end|>\n"
        "<|im_start|>assistant\n<think></think>Three<|im_end|>\n"
        "<|im_start|>user\nLast one?<|im_end|>\n"
        "<|im_start|>assistant\n<think>\nFive is prime.\n</think>\n5<|im_end|>\n"
    )
    assert "Take 2." not in text
    ids, mask = render_chat(tokenizer, MULTI, thinking=True)
    assert masked_runs(tokenizer, ids, mask) == [
        "\n2<|im_end|>",
        "Three<|im_end|>",
        "Five is prime.\n</think>\n5<|im_end|>",
    ]
    ids_last, mask_last = render_chat(tokenizer, MULTI, thinking=True, train_history=False)
    assert ids_last == ids
    assert masked_runs(tokenizer, ids_last, mask_last) == ["Five is prime.\n</think>\n5<|im_end|>"]


def test_mask_never_covers_headers_or_user_tokens(tokenizer):
    ids, mask = render_chat(tokenizer, MULTI, thinking=True)
    n_assistant = sum(m["role"] == "assistant" for m in MULTI)
    im_end_masked = [m for i, m in zip(ids, mask, strict=True) if i == tokenizer.im_end_id]
    # every assistant <|im_end|> is trained, no other <|im_end|> is
    assert sum(im_end_masked) == n_assistant and len(im_end_masked) == len(MULTI)
    for i, m in zip(ids, mask, strict=True):
        if i in (tokenizer.im_start_id, tokenizer.think_id):
            assert m == 0
    assert sum(mask) < len(mask) / 2


def test_tool_messages_become_one_user_block(tokenizer):
    msgs = [
        {"role": "user", "content": "Weather?"},
        {"role": "assistant", "content": "<tool_call>\n<function=w>\n</function>\n</tool_call>"},
        {"role": "tool", "content": "sunny"},
        {"role": "tool", "content": "20C"},
        {"role": "assistant", "reasoning_content": "Report it.", "content": "Sunny, 20C."},
    ]
    text = render_text(msgs, thinking=True)
    assert text == (
        SYS + "<|im_start|>user\nWeather?<|im_end|>\n"
        "<|im_start|>assistant\n<think></think>"
        "<tool_call>\n<function=w>\n</function>\n</tool_call><|im_end|>\n"
        "<|im_start|>user\n<tool_response>\nsunny\n</tool_response>\n"
        "<tool_response>\n20C\n</tool_response>\n<|im_end|>\n"
        "<|im_start|>assistant\n<think>\nReport it.\n</think>\nSunny, 20C.<|im_end|>\n"
    )
    ids, mask = render_chat(tokenizer, msgs)
    runs = masked_runs(tokenizer, ids, mask)
    assert runs == [
        "<tool_call>\n<function=w>\n</function>\n</tool_call><|im_end|>",
        "Report it.\n</think>\nSunny, 20C.<|im_end|>",
    ]


def test_generation_prompt_and_render_prompt(tokenizer):
    user = [{"role": "user", "content": "Hi"}]
    think = render_prompt(tokenizer, "Hi", thinking=True)
    assert think == render_prompt(tokenizer, user, thinking=True)
    assert (
        tokenizer.decode(think)
        == SYS + "<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n<think>\n"
    )
    assert think[-2] == tokenizer.think_id
    plain = render_prompt(tokenizer, user, thinking=False)
    assert plain[-2:] == [tokenizer.think_id, tokenizer.think_end_id]
    ids, mask = render_chat(tokenizer, user, thinking=False, add_generation_prompt=True)
    assert ids == plain and sum(mask) == 0
    # the prompt is exactly the prefix of the rendered SFT sample, up to the trained part
    full, full_mask = render_chat(tokenizer, SINGLE, thinking=True)
    first = full_mask.index(1)
    assert full[:first] == render_prompt(tokenizer, SINGLE[:1], thinking=True)


def test_bad_conversations():
    with pytest.raises(ValueError, match="must not end with an assistant"):
        render_prompt(None, SINGLE, thinking=True)
    with pytest.raises(ValueError, match=r"messages\[2\]: a system message"):
        render_text(
            [{"role": "system", "content": ""}, SINGLE[0], {"role": "system", "content": "x"}]
        )
    with pytest.raises(ValueError, match=r"messages\[1\]\.role"):
        render_text([SINGLE[0], {"role": "bot", "content": "x"}])


WEATHER_TOOL = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "Current weather of a city.",
        "parameters": {
            "type": "object",
            "properties": {"city": {"type": "string", "description": "City name."}},
            "required": ["city"],
        },
    },
}
CALL = {"name": "get_weather", "arguments": {"city": "Paris"}}
CALL_TEXT = (
    "<tool_call>\n<function=get_weather>\n<parameter=city>\nParis\n</parameter>\n"
    "</function>\n</tool_call>"
)
TOOL_CHAT = [
    {"role": "system", "content": "Be brief."},
    {"role": "user", "content": "Weather in Paris?"},
    {
        "role": "assistant",
        "reasoning_content": "Ask the tool.",
        "content": "",
        "tool_calls": [CALL],
    },
    {"role": "tool", "content": '{"sky": "cloudy"}'},
    {"role": "assistant", "reasoning_content": "It says cloudy.", "content": "Cloudy."},
]


def test_tool_calling_conversation_trains_only_assistant_tokens(tokenizer):
    from nemocascade.data.tools import render_tool_declarations

    text = render_text(TOOL_CHAT, thinking=True, tools=[WEATHER_TOOL])
    assert text == (
        f"<|im_start|>system\nBe brief.\n\n{render_tool_declarations([WEATHER_TOOL])}<|im_end|>\n"
        "<|im_start|>user\nWeather in Paris?<|im_end|>\n"
        f"<|im_start|>assistant\n<think>\nAsk the tool.\n</think>\n{CALL_TEXT}<|im_end|>\n"
        '<|im_start|>user\n<tool_response>\n{"sky": "cloudy"}\n</tool_response>\n<|im_end|>\n'
        "<|im_start|>assistant\n<think>\nIt says cloudy.\n</think>\nCloudy.<|im_end|>\n"
    )
    ids, mask = render_chat(tokenizer, TOOL_CHAT, thinking=True, tools=[WEATHER_TOOL])
    assert tokenizer.decode(ids) == text
    assert masked_runs(tokenizer, ids, mask) == [
        f"Ask the tool.\n</think>\n{CALL_TEXT}<|im_end|>",
        "It says cloudy.\n</think>\nCloudy.<|im_end|>",
    ]


def test_tool_call_in_non_thinking_mode_and_after_prose(tokenizer):
    msgs = [TOOL_CHAT[1], {"role": "assistant", "content": "Let me check. ", "tool_calls": [CALL]}]
    msgs += TOOL_CHAT[3:]
    ids, mask = render_chat(tokenizer, msgs, thinking=False, tools=[WEATHER_TOOL])
    assert masked_runs(tokenizer, ids, mask) == [
        f"Let me check.\n\n{CALL_TEXT}<|im_end|>",
        "Cloudy.<|im_end|>",
    ]
    assert "<tools>" in tokenizer.decode(ids) and tokenizer.decode(ids).count("<|im_start|>") == 5


def test_tool_calls_field_renders_like_inline_text(tokenizer):
    field = [TOOL_CHAT[1], {"role": "assistant", "content": None, "tool_calls": [CALL, CALL]}]
    inline = [TOOL_CHAT[1], {"role": "assistant", "content": f"{CALL_TEXT}\n{CALL_TEXT}"}]
    for thinking in (True, False):
        assert render_chat(tokenizer, field, thinking=thinking) == render_chat(
            tokenizer, inline, thinking=thinking
        )


def test_prompt_with_tools_continues_after_tool_responses(tokenizer):
    prompt = render_prompt(tokenizer, TOOL_CHAT[:4], thinking=True, tools=[WEATHER_TOOL])
    text = tokenizer.decode(prompt)
    assert text.startswith("<|im_start|>system\nBe brief.\n\n# Tools\n")
    assert text.endswith("</tool_response>\n<|im_end|>\n<|im_start|>assistant\n<think>\n")
    # the prompt is the prefix of the full conversation, up to the last turn's trained tokens
    full, full_mask = render_chat(tokenizer, TOOL_CHAT, tools=[WEATHER_TOOL])
    n = len(prompt)
    assert full[:n] == prompt and full_mask[n - 1 : n + 1] == [0, 1]
