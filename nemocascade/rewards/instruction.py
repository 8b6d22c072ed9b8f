"""IFEval-style verifiable instruction-following constraints.

`verify(response, instruction_id_list, kwargs_list)` checks each instruction against the response
and returns a list of True / False, or None for an id this module does not support. The ids and
keyword arguments are IFEval's (google-research `instruction_following_eval`), strict variant;
keys whose value is None are ignored, so the dataset's padded kwargs dicts work unchanged.
Relations accept IFEval's "less than" / "at least" and also "at most", "more than", "exactly".

Keyword arguments are checked before any instruction runs; a bad one is a ValueError that names
the instruction id and the key (the batch scorer reports the record as malformed, never as a
wrong answer):
  * `kwargs_list` must be a list with one dict (or None) per instruction id; a lone dict is
    refused rather than guessed at;
  * a key with a non-None value that the instruction does not take is refused (it is usually a
    misspelling: "num_word" for "num_words");
  * counts (`num_words`, `frequency`, ...) are non-negative integers; integral floats (3.0) and
    strings of digits ("3") are accepted, numbers written as words ("three"), fractions and
    booleans are refused;
  * relations are one of the five above (case and spacing ignored); a `letter` is one character;
    phrases and words are strings; `keywords` / `forbidden_words` are lists of strings (a bare
    string is refused: it would be read letter by letter).

Covered: all 25 IFEval ids, plus the extension `startend:start_checker` (kwarg `start_phrase`).
Where IFEval uses a library we do not depend on, we approximate and say so:
  * words are `\\w+` runs (IFEval's RegexpTokenizer) and sentences come from a regex splitter that
    skips common abbreviations and decimals (IFEval uses its own splitter);
  * `language:response_language` is decided by writing system, and only for languages whose
    script no other IFEval language shares (ko, ja, zh, th, he, el, bn, ta, te, kn, gu, pa, ml,
    hy, ka, am); for any other language it returns None rather than guess;
  * "English" in `change_case:english_*` means at least 90% of the letters are ASCII.
"""

from __future__ import annotations

import collections
import json
import re
import unicodedata

_RELATIONS = {
    "less than": lambda a, n: a < n,
    "at least": lambda a, n: a >= n,
    "at most": lambda a, n: a <= n,
    "more than": lambda a, n: a > n,
    "exactly": lambda a, n: a == n,
}
_ABBREV = r"(?<!\bMr)(?<!\bMrs)(?<!\bMs)(?<!\bDr)(?<!\bSt)(?<!\bvs)(?<!\be\.g)(?<!\bi\.e)(?<!\betc)"
# A sentence end starts where a run of . ! ? starts (the lookbehind): trying every position inside
# a long run of dots made the split quadratic.
_SENT_END = re.compile(_ABBREV + r"(?<![.!?])[.!?]++[\"')\]]*(?=\s|$)")
# Unicode script name fragments for languages whose script is theirs alone among IFEval languages.
_SCRIPT_LANG = {
    "ko": ("HANGUL",),
    "ja": ("HIRAGANA", "KATAKANA"),
    "zh": ("CJK",),
    "th": ("THAI",),
    "he": ("HEBREW",),
    "el": ("GREEK",),
    "bn": ("BENGALI",),
    "ta": ("TAMIL",),
    "te": ("TELUGU",),
    "kn": ("KANNADA",),
    "gu": ("GUJARATI",),
    "pa": ("GURMUKHI",),
    "ml": ("MALAYALAM",),
    "hy": ("ARMENIAN",),
    "ka": ("GEORGIAN",),
    "am": ("ETHIOPIC",),
}


def _compare(relation: str, actual: int, n: int) -> bool:
    if relation not in _RELATIONS:
        raise ValueError(f"relation must be one of {sorted(_RELATIONS)}, got {relation!r}")
    return _RELATIONS[relation](actual, int(n))


def count_words(text: str) -> int:
    return len(re.findall(r"\w+", text))


def count_sentences(text: str) -> int:
    """Sentences: text pieces ended by . ! ? (not after common abbreviations or inside decimals)."""
    pieces = _SENT_END.split(text)
    return sum(1 for p in pieces if re.search(r"\w", p))


def _english_letters(text: str) -> bool:
    letters = [c for c in text if c.isalpha()]
    return bool(letters) and sum(c.isascii() for c in letters) >= 0.9 * len(letters)


