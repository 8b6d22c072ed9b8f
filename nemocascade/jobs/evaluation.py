"""Held-out evaluation: sample k responses per prompt record, grade them with the records'
verifiers, report pass@1 (the mean score), pass@k and a 95% interval over problems.

One code path grades every evaluation: `sample_and_grade` (generation as `rl.rollouts.sample`
does it, then `grade`: `rewards.grade_batch` with the `thinking` rule and its error mask, through
the run's `rewards.RewardCache` when one is given). The cascade evaluates every domain after each
stage (and within RL stages every `eval_every` steps) through `evaluate_domains`;
`python -m nemocascade.evaluate` (task files, checkpoints, reports) through `sample_and_grade`
(without a cache: every verifier's details are kept) + `task_metrics`.

Task files (`read_task_file`): JSONL in a standard format, detected from the first record's keys
(or named), each record converted to a prompt record (`nemocascade.rewards` has the schema):

    format     keys                                                   verifier   domain
    prompt     messages | prompt, verifier (ours; `data.read_prompt_jsonl`)   as given
    ifeval     prompt, instruction_id_list, kwargs                    instruction  instruction
    humaneval  prompt, test, entry_point (canonical_solution ignored) code       code
    mbpp       text (or prompt), test_list, test_setup_code?          code       code
    mcqa       question, choices | options, answer (or answerKey)     mcqa       mcqa
    math       problem, answer | solution with \\boxed{}              math       math
    gsm8k      question, answer ending in "#### N"                    math       math

Scores: a sample's score is its verifier's, in [0, 1]; it is *correct* when the score is 1.
A grader failure (see `rewards.ERROR_KINDS`) scores 0 and is counted as a verifier error.
"""

from __future__ import annotations

import collections
import dataclasses
import json
import math
import os
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import numpy as np
from flax import nnx

from nemocascade import data as nc_data
from nemocascade import rewards as rw
from nemocascade.generate import generate
from nemocascade.rewards.math import extract_answer
from nemocascade.rl import rollouts as ro

Z95 = 1.959963984540054  # the standard normal's 97.5% quantile
MATH_INSTRUCTION = "Please reason step by step, and put your final answer within \\boxed{}."
CODE_INSTRUCTION = (
    "Write the complete Python program (the imports, any helper functions given, and the "
    "completed function) in one ```python code block."
)
MCQA_INSTRUCTION = "Answer with the letter of the correct option, within \\boxed{}."


@dataclasses.dataclass(frozen=True)
class EvalConfig:
    """The `eval` section: `n_samples` responses per prompt at `temperature` / `top_p` (pass@1
    estimated from k samples, the paper's avg@k protocol), up to `max_new_tokens` each."""

    n_samples: int
    temperature: float
    top_p: float
    max_new_tokens: int
    thinking: bool

    def __post_init__(self):
        if self.n_samples < 1 or self.max_new_tokens < 1:
            raise ValueError(
                f"n_samples and max_new_tokens must be >= 1, got {self.n_samples}, "
                f"{self.max_new_tokens}"
            )
        if self.temperature < 0 or not 0 < self.top_p <= 1:
            raise ValueError(f"need temperature >= 0 and 0 < top_p <= 1, got {self}")


# ============================================================================ task files
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
                raise nc_data.DataError(f"{path}:{lineno}: not valid UTF-8 ({e.reason})") from None
            if not text.strip():
                continue
            try:
                out.append((lineno, json.loads(text)))
            except json.JSONDecodeError as e:
                raise nc_data.DataError(
                    f"{path}:{lineno}:{e.pos + 1}: invalid JSON: {e.msg}"
                ) from None
    if not out:
        raise nc_data.DataError(f"{path}: no records (the file is empty or blank)")
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
            raise nc_data.DataError(
                f"{path}:{first_line}: cannot tell the task format from keys {keys}; "
                f"name it (one of {', '.join(FORMATS)})"
            )
        fmt = found
    if fmt == "prompt":  # ours: the data package validates it (and skips over-long lines)
        records, skipped = nc_data.read_prompt_jsonl(path)
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
            raise nc_data.DataError(f"{path}:{lineno}: {e}") from None
    return records, fmt


def _with_id(record: dict, default: str, raw: Mapping | None = None) -> dict:
    """`record` with an `id`: the source's (`raw`, else the record's) task_id / id / key, else
    `default` (file:line)."""
    src = record if raw is None else raw
    found = next((src[k] for k in _ID_KEYS if isinstance(src.get(k), str | int)), None)
    return {**record, "id": default if found is None else str(found)}


