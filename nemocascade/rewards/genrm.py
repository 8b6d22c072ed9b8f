"""The generative pairwise judge's pieces (GenRM, Cascade 2's RLHF reward): the judge prompt
template, verdict parsing, the both-orders comparison plan, win rates, and a judge that generates
with a NemotronH. `reward_models.PairwiseJudgeScorer` puts them together.

Verdict formats (`parse_verdict`, case and whitespace insensitive, on the text after the judge's
last `</think>`):
  1. a label `[[A]]`, `[[B]]`, `[[TIE]]` (or `[[C]]`, MT-Bench's tie); the last one counts;
  2. else scores for both, `A: 7/10, B: 4/10`, `Response A: 7.5`, `Assistant B score = 4`
     (an optional `/ max` divides); the last score of each counts; the higher wins, equal ties;
  3. anything else is unparseable (None): the scorer counts it as a tie and in a metric.
The patterns have no nested or adjacent unbounded repeats: parsing is linear in the text.

Comparisons: every unordered pair of a group's responses in BOTH orders (`comparison_plan`), so a
judge's preference for a position cancels; a win is 1, a tie (or unparseable verdict) 0.5, a loss
0, and a response's reward is its mean over its 2 (G - 1) comparisons (`win_rates`).
"""

from __future__ import annotations

import re
import string
from collections.abc import Sequence
from typing import Literal

import numpy as np
from flax import nnx

from nemocascade.data.chat import render_prompt
from nemocascade.data.tokenizer import Tokenizer
from nemocascade.generate import generate

TEMPLATE_FIELDS = ("question", "response_a", "response_b")
DEFAULT_JUDGE_TEMPLATE = (
    "Compare two responses to the question below and decide which one is more helpful.\n\n"
    "[Question]\n{question}\n\n[Response A]\n{response_a}\n\n[Response B]\n{response_b}\n\n"
    'End with your verdict: "[[A]]" if Response A is better, "[[B]]" if Response B is '
    'better, or "[[TIE]]".'
)


def check_template(template: str) -> None:
    """ValueError unless `template` is a format string whose fields are exactly
    {question}, {response_a} and {response_b}."""
    try:
        fields = {f for _, f, _, _ in string.Formatter().parse(template) if f is not None}
    except ValueError as e:
        raise ValueError(f"judge_template is not a format string: {e}") from None
    missing = sorted(set(TEMPLATE_FIELDS) - fields)
    unknown = sorted(fields - set(TEMPLATE_FIELDS))
    if missing or unknown:
        raise ValueError(
            f"judge_template: fields missing {missing}, unknown {unknown}; it must use exactly "
            "{question}, {response_a} and {response_b} (write {{ and }} for literal braces)"
        )


_LABEL = re.compile(r"\[\[[ \t]*(A|B|TIE|C)[ \t]*\]\]", re.IGNORECASE)
_SCORE = re.compile(
    r"(?<![A-Za-z])(?:(?:response|assistant)[ \t]*)?([AB])[ \t]*(?:score[ \t]*)?[:=][ \t]*"
    r"(\d{1,4}(?:\.\d{1,4})?)(?:[ \t]*/[ \t]*(\d{1,4}(?:\.\d{1,4})?))?",
    re.IGNORECASE,
)

Verdict = Literal["A", "B", "tie"]


def parse_verdict(text: str) -> Verdict | None:
    """The verdict of a judge's output: "A", "B", "tie", or None when none can be read (see the
    module docstring). Linear in the length of `text`."""
    if "</think>" in text:
        text = text.rsplit("</think>", 1)[1]
    labels = _LABEL.findall(text)
    if labels:
        label = labels[-1].upper()
        return label if label in ("A", "B") else "tie"
    scores: dict[str, float] = {}
    for side, value, top in _SCORE.findall(text):
        v = float(value)
        if top:
            if float(top) == 0:
                continue
            v /= float(top)
        scores[side.upper()] = v
    if len(scores) == 2:
        a, b = scores["A"], scores["B"]
        return "A" if a > b else "B" if b > a else "tie"
    return None


def comparison_plan(num_groups: int, group_size: int) -> list[tuple[int, int]]:
    """Every ordered pair (first, second) of distinct rows within each group: each unordered
    pair in both orders, rows prompt-major."""
    return [
        (g * group_size + i, g * group_size + j)
        for g in range(num_groups)
        for i in range(group_size)
        for j in range(group_size)
        if i != j
    ]


def win_rates(
    plan: Sequence[tuple[int, int]], verdicts: Sequence[Verdict | None], num_rows: int
) -> np.ndarray:
    """Each row's mean outcome over its comparisons (win 1, tie or unparseable 0.5, loss 0);
    0.5 for a row in no comparison."""
    score = np.zeros(num_rows, np.float64)
    games = np.zeros(num_rows, np.float64)
    for (first, second), v in zip(plan, verdicts, strict=True):
        s = 1.0 if v == "A" else 0.0 if v == "B" else 0.5
        score[first] += s
        score[second] += 1.0 - s
        games[first] += 1
        games[second] += 1
    return np.where(games > 0, score / np.maximum(games, 1), 0.5).astype(np.float32)


class GenerateJudge:
    """A judge callable: judge prompt texts -> verdict texts, by greedy (by default) generation
    with a NemotronH, `batch_size` prompts per `generate` call (0: one call). With `thinking`
    the prompt opens `<think>` and only the text after `</think>` is returned ("" if the judge
    never closes it: unparseable). `calls` counts the generate calls."""

    def __init__(
        self,
        model,
        tokenizer: Tokenizer,
        *,
        max_new_tokens: int = 256,
        thinking: bool = False,
        temperature: float = 0.0,
        top_p: float = 1.0,
        seed: int = 0,
        batch_size: int = 0,
        mesh=None,
    ):
        self.model = nnx.split(model) if isinstance(model, nnx.Module) else model
        self.tokenizer, self.mesh = tokenizer, mesh
        self.max_new_tokens, self.thinking = max_new_tokens, thinking
        self.temperature, self.top_p, self.seed = temperature, top_p, seed
        self.batch_size = batch_size
        self.calls = 0

    def __call__(self, texts: Sequence[str]) -> list[str]:
        tok = self.tokenizer
        ids = [render_prompt(tok, t, thinking=self.thinking) for t in texts]
        step = self.batch_size or max(len(ids), 1)
        out: list[str] = []
        for i in range(0, len(ids), step):
            res = generate(
                self.model,
                ids[i : i + step],
                max_new_tokens=self.max_new_tokens,
                temperature=self.temperature,
                top_p=self.top_p,
                seed=self.seed,
                eos_id=tok.im_end_id,
                pad_id=tok.pad_id,
                mesh=self.mesh,
                bucket_batch=True,
            )
            self.calls += 1
            for r in range(len(res.lengths)):
                row = res.tokens[r, : res.lengths[r]].tolist()
                if row and row[-1] == tok.im_end_id:
                    row = row[:-1]
                out.append(tok.decode(row))
        if self.thinking:
            out = [o.rsplit("</think>", 1)[1] if "</think>" in o else "" for o in out]
        return out