def _language(text: str, language: str) -> bool | None:
    scripts = _SCRIPT_LANG.get(language)
    if scripts is None:
        return None
    names = collections.Counter()
    for c in text:
        if c.isalpha():
            name = unicodedata.name(c, "")
            names[name.split(" ")[0]] += 1
    total = sum(names.values())
    if language == "ja":  # kana must appear; kanji (CJK) count toward Japanese too
        return (
            names["HIRAGANA"] + names["KATAKANA"] > 0
            and (names["HIRAGANA"] + names["KATAKANA"] + names["CJK"]) >= 0.5 * total
        )
    if language == "zh" and names["HIRAGANA"] + names["KATAKANA"] > 0:
        return False
    return total > 0 and sum(names[s] for s in scripts) >= 0.5 * total


def _paragraphs_stars(text: str, num_paragraphs: int) -> bool:
    parts = re.split(r"\s?\*\*\*\s?", text)
    n = len(parts)
    for i, p in enumerate(parts):
        if not p.strip():
            if i in (0, len(parts) - 1):
                n -= 1
            else:
                return False
    return n == int(num_paragraphs)


def _nth_paragraph_first_word(text, num_paragraphs, nth_paragraph, first_word) -> bool:
    """IFEval's rule: paragraphs split on blank lines; the n-th (counting empty ones in the index,
    not in the total) must start with `first_word` (leading quotes dropped, cut at punctuation)."""
    paragraphs = re.split(r"\n\n", text)
    count = sum(1 for p in paragraphs if p.strip())
    nth = int(nth_paragraph)
    if not 1 <= nth <= count:
        return False
    paragraph = paragraphs[nth - 1].strip()
    if not paragraph:
        return False
    word = paragraph.split()[0].strip().lstrip("'").lstrip('"')
    word = re.split(r"[.,?!'\"]", word)[0].lower()
    return count == int(num_paragraphs) and word == first_word.strip().lower()


def _postscript(text: str, postscript_marker: str) -> bool:
    marker = postscript_marker.strip()
    # (IFEval's patterns start with `\s*`, which a search does not need and which made it
    # quadratic on long runs of blanks.)
    if marker == "P.P.S":
        pat = r"p\.\s?p\.\s?s.*$"
    elif marker == "P.S.":
        pat = r"p\.\s?s\..*$"
    else:
        pat = re.escape(marker.lower()) + r".*$"
    return re.search(pat, text.lower(), flags=re.MULTILINE) is not None


def _bullets(text: str, num_bullets: int) -> bool:
    # Leading blanks, not `\s*` (IFEval's), which rescanned every following blank line: the
    # same bullets are counted, in linear time.
    stars = re.findall(r"^[^\S\n]*\*[^\*].*$", text, flags=re.MULTILINE)
    dashes = re.findall(r"^[^\S\n]*-.*$", text, flags=re.MULTILINE)
    return len(stars) + len(dashes) == int(num_bullets)


def _highlights(text: str, num_highlights: int) -> bool:
    single = [h for h in re.findall(r"\*[^\n\*]*\*", text) if h.strip("*").strip()]
    double = [h for h in re.findall(r"\*\*[^\n\*]*\*\*", text) if h[2:-2].strip()]
    return len(single) + len(double) >= int(num_highlights)


def _sections(text: str, section_spliter: str, num_sections: int) -> bool:
    parts = re.split(r"\s?" + re.escape(section_spliter.strip()) + r"\s?\d+\s?", text)
    return len(parts) - 1 >= int(num_sections)


def _json_only(text: str) -> bool:
    body = text.strip()
    for fence in ("```json", "```Json", "```JSON", "```"):
        if body.startswith(fence):
            body = body[len(fence) :]
            break
    body = body.removesuffix("```").strip()
    try:
        json.loads(body)
    except (ValueError, RecursionError):
        return False
    return True


def _title(text: str) -> bool:
    """A `<<title>>` on one line: IFEval's `<<[^\\n]+>>` (greedy: first << to last >> of a line)
    with a non-blank title, found without the regex's quadratic rescans of long lines."""
    for line in text.split("\n"):
        i, j = line.find("<<"), line.rfind(">>")
        if i >= 0 and j >= i + 3 and line[i + 2 : j].strip():
            return True
    return False