# ============================================================================ sampling + grading
@dataclasses.dataclass
class EvalSamples:
    """Every sample of one evaluation; rows problem-major (problem i, sample j -> i*n + j)."""

    records: list[dict]  # one per problem
    n: int
    responses: list[str]  # decoded, without the eos token
    response_tokens: np.ndarray  # [R] int32, generated tokens including eos
    finished: np.ndarray  # [R] bool: ended with eos / stop (not cut at max_new_tokens)
    scores: np.ndarray  # [R] float32 in [0, 1]; 0 where `errors`
    errors: np.ndarray  # [R] bool: the grader failed (no verdict)
    details: list[dict]  # [R] the verifier's details (`error_kind` / `error` for errors)

    @staticmethod
    def concat(parts: Sequence[EvalSamples]) -> EvalSamples:
        return EvalSamples(
            [r for p in parts for r in p.records],
            parts[0].n,
            [s for p in parts for s in p.responses],
            np.concatenate([p.response_tokens for p in parts]),
            np.concatenate([p.finished for p in parts]),
            np.concatenate([p.scores for p in parts]),
            np.concatenate([p.errors for p in parts]),
            [d for p in parts for d in p.details],
        )


def grade(
    records: Sequence[dict],
    responses: Sequence[str],
    finished: Sequence[bool],
    *,
    thinking: bool,
    num_workers: int,
    timeout_s: float = 30.0,
    reward_cache: rw.RewardCache | None = None,
) -> tuple[np.ndarray, np.ndarray, list[dict]]:
    """(scores float32, errors bool, details) of each response; each distinct (record, response,
    finished) is graded once by `rewards.grade_batch`. With `reward_cache` the verdicts go
    through it (memoised across calls; the details then hold only `reward_status`)."""
    if reward_cache is not None:
        res = reward_cache.score(
            records,
            responses,
            finished,
            num_workers=num_workers,
            timeout_s=timeout_s,
            thinking=thinking,
        )
        errors = np.asarray(res.errors, bool)
        details = [{"reward_status": "error" if e else "ok"} for e in errors]
        return np.asarray(res.scores, np.float32), errors, details
    keys = [
        rw.RewardCache.key(r, s, bool(f), thinking)
        for r, s, f in zip(records, responses, finished, strict=True)
    ]
    first: dict[str, int] = {}
    for i, k in enumerate(keys):
        first.setdefault(k, i)
    idx = list(first.values())
    res = rw.grade_batch(
        [records[i] for i in idx],
        [responses[i] for i in idx],
        [bool(finished[i]) for i in idx],
        num_workers=num_workers,
        timeout_s=timeout_s,
        thinking=thinking,
    )
    slot = {k: j for j, k in enumerate(first)}
    at = [slot[k] for k in keys]
    scores = np.array([res.scores[j] for j in at], np.float32)
    errors = np.array([res.errors[j] for j in at], bool)
    return scores, errors, [res.details[j] for j in at]


def _sample_batch(graphdef, state, tokenizer, records, cfg, *, seed, num_workers, mesh, cache):
    """Generate (exactly as `rl.rollouts.sample`) and grade one batch of prompt records."""
    prompts = ro.render_prompts(tokenizer, records, thinking=cfg.thinking)
    eos, n = tokenizer.im_end_id, cfg.n_samples
    res = generate(
        (graphdef, state),
        prompts,
        max_new_tokens=cfg.max_new_tokens,
        temperature=cfg.temperature,
        top_p=cfg.top_p,
        top_k=0,
        seed=seed,
        eos_id=eos,
        n=n,
        pad_id=tokenizer.pad_id,
        mesh=mesh,
    )
    rows = len(prompts) * n
    if not np.array_equal(res.prompt_index[:rows], np.repeat(np.arange(len(prompts)), n)):
        raise AssertionError("generate: rows are not prompt-major")
    ids = [res.tokens[r, : res.lengths[r]].tolist() for r in range(rows)]
    finished = np.array([f != "length" for f in res.finish_reason[:rows]])
    texts = [
        tokenizer.decode(t[:-1] if fin and t and t[-1] == eos else t)
        for t, fin in zip(ids, finished, strict=True)
    ]
    recs = [r for r in records for _ in range(n)]
    scores, errors, details = grade(
        recs, texts, finished, thinking=cfg.thinking, num_workers=num_workers, reward_cache=cache
    )
    lengths = np.asarray(res.lengths[:rows], np.int32)
    return EvalSamples(list(records), n, texts, lengths, finished, scores, errors, details)


def batch_seed(seed: int, index: int) -> int:
    """The sampling seed of the `index`-th prompt batch: `seed` for the first (so one batch is
    exactly `rl.rollouts.sample`), a distinct derived seed for the others."""
    if index == 0:
        return int(seed)
    return int(np.random.SeedSequence([int(seed), int(index)]).generate_state(1)[0] >> 1)


