"""Tool calls: declarations, render -> parse round trips, typed values, malformed calls."""

import random

import pytest

from nemocascade.data.tools import (
    ToolCall,
    ToolCallError,
    ToolSpec,
    parse_tool_calls,
    render_system,
    render_tool_calls,
    render_tool_declarations,
    render_tool_responses,
)

WEATHER = ToolSpec(
    name="get_weather",
    description="Current weather of a city.",
    parameters={
        "city": {"type": "string", "description": "City name."},
        "days": {"type": "integer", "description": "Forecast days.", "enum": [1, 2, 3]},
    },
    required=("city",),
)
TYPED = ToolSpec(
    name="typed",
    parameters={
        "s": {"type": "string"},
        "i": {"type": "integer"},
        "n": {"type": "number"},
        "b": {"type": "boolean"},
        "o": {"type": "object"},
        "a": {"type": "array"},
    },
)
TOOLS = [WEATHER, TYPED]


def test_render_one_call_exactly():
    call = {"name": "get_weather", "arguments": {"city": "Paris", "days": 2}}
    assert render_tool_calls([call]) == (
        "<tool_call>\n<function=get_weather>\n"
        "<parameter=city>\nParis\n</parameter>\n"
        "<parameter=days>\n2\n</parameter>\n"
        "</function>\n</tool_call>"
    )


def test_round_trip_one_and_several_calls():
    calls = [
        ToolCall("get_weather", {"city": "Paris"}),
        ToolCall("get_weather", {"city": "Oslo", "days": 3}),
        ToolCall("typed", {"s": "x"}),
    ]
    for n in (1, 3):
        parsed, errors = parse_tool_calls(render_tool_calls(calls[:n]), TOOLS)
        assert errors == []
        assert [(c.name, c.arguments, c.index) for c in parsed] == [
            (c.name, c.arguments, i) for i, c in enumerate(calls[:n])
        ]


def test_round_trip_typed_and_multi_line_values():
    arguments = {
        "s": "line one\n  line two\n\nline four",
        "i": -7,
        "n": 2.5,
        "b": False,
        "o": {"k": [1, {"x": None}], "unicode": "日本"},
        "a": ["a", 1, True],
    }
    text = render_tool_calls([{"function": {"name": "typed", "arguments": arguments}}])
    assert "<parameter=b>\nfalse\n</parameter>" in text
    (call,), errors = parse_tool_calls(text, TOOLS)
    assert errors == [] and call.arguments == arguments
    assert type(call.arguments["i"]) is int and type(call.arguments["n"]) is float


def test_string_keeps_inner_newlines_less_exactly_one_at_each_edge():
    value = "\n\nindented\n  code\n\n"
    (call,), _ = parse_tool_calls(render_tool_calls([ToolCall("typed", {"s": value})]), TOOLS)
    assert call.arguments["s"] == value
    (call,), _ = parse_tool_calls(
        "<tool_call><function=typed><parameter=s>x\n</parameter></function></tool_call>", TOOLS
    )
    assert call.arguments["s"] == "x"


def test_lenient_spellings_and_missing_newlines():
    text = (
        "Let me look. <toolcall><function=get_weather><parameter=city>Rome</parameter>"
        "<parameter=days> 2 </parameter></function></toolcall>"
        "<tool_call>\n<function= typed >\n<parameter=i>3.0</parameter>"
        "<parameter=b>True</parameter></function></tool_call>"
    )
    calls, errors = parse_tool_calls(text, TOOLS)
    assert errors == []
    assert [c.arguments for c in calls] == [{"city": "Rome", "days": 2}, {"i": 3, "b": True}]


def test_only_calls_after_the_reasoning_count():
    call = render_tool_calls([ToolCall("get_weather", {"city": "Paris"})])
    inside = render_tool_calls([ToolCall("get_weather", {"city": "Lima"})])
    calls, errors = parse_tool_calls(f"<think>\nmaybe {inside}\n</think>\n{call}", TOOLS)
    assert [c.arguments["city"] for c in calls] == ["Paris"] and errors == []
    # a thinking-mode reply (the prompt opened <think>) carries no <think> itself
    calls, _ = parse_tool_calls(f"maybe {inside}\n</think>\n{call}", TOOLS, thinking=True)
    assert [c.arguments["city"] for c in calls] == ["Paris"]
    # reasoning never closed: no calls
    assert parse_tool_calls(f"<think>\n{call}", TOOLS) == ([], [])
    assert parse_tool_calls(call, TOOLS, thinking=True) == ([], [])
    assert parse_tool_calls("The answer is 4.", TOOLS) == ([], [])


def _call(body):
    return f"<tool_call>\n<function=get_weather>\n{body}</function>\n</tool_call>"


def _typed(key, value):
    param = f"<parameter={key}>\n{value}\n</parameter>\n"
    return f"<tool_call>\n<function=typed>\n{param}</function>\n</tool_call>"


CITY = "<parameter=city>\nParis\n</parameter>\n"