def _placeholders(text: str) -> int:
    """Count of IFEval's `\\[.*?\\]` matches (a `[`, then the first `]` on the same line), found
    in linear time."""
    n = 0
    for line in text.split("\n"):
        pos = 0
        while (i := line.find("[", pos)) >= 0 and (j := line.find("]", i + 1)) >= 0:
            n, pos = n + 1, j + 1
    return n


def _two_responses(text: str) -> bool:
    parts = text.split("******")
    valid = []
    for i, p in enumerate(parts):
        if not p.strip():
            if i not in (0, len(parts) - 1):
                return False
        else:
            valid.append(p.strip())
    return len(valid) == 2 and valid[0] != valid[1]


def _capital_words(text: str, capital_frequency: int, capital_relation: str) -> bool:
    words = re.findall(r"\w+", text)
    return _compare(capital_relation, sum(w.isupper() for w in words), capital_frequency)


def _keywords_exist(text: str, keywords: list[str]) -> bool:
    return all(re.search(re.escape(k), text, flags=re.IGNORECASE) for k in keywords)


def _keyword_frequency(text: str, keyword: str, frequency: int, relation: str) -> bool:
    n = len(re.findall(re.escape(keyword), text, flags=re.IGNORECASE))
    return _compare(relation, n, frequency)


def _forbidden(text: str, forbidden_words: list[str]) -> bool:
    return not any(
        re.search(r"\b" + re.escape(w) + r"\b", text, flags=re.IGNORECASE) for w in forbidden_words
    )


def _letter_frequency(text: str, letter: str, let_frequency: int, let_relation: str) -> bool:
    return _compare(let_relation, text.lower().count(letter.lower()), let_frequency)


_CONSTRAINED = ("My answer is yes.", "My answer is no.", "My answer is maybe.")

# id -> (check(text, **kwargs), required kwarg names)
CHECKS = {
    "keywords:existence": (_keywords_exist, ("keywords",)),
    "keywords:frequency": (_keyword_frequency, ("keyword", "frequency", "relation")),
    "keywords:forbidden_words": (_forbidden, ("forbidden_words",)),
    "keywords:letter_frequency": (_letter_frequency, ("letter", "let_frequency", "let_relation")),
    "language:response_language": (_language, ("language",)),
    "length_constraints:number_sentences": (
        lambda t, num_sentences, relation: _compare(relation, count_sentences(t), num_sentences),
        ("num_sentences", "relation"),
    ),
    "length_constraints:number_paragraphs": (_paragraphs_stars, ("num_paragraphs",)),
    "length_constraints:number_words": (
        lambda t, num_words, relation: _compare(relation, count_words(t), num_words),
        ("num_words", "relation"),
    ),
    "length_constraints:nth_paragraph_first_word": (
        _nth_paragraph_first_word,
        ("num_paragraphs", "nth_paragraph", "first_word"),
    ),
    "detectable_content:number_placeholders": (
        lambda t, num_placeholders: _placeholders(t) >= num_placeholders,
        ("num_placeholders",),
    ),
    "detectable_content:postscript": (_postscript, ("postscript_marker",)),
    "detectable_format:number_bullet_lists": (_bullets, ("num_bullets",)),
    "detectable_format:constrained_response": (
        lambda t: any(o in t.strip() for o in _CONSTRAINED),
        (),
    ),
    "detectable_format:number_highlighted_sections": (_highlights, ("num_highlights",)),
    "detectable_format:multiple_sections": (_sections, ("section_spliter", "num_sections")),
    "detectable_format:json_format": (_json_only, ()),
    "detectable_format:title": (_title, ()),
    "combination:two_responses": (_two_responses, ()),
    "combination:repeat_prompt": (
        lambda t, prompt_to_repeat: t.strip().lower().startswith(prompt_to_repeat.strip().lower()),
        ("prompt_to_repeat",),
    ),
    "startend:end_checker": (
        lambda t, end_phrase: t.strip().strip('"').lower().endswith(end_phrase.strip().lower()),
        ("end_phrase",),
    ),
    "startend:start_checker": (
        lambda t, start_phrase: t.strip().lower().startswith(start_phrase.strip().lower()),
        ("start_phrase",),
    ),
    "startend:quotation": (
        lambda t: len(t.strip()) > 1 and t.strip()[0] == t.strip()[-1] == '"',
        (),
    ),
    "change_case:capital_word_frequency": (
        _capital_words,
        ("capital_frequency", "capital_relation"),
    ),
    "change_case:english_capital": (lambda t: t.isupper() and _english_letters(t), ()),
    "change_case:english_lowercase": (lambda t: t.islower() and _english_letters(t), ()),
    "punctuation:no_comma": (lambda t: "," not in t, ()),
}