def sample_and_grade(
    graphdef: nnx.GraphDef,
    state: nnx.State,
    tokenizer,
    records: Sequence[dict],
    cfg: EvalConfig,
    *,
    seed: int,
    num_workers: int = 2,
    mesh=None,
    batch_size: int = 0,
    on_batch: Callable[[EvalSamples], None] | None = None,
    reward_cache: rw.RewardCache | None = None,
) -> EvalSamples:
    """`cfg.n_samples` responses per record, graded by `grade` (the `thinking` rule applies in
    thinking mode). `batch_size` > 0 generates that many prompts at a time (batch b samples with
    `batch_seed(seed, b)`); `on_batch` gets the samples so far after each batch."""
    records = list(records)
    step = batch_size if batch_size > 0 else max(1, len(records))
    parts: list[EvalSamples] = []
    for b, start in enumerate(range(0, len(records), step)):
        parts.append(
            _sample_batch(
                graphdef,
                state,
                tokenizer,
                records[start : start + step],
                cfg,
                seed=batch_seed(seed, b),
                num_workers=num_workers,
                mesh=mesh,
                cache=reward_cache,
            )
        )
        if on_batch is not None:
            on_batch(EvalSamples.concat(parts))
    if not parts:
        raise ValueError("sample_and_grade: no records to evaluate")
    return EvalSamples.concat(parts)


# ============================================================================ metrics
def pass_at_k(n: int, c: int, k: int) -> float:
    """The unbiased pass@k of a problem with `c` correct of `n` samples: 1 - C(n-c, k) / C(n, k)
    (the probability that k of the n samples, drawn without replacement, hold a correct one)."""
    if not (0 <= c <= n and 1 <= k <= n):
        raise ValueError(f"pass_at_k: need 0 <= c <= n and 1 <= k <= n, got n={n} c={c} k={k}")
    if n - c < k:
        return 1.0
    return 1.0 - math.comb(n - c, k) / math.comb(n, k)


def mean_ci95(values: Sequence[float]) -> tuple[float, float | None, float | None]:
    """(mean, low, high): the normal 95% interval mean +- 1.96 * s / sqrt(P) over the P values
    (s the sample standard deviation), clipped to [0, 1]; no interval (None) when P < 2."""
    v = np.asarray(values, np.float64)
    if v.size == 0:
        raise ValueError("mean_ci95: no values")
    m = float(v.mean())
    if v.size < 2:
        return m, None, None
    half = Z95 * float(v.std(ddof=1)) / math.sqrt(v.size)
    return m, max(0.0, m - half), min(1.0, m + half)


def _pct(x: float | None) -> float | None:
    return None if x is None else round(100.0 * x, 2)


def task_metrics(s: EvalSamples) -> dict[str, Any]:
    """Per-task summary, scores in percent: pass@1 (the mean score, errors as 0) with its 95%
    interval over problems (`mean_ci95` of the per-problem mean scores), pass@k for k in {1, n}
    (`pass_at_k`, a sample is correct when it scores 1), pass@1 over the graded samples only,
    verifier errors (total and by kind), mean response length (tokens), truncation rate."""
    p, n = len(s.records), s.n
    scores = s.scores.astype(np.float64).reshape(p, n)
    correct = ((scores >= 1.0) & ~s.errors.reshape(p, n)).sum(axis=1)
    mean, low, high = mean_ci95(scores.mean(axis=1))
    kinds = collections.Counter(
        d.get("error_kind", "unknown") for d, e in zip(s.details, s.errors, strict=True) if e
    )
    graded = s.scores[~s.errors]
    return {
        "n_problems": p,
        "n_samples": n,
        "pass@1": _pct(mean),
        "ci95": {"low": _pct(low), "high": _pct(high), "method": "normal, over problems"},
        "pass@k": {
            str(k): _pct(float(np.mean([pass_at_k(n, int(c), k) for c in correct])))
            for k in sorted({1, n})
        },
        "pass@1_graded_only": _pct(float(graded.mean())) if graded.size else None,
        "verifier_errors": int(s.errors.sum()),
        "verifier_errors_by_kind": dict(sorted(kinds.items())),
        "mean_response_tokens": round(float(s.response_tokens.mean()), 2),
        "truncation_rate": _pct(float((~s.finished).mean())),
    }


# ============================================================================ the cascade's hook
def evaluate_domains(
    graphdef: nnx.GraphDef,
    state: nnx.State,
    tokenizer,
    eval_sets: Mapping[str, Sequence[dict]],
    cfg: EvalConfig,
    *,
    seed: int,
    reward_cache: rw.RewardCache | None = None,
    num_workers: int = 2,
    mesh=None,
) -> dict[str, float]:
    """{domain: score in percent} over each domain's held-out prompt records: the mean score of
    every sample (a grader failure counts 0), one generation batch per domain: the numbers
    `rl.rollouts.sample` gives for the same arguments."""
    out = {}
    for domain, records in eval_sets.items():
        s = sample_and_grade(
            graphdef,
            state,
            tokenizer,
            records,
            cfg,
            seed=seed,
            num_workers=num_workers,
            mesh=mesh,
            reward_cache=reward_cache,
        )
        out[domain] = round(100.0 * float(s.scores.mean()), 2)
    return out
