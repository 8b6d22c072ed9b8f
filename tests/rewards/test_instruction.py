"""IFEval-style instruction checks: for every id, a response that meets it and one that does not."""

import pytest

from nemocascade.rewards.instruction import CHECKS, count_sentences, count_words, verify

IFEVAL_IDS = [
    "keywords:existence",
    "keywords:frequency",
    "keywords:forbidden_words",
    "keywords:letter_frequency",
    "language:response_language",
    "length_constraints:number_sentences",
    "length_constraints:number_paragraphs",
    "length_constraints:number_words",
    "length_constraints:nth_paragraph_first_word",
    "detectable_content:number_placeholders",
    "detectable_content:postscript",
    "detectable_format:number_bullet_lists",
    "detectable_format:constrained_response",
    "detectable_format:number_highlighted_sections",
    "detectable_format:multiple_sections",
    "detectable_format:json_format",
    "detectable_format:title",
    "combination:two_responses",
    "combination:repeat_prompt",
    "startend:end_checker",
    "startend:quotation",
    "change_case:capital_word_frequency",
    "change_case:english_capital",
    "change_case:english_lowercase",
    "punctuation:no_comma",
]

# (id, kwargs, a response that meets it, one that does not)
CASES = [
    (
        "keywords:existence",
        {"keywords": ["banana", "Mango"]},
        "I like mango and Banana.",
        "I like mango.",
    ),
    (
        "keywords:frequency",
        {"keyword": "cat", "frequency": 3, "relation": "at least"},
        "cat Cat CAT",
        "cat cat",
    ),
    (
        "keywords:frequency",
        {"keyword": "cat", "frequency": 2, "relation": "less than"},
        "one cat",
        "cat cat",
    ),
    (
        "keywords:forbidden_words",
        {"forbidden_words": ["bad", "evil"]},
        "A good and badge-free day.",
        "That was Bad.",
    ),
    (
        "keywords:letter_frequency",
        {"letter": "z", "let_frequency": 3, "let_relation": "at least"},
        "Zebras zigzag zealously",
        "Zebras run",
    ),
    (
        "language:response_language",
        {"language": "ko"},
        "안녕하세요, 만나서 반갑습니다.",
        "Hello, nice to meet you.",
    ),
    (
        "length_constraints:number_sentences",
        {"num_sentences": 3, "relation": "less than"},
        "One. Two, e.g. this.",
        "One. Two! Three? Four.",
    ),
    (
        "length_constraints:number_paragraphs",
        {"num_paragraphs": 2},
        "First para.\n***\nSecond para.",
        "First.\n***\n\n***\nThird.",
    ),
    (
        "length_constraints:number_words",
        {"num_words": 5, "relation": "at least"},
        "one two three four five",
        "one two three four",
    ),
    (
        "length_constraints:number_words",
        {"num_words": 5, "relation": "less than"},
        "one two three four",
        "one two three four five",
    ),
    (
        "length_constraints:nth_paragraph_first_word",
        {"num_paragraphs": 2, "nth_paragraph": 2, "first_word": "second"},
        'First words.\n\n"Second, words.',
        "First words.\n\nThird words.",
    ),
    (
        "detectable_content:number_placeholders",
        {"num_placeholders": 2},
        "Dear [name], at [address].",
        "Dear [name].",
    ),
    (
        "detectable_content:postscript",
        {"postscript_marker": "P.S."},
        "Body text.\nP.S. see you",
        "Body text. PS see you",
    ),
    (
        "detectable_content:postscript",
        {"postscript_marker": "P.P.S"},
        "Body.\nP.P.S more",
        "Body.\nP.S. more",
    ),
    (
        "detectable_format:number_bullet_lists",
        {"num_bullets": 2},
        "Intro\n* one\n- two",
        "Intro\n* one\n* two\n* three",
    ),
    (
        "detectable_format:constrained_response",
        {},
        "Thinking... My answer is yes.",
        "Yes, definitely.",
    ),
    (
        "detectable_format:number_highlighted_sections",
        {"num_highlights": 2},
        "*first* and **second**",
        "*first* only",
    ),
    (
        "detectable_format:multiple_sections",
        {"section_spliter": "Section", "num_sections": 2},
        "Section 1\nfoo\nSection 2\nbar",
        "Section 1\nfoo",
    ),
    ("detectable_format:json_format", {}, '```json\n{"a": [1, 2]}\n```', 'Here: {"a": 1}'),
    ("detectable_format:title", {}, "<<My Title>>\nbody", "<My Title>\nbody"),
    (
        "combination:two_responses",
        {},
        "First answer.\n******\nSecond answer.",
        "Same.\n******\nSame.",
    ),
    (
        "combination:repeat_prompt",
        {"prompt_to_repeat": "Write a poem."},
        "write a poem. Roses are red.",
        "Roses are red. Write a poem.",
    ),
    (
        "startend:end_checker",
        {"end_phrase": "Any other questions?"},
        "Done. Any other questions?",
        "Any other questions? Done.",
    ),
    ("startend:start_checker", {"start_phrase": "Dear team"}, "Dear Team, hello.", "Hi team."),
    ("startend:quotation", {}, '"All wrapped."', 'All "wrapped".'),
    (
        "change_case:capital_word_frequency",
        {"capital_frequency": 2, "capital_relation": "at least"},
        "THE big RED dog",
        "The big Red dog",
    ),
    ("change_case:english_capital", {}, "ALL CAPS HERE.", "Not all caps."),
    ("change_case:english_lowercase", {}, "all lower here.", "Not all lower."),
    ("punctuation:no_comma", {}, "No commas here.", "Yes, a comma."),
]