_COUNT_KEYS = frozenset(
    {
        "frequency",
        "let_frequency",
        "num_sentences",
        "num_paragraphs",
        "num_words",
        "nth_paragraph",
        "num_placeholders",
        "num_bullets",
        "num_highlights",
        "num_sections",
        "capital_frequency",
    }
)
_RELATION_KEYS = frozenset({"relation", "let_relation", "capital_relation"})
_LIST_KEYS = frozenset({"keywords", "forbidden_words"})


def _coerce(instruction_id: str, key: str, value):
    """`value` checked (and converted) for keyword `key`; ValueError naming the id and key."""

    def bad(what: str) -> ValueError:
        return ValueError(
            f"instruction {instruction_id!r}: kwarg {key} must be {what}, got {value!r:.80}"
        )

    if key in _COUNT_KEYS:
        if isinstance(value, bool):
            raise bad("a non-negative integer")
        if isinstance(value, float) and value.is_integer():
            value = int(value)
        elif isinstance(value, str) and re.fullmatch(r"\s*\+?\d+\s*", value):
            value = int(value)
        if not isinstance(value, int) or value < 0:
            raise bad("a non-negative integer (digits, not words)")
        return value
    if key in _RELATION_KEYS:
        rel = " ".join(value.lower().split()) if isinstance(value, str) else None
        if rel not in _RELATIONS:
            raise bad(f"one of {sorted(_RELATIONS)}")
        return rel
    if key in _LIST_KEYS:
        if not isinstance(value, (list, tuple)) or not all(isinstance(v, str) for v in value):
            raise bad("a list of strings")
        return list(value)
    if not isinstance(value, str):
        raise bad("a string")
    if key == "letter" and len(value.strip()) != 1:
        raise bad("a single letter")
    return value


def check_one(response: str, instruction_id: str, kwargs: dict | None) -> bool | None:
    """One instruction's verdict; None if `instruction_id` is unsupported.

    Raises ValueError naming the id and the key when a keyword argument is missing, unknown or of
    the wrong kind (see the module docstring).
    """
    if not isinstance(instruction_id, str):
        raise ValueError(f"instruction ids must be strings, got {instruction_id!r:.80}")
    if instruction_id not in CHECKS:
        return None
    if kwargs is not None and not isinstance(kwargs, dict):
        raise ValueError(
            f"instruction {instruction_id!r}: kwargs must be a dict or None, got "
            f"{type(kwargs).__name__}"
        )
    fn, required = CHECKS[instruction_id]
    given = {k: v for k, v in (kwargs or {}).items() if v is not None}
    unknown = sorted(str(k) for k in given if k not in required)
    if unknown:
        raise ValueError(
            f"instruction {instruction_id!r}: unknown kwargs {unknown} (takes {list(required)})"
        )
    missing = [k for k in required if k not in given]
    if missing:
        raise ValueError(f"instruction {instruction_id!r}: missing kwargs {missing}")
    return fn(response, **{k: _coerce(instruction_id, k, given[k]) for k in required})


def verify(
    response: str, instruction_id_list: list[str], kwargs_list: list[dict | None]
) -> list[bool | None]:
    """Per-instruction verdicts (True / False / None for unsupported ids), IFEval strict.

    ValueError (naming the instruction and the key) for malformed ids or kwargs."""
    if not isinstance(instruction_id_list, (list, tuple)):
        raise ValueError(
            f"instruction_id_list must be a list of ids, got {type(instruction_id_list).__name__}"
        )
    if not isinstance(kwargs_list, (list, tuple)):
        raise ValueError(
            f"kwargs for instructions {list(instruction_id_list)} must be a list with one dict "
            f"per instruction, got {type(kwargs_list).__name__}"
        )
    if len(kwargs_list) != len(instruction_id_list):
        raise ValueError(
            f"{len(instruction_id_list)} instruction ids but {len(kwargs_list)} kwargs dicts"
        )
    return [
        check_one(response, i, k) for i, k in zip(instruction_id_list, kwargs_list, strict=True)
    ]
