"""Math and multiple-choice answer checking.

`extract_answer(text)` finds the final answer in a response (by default, in this order of
preference): the last `\\boxed{...}` / `\\fbox{...}` (nested braces allowed), the last `#### x`
(GSM8K style), the last "the answer is x" / "final answer: x" / "Answer: x".
`is_equivalent(pred, ref)` strips `$`, `\\$`, thousands separators, `%`, trailing plain-text units
and `\\text{...}` units, compares numerically when both sides are plain numbers, and otherwise asks
the `math-verify` library (LaTeX, fractions, expressions, sets) under its own timeout.
`extract_choice` / `choice_equivalent` do the same for multiple-choice letters (MCQA).
"""

from __future__ import annotations

import re
import threading

STYLES = ("boxed", "hash", "answer_is")
_BOXED = re.compile(r"\\(?:boxed|fbox)\s*\{")
_BRACE = re.compile(r"[{}]")
_HASH = re.compile(r"####\s*(.+)")
_ANSWER_IS = re.compile(
    r"(?:the\s+(?:final\s+)?answer\s+is|final\s+answer\s*(?:is\s*)?[:：]|(?<![a-z])answer\s*[:：])",
    re.IGNORECASE,
)
_NUMBER = re.compile(r"^[-+]?(?:\d+(?:\.\d*)?|\.\d+)(?:[eE][-+]?\d+)?$")
_THOUSANDS = re.compile(r"(?<![\d.])(\d{1,3}(?:,\d{3})+)(?![\d])")
_UNIT_TAIL = re.compile(r"^([-+]?[\d.,]+)\s*(?:[a-zA-Z]{2}[a-zA-Z .]*)$")
_TEXT_CMD = re.compile(r"\\(?:text|mbox|mathrm)\s*\{[^{}]*\}")


def _matching_braces(text: str, start: int) -> dict[int, int]:
    """Position of each closed `{` at or after `start` -> position of its matching `}`.

    One pass with a stack, so finding the last balanced box is linear in len(text) (checking
    each `\\boxed{` by scanning to its end was quadratic on unclosed boxes)."""
    closing, stack = {}, []
    for m in _BRACE.finditer(text, start):
        if m.group() == "{":
            stack.append(m.start())
        elif stack:
            closing[stack.pop()] = m.start()
    return closing


def _last_boxed(text: str) -> str | None:
    """Contents of the last `\\boxed{...}` / `\\fbox{...}` whose braces balance; None if none."""
    opens = [m.end() - 1 for m in _BOXED.finditer(text)]
    if not opens:
        return None
    closing = _matching_braces(text, opens[0])
    for brace in reversed(opens):
        if brace in closing:
            return text[brace + 1 : closing[brace]].strip()
    return None


def _clean_sentence_answer(ans: str) -> str:
    """Trim a free-text answer: first line, markdown bold, surrounding `$`, a final period."""
    ans = ans.strip().splitlines()[0] if ans.strip() else ""
    ans = ans.replace("**", "").strip()
    boxed = _last_boxed(ans)
    if boxed is not None:
        return boxed
    ans = ans.rstrip(" .。")
    if ans.startswith("$") and ans.endswith("$") and len(ans) > 1:
        ans = ans.strip("$").strip()
    return ans


def extract_answer(text: str, *, styles: tuple[str, ...] = STYLES) -> str | None:
    """The final answer in `text`, trying the extraction `styles` in order; None if none match."""
    if not text:
        return None
    for style in styles:
        if style == "boxed":
            ans = _last_boxed(text)
        elif style == "hash":
            found = _HASH.findall(text)
            ans = _clean_sentence_answer(found[-1]) if found else None
        elif style == "answer_is":
            found = list(_ANSWER_IS.finditer(text))
            ans = _clean_sentence_answer(text[found[-1].end() :].lstrip(" \t:")) if found else None
        else:
            raise ValueError(f"unknown answer style {style!r}; known: {STYLES}")
        if ans:
            return ans
    return None


def normalize_answer(ans: str) -> str:
    """Strip formatting that never changes a value: `$`, `\\$`, thousands commas, `%`, units."""
    s = ans.strip()
    s = _TEXT_CMD.sub("", s)
    s = s.replace("\\$", "").replace("$", "").replace("\\%", "").replace("%", "")
    s = s.replace("\\!", "").replace("\\,", "").replace("{,}", ",")
    s = _THOUSANDS.sub(lambda m: m.group(1).replace(",", ""), s)
    m = _UNIT_TAIL.match(s.strip())
    if m and _NUMBER.match(m.group(1).replace(",", "")):
        s = m.group(1)
    return s.strip().rstrip(".").strip()


def _as_float(s: str) -> float | None:
    return float(s) if _NUMBER.match(s) else None


def is_equivalent(pred: str | None, ref: str | None, *, timeout_s: int = 5) -> bool:
    """Whether answer `pred` equals reference `ref` (numbers, LaTeX, fractions, expressions).

    math-verify's timeouts use SIGALRM, which only works in a main thread; elsewhere the call runs
    without them (the batch scorer's per-item kill still bounds it).
    """
    if pred is None or ref is None:
        return False
    p, r = normalize_answer(str(pred)), normalize_answer(str(ref))
    if not p or not r:
        return False
    if p == r:
        return True
    fp, fr = _as_float(p), _as_float(r)
    if fp is not None and fr is not None:
        return abs(fp - fr) <= max(1e-6, 1e-9 * abs(fr))
    return _math_verify(p, r, timeout_s)


def _math_verify(p: str, r: str, timeout_s: int) -> bool:
    from math_verify import ExprExtractionConfig, LatexExtractionConfig, parse, verify

    t = timeout_s if threading.current_thread() is threading.main_thread() else None
    cfg = [LatexExtractionConfig(), ExprExtractionConfig()]
    gold = parse(f"${r}$", extraction_config=cfg, parsing_timeout=t)
    got = parse(f"${p}$", extraction_config=cfg, parsing_timeout=t)
    if not gold or not got:
        return False
    return bool(verify(gold, got, timeout_seconds=t))


# ----------------------------------------------------------------------------- multiple choice
# No two adjacent quantifiers can match the same characters: backtracking stays linear (the
# former `answer\s*(?:is)?\s*[:：]?\s*\**\s*` took minutes on "answer" + a few hundred spaces).
_CHOICE_PATTERNS = (
    re.compile(r"\\boxed\s*\{\s*(?:\(\s*)?([A-Z])\s*(?:\)\s*)?\}"),
    re.compile(
        r"answer\s*(?:is\s*)?(?:[:：]\s*)?(?:\*+\s*)?\(?((?-i:[A-Z]))\)?(?![A-Za-z])", re.IGNORECASE
    ),
    re.compile(r"^[^\S\n]*\**\(?([A-Z])\)?\**[^\S\n]*(?:[.)][^\S\n]*)?$", re.MULTILINE),
)


def extract_choice(text: str) -> str | None:
    """The chosen option letter (A-Z) in `text`, from a box, "answer is X", or a lone letter
    line."""
    if not text:
        return None
    for pat in _CHOICE_PATTERNS:
        found = pat.findall(text)
        if found:
            return found[-1].upper()
    return None


def choice_equivalent(pred: str | None, ref: str) -> bool:
    """Whether option letter `pred` is `ref` (case- and bracket-insensitive)."""
    if pred is None:
        return False

    def clean(s):
        return s.strip().strip("()").strip().upper()

    return clean(pred) == clean(ref)