@pytest.mark.parametrize(
    "iid,kwargs,good,bad", CASES, ids=[f"{c[0]}-{i}" for i, c in enumerate(CASES)]
)
def test_each_instruction(iid, kwargs, good, bad):
    assert verify(good, [iid], [kwargs]) == [True]
    assert verify(bad, [iid], [kwargs]) == [False]


def test_all_25_ifeval_ids_supported_and_tested():
    assert len(IFEVAL_IDS) == 25 and set(IFEVAL_IDS) <= set(CHECKS)
    assert set(IFEVAL_IDS) <= {c[0] for c in CASES}


def test_ifeval_padded_kwargs_and_unknowns():
    # The IFEval dataset pads every kwargs dict with all keys set to None.
    padded = {"num_words": 3, "relation": "at least", "keywords": None, "language": None}
    assert verify("one two three", ["length_constraints:number_words"], [padded]) == [True]
    assert verify("x", ["made_up:instruction"], [{}]) == [None]
    assert verify("hello", ["language:response_language"], [{"language": "fr"}]) == [None]
    with pytest.raises(ValueError, match="missing kwargs.*num_words"):
        verify("x", ["length_constraints:number_words"], [{"relation": "at least"}])
    with pytest.raises(ValueError, match="relation must be one of"):
        verify("x", ["length_constraints:number_words"], [{"relation": "about", "num_words": 1}])
    with pytest.raises(ValueError, match="2 instruction ids but 1"):
        verify("x", ["punctuation:no_comma", "detectable_format:title"], [{}])


def test_multiple_constraints_at_once():
    ids = [
        "punctuation:no_comma",
        "change_case:english_lowercase",
        "detectable_format:title",
        "length_constraints:number_words",
    ]
    kw = [{}, {}, {}, {"relation": "at most", "num_words": 6}]
    assert verify("<<a title>>\nshort lowercase body", ids, kw) == [True, True, True, True]
    assert verify("<<a title>>\nshort, Lowercase body here now", ids, kw) == [
        False,
        False,
        True,
        False,
    ]


def test_counts():
    assert count_words("It's a test-case, isn't it?") == 8  # \w+ runs, like IFEval
    assert count_sentences("Dr. Who paid 3.50 dollars. Then left! Why? Because") == 4
    assert count_sentences("") == 0


@pytest.mark.parametrize(
    "ids,kwargs,match",
    [
        # kwargs as one dict instead of a list of dicts
        (
            ["length_constraints:number_words"],
            {"num_words": 3, "relation": "at least"},
            r"kwargs for instructions \['length_constraints:number_words'\] must be a list",
        ),
        (["punctuation:no_comma"], ["not a dict"], "'punctuation:no_comma': kwargs must be a dict"),
        ("punctuation:no_comma", [{}], "instruction_id_list must be a list"),
        # numbers written as words, fractions, booleans
        (
            ["length_constraints:number_words"],
            [{"num_words": "three", "relation": "at least"}],
            "'length_constraints:number_words': kwarg num_words must be a non-negative integer",
        ),
        (
            ["keywords:frequency"],
            [{"keyword": "a", "frequency": 2.5, "relation": "at least"}],
            "frequency",
        ),
        (["detectable_format:number_bullet_lists"], [{"num_bullets": True}], "num_bullets"),
        (["detectable_format:number_bullet_lists"], [{"num_bullets": -1}], "num_bullets"),
        # misspelled keys
        (
            ["length_constraints:number_words"],
            [{"num_word": 3, "relation": "at least"}],
            r"'length_constraints:number_words': unknown kwargs \['num_word'\]",
        ),
        # wrong kinds of values
        (
            ["keywords:existence"],
            [{"keywords": "cat"}],
            "'keywords:existence': kwarg keywords must be a list of strings",
        ),
        (
            ["keywords:letter_frequency"],
            [{"letter": "ab", "let_frequency": 1, "let_relation": "at least"}],
            "kwarg letter must be a single letter",
        ),
        (
            ["change_case:capital_word_frequency"],
            [{"capital_frequency": 1, "capital_relation": "roughly"}],
            "'change_case:capital_word_frequency': kwarg capital_relation must be one of",
        ),
        (["startend:end_checker"], [{"end_phrase": 42}], "kwarg end_phrase must be a string"),
    ],
)
def test_malformed_kwargs_name_the_instruction_and_key(ids, kwargs, match):
    with pytest.raises(ValueError, match=match):
        verify("one two three", ids, kwargs)


def test_lenient_numbers_and_relations():
    iid = ["length_constraints:number_words"]
    for n in ("3", " 3 ", 3.0, 3):
        assert verify("one two three", iid, [{"num_words": n, "relation": "at least"}]) == [True]
    assert verify("one two", iid, [{"num_words": "3", "relation": "At  Least"}]) == [False]


def test_linear_time_on_adversarial_responses():
    # Each of these took minutes before (quadratic regex rescans); linear now.
    n = 200_000
    ps = [{"postscript_marker": "P.S."}]
    assert verify(" " * n + "x", ["detectable_content:postscript"], ps) == [False]
    assert verify(
        "\n" * n + "x", ["detectable_format:number_bullet_lists"], [{"num_bullets": 1}]
    ) == [False]
    assert verify(
        "[" * n, ["detectable_content:number_placeholders"], [{"num_placeholders": 1}]
    ) == [False]
    assert verify("<<" * n + "a", ["detectable_format:title"], [{}]) == [False]
    assert verify("<<" * n + "a>>", ["detectable_format:title"], [{}]) == [True]
    assert count_sentences("." * n + "x") == 1
    assert count_sentences("Wait" + "." * n + " Then. Go") == 3