# (reply, kind of the error, words its message contains)
MALFORMED = [
    ("<tool_call>\n<function=get_weather>\n" + CITY, "unclosed_tag", ["<tool_call>"]),
    (
        "<tool_call>\n<function=get_weather>\n" + CITY + "</tool_call>",
        "unclosed_tag",
        ["get_weather", "</function>"],
    ),
    (_call("<parameter=city>\nParis\n"), "unclosed_tag", ["city", "</parameter>"]),
    ("<tool_call>\nget_weather(city='Paris')\n</tool_call>", "malformed", ["<function=NAME>"]),
    (_call(CITY + "and then\n"), "malformed", ["and then"]),
    (_call(CITY).replace("get_weather", "get_wether"), "unknown_tool", ["get_wether", "typed"]),
    (_call("<parameter=days>\n2\n</parameter>\n"), "missing_parameter", ["city", "get_weather"]),
    (_call(CITY + "<parameter=country>\nFR\n</parameter>\n"), "unknown_parameter", ["country"]),
    (_call(CITY + CITY), "duplicate_parameter", ["city"]),
    (_call(CITY + "<parameter=days>\ntwo\n</parameter>\n"), "bad_value", ["days", "integer"]),
    (_typed("i", "2.5"), "bad_value", ["'i'", "integer"]),
    (_typed("i", "true"), "bad_value", ["integer"]),
    (_typed("n", "NaN"), "bad_value", ["number"]),
    (_typed("b", "yes"), "bad_value", ["boolean"]),
    (_typed("o", "{city: 1}"), "bad_value", ["object"]),
    (_typed("o", "[1, 2]"), "bad_value", ["object"]),
    (_typed("a", '{"a": 1}'), "bad_value", ["array"]),
]


@pytest.mark.parametrize("reply,kind,words", MALFORMED)
def test_malformed_call_is_an_error_not_an_exception(reply, kind, words):
    good = render_tool_calls([ToolCall("get_weather", {"city": "Oslo"})])
    calls, errors = parse_tool_calls(f"Checking.\n{reply}\n{good}", TOOLS)
    assert [e.kind for e in errors] == [kind], errors
    error = errors[0]
    assert isinstance(error, ToolCallError) and error.index == 0
    assert all(w in error.message for w in words), error.message
    assert len(error.message) < 160
    # the well-formed call after it is still extracted, as the turn's second call
    assert [(c.arguments, c.index) for c in calls] == [({"city": "Oslo"}, 1)]


def test_every_problem_of_a_call_is_reported():
    reply = _call("<parameter=days>\nsoon\n</parameter>\n<parameter=x>\n1\n</parameter>\n")
    calls, errors = parse_tool_calls(reply, TOOLS)
    assert calls == []
    assert sorted((e.kind, e.parameter) for e in errors) == [
        ("bad_value", "days"),
        ("missing_parameter", "city"),
        ("unknown_parameter", "x"),
    ]


def test_parser_never_raises_on_garbage():
    pieces = [
        "<tool_call>",
        "<toolcall>",
        "</tool_call>",
        "<function=get_weather>",
        "<function=typed>",
        "<function=>",
        "</function>",
        "<parameter=city>",
        "<parameter=i>",
        "<parameter=o>",
        "</parameter>",
        "<think>",
        "</think>",
        "\n",
        "x",
        "{",
        "3",
        "<",
    ]
    rng = random.Random(0)
    for _ in range(500):
        text = "".join(rng.choice(pieces) for _ in range(rng.randint(0, 14)))
        calls, errors = parse_tool_calls(text, TOOLS)
        assert all(isinstance(c, ToolCall) for c in calls)
        assert all(isinstance(e, ToolCallError) and e.message for e in errors)


def test_tool_spec_forms_and_validation():
    openai = {
        "type": "function",
        "function": {
            "name": "get_weather",
            "description": "Current weather of a city.",
            "parameters": {
                "type": "object",
                "properties": WEATHER.parameters,
                "required": ["city"],
            },
        },
    }
    assert ToolSpec.from_mapping(openai) == WEATHER
    assert ToolSpec.from_mapping(openai["function"]) == WEATHER
    ours = {"name": "t", "parameters": {"x": {"type": "number"}}, "required": ["x"]}
    assert ToolSpec.from_mapping(ours) == ToolSpec("t", "", {"x": {"type": "number"}}, ("x",))
    with pytest.raises(ValueError, match="type must be one of"):
        ToolSpec("t", parameters={"x": {"type": "float"}})
    with pytest.raises(ValueError, match="unknown parameters"):
        ToolSpec("t", parameters={"x": {"type": "string"}}, required=("y",))
    with pytest.raises(ValueError, match="tool name"):
        ToolSpec.from_mapping({"description": "no name"})
    with pytest.raises(ValueError, match="arguments"):
        ToolCall.from_mapping({"name": "t", "arguments": "{not json"})


def test_declarations():
    text = render_tool_declarations([WEATHER])
    assert text.startswith("# Tools\n\nYou have access to the following functions:\n\n<tools>\n")
    assert (
        "<function>\n<name>get_weather</name>\n"
        "<description>Current weather of a city.</description>\n"
        "<parameters>\n<parameter>\n<name>city</name>\n<type>string</type>\n"
        "<description>City name.</description>\n</parameter>\n<parameter>\n<name>days</name>\n"
        "<type>integer</type>\n<description>Forecast days.</description>\n<enum>[1, 2, 3]</enum>\n"
        '</parameter>\n<required>["city"]</required>\n</parameters>\n</function>\n</tools>\n\n'
    ) in text
    assert "<tool_call>\n<function=example_function_name>\n" in text
    assert render_system("Be brief.", [WEATHER]) == "Be brief.\n\n" + text
    assert render_system("", [WEATHER]) == text
    assert render_system("Be brief.", []) == render_system("Be brief.", None) == "Be brief."


def test_tool_responses():
    assert render_tool_responses(["sunny", {"temp_c": 18}]) == (
        '<tool_response>\nsunny\n</tool_response>\n<tool_response>\n{"temp_c": 18}\n'
        "</tool_response>\n"
    )
