"""Evaluation library: task formats -> prompt records (checked through the verifiers), grading,
the pass@k estimator and interval, and the cascade's `evaluate_domains` against rollouts."""

import json
import math
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from nemocascade import data as nc_data
from nemocascade import rewards as rw
from nemocascade.jobs import evaluation as ev
from nemocascade.model import ModelConfig, NemotronH
from nemocascade.rewards import task_formats as tf
from nemocascade.rl import rollouts as ro
from nemocascade.train.state import split_model

DATA = Path(__file__).parent / "data"


def _write(tmp_path, name, rows):
    path = tmp_path / name
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows))
    return path


def _grade(records, responses):
    scores, errors, details = ev.grade(
        records, responses, [True] * len(records), thinking=False, num_workers=0
    )
    assert not errors.any(), details
    return scores.tolist()


# ----------------------------------------------------------------------------- formats
GSM8K = {"question": "Tom has 2 apples and buys 3. How many?", "answer": "2+3=5\n#### 5"}
MATH_BOXED = {"problem": "Half of one?", "solution": "It is $\\boxed{\\frac{1}{2}}$.", "level": 1}
MATH_ANSWER = {"problem": "3 + 4?", "answer": "7", "unique_id": "m/1"}
MBPP = {
    "task_id": 11,
    "text": "Write a function to find the square root of a number, rounded down.",
    "code": "import math\ndef isqrt(x):\n    return math.floor(math.sqrt(x))",
    "test_list": ["assert isqrt(10) == 3", "assert isqrt(16) == math.floor(4.0)"],
    "test_setup_code": "import math",
}
IFEVAL = {
    "key": 7,
    "prompt": "Describe the sea without using any commas.",
    "instruction_id_list": ["punctuation:no_comma"],
    "kwargs": [{"num_words": None}],
}
MCQA = {"question": "What is 2 + 2?", "choices": ["3", "4", "5"], "answer": "B"}
OURS = {"prompt": "Say 4.", "domain": "math", "verifier": {"type": "math", "answer": "4"}}


def test_detect_format():
    he = json.loads((DATA / "humaneval_sample.jsonl").read_text().splitlines()[0])
    cases = {
        "gsm8k": GSM8K,
        "math": MATH_BOXED,
        "humaneval": he,
        "mbpp": MBPP,
        "ifeval": IFEVAL,
        "mcqa": MCQA,
        "prompt": OURS,
    }
    for fmt, raw in cases.items():
        assert tf.detect_format(raw) == fmt, fmt
    assert tf.detect_format({"options": ["a"], "question": "q", "answer": "A"}) == "mcqa"
    assert tf.detect_format({"text": "hello"}) is None


def test_gsm8k_and_math_conversion():
    rec = tf.CONVERTERS["gsm8k"](GSM8K)
    assert rec["domain"] == "math" and rec["verifier"] == {"type": "math", "answer": "5"}
    assert rec["prompt"].startswith(GSM8K["question"]) and "\\boxed{}" in rec["prompt"]
    boxed = tf.CONVERTERS["math"](MATH_BOXED)
    assert boxed["verifier"]["answer"] == "\\frac{1}{2}"
    assert tf.CONVERTERS["math"](MATH_ANSWER)["verifier"]["answer"] == "7"
    recs = [rec, boxed]
    assert _grade(recs, ["So \\boxed{5}.", "\\boxed{\\frac{1}{2}}"]) == [1.0, 1.0]
    assert _grade(recs, ["\\boxed{6}", "\\boxed{1}"]) == [0.0, 0.0]


def test_gsm8k_sample_file_converts():
    records, fmt = tf.read_task_file(DATA / "gsm8k_sample.jsonl")
    assert fmt == "gsm8k" and len(records) == 4
    assert records[0]["verifier"]["answer"] == "72"
    assert records[0]["id"] == "gsm8k_sample.jsonl:1"
    assert _grade(records[:1], ["48 + 24 = \\boxed{72}"]) == [1.0]


def test_humaneval_canonical_solution_passes_through_the_verifier():
    raws = [json.loads(line) for line in (DATA / "humaneval_sample.jsonl").read_text().splitlines()]
    records, fmt = tf.read_task_file(DATA / "humaneval_sample.jsonl")
    assert fmt == "humaneval" and [r["id"] for r in records] == ["Toy/0", "Toy/1"]
    assert records[0]["verifier"]["entry_point"] == "add_pairs"
    assert raws[0]["prompt"].rstrip() in records[0]["prompt"]  # the stub is shown
    assert "canonical_solution" not in json.dumps(records)
    good = [f"Done.\n```python\n{r['prompt']}{r['canonical_solution']}```" for r in raws]
    assert _grade(records, good) == [1.0, 1.0]
    bad = [f"```python\n{r['prompt']}    return None\n```" for r in raws]
    assert _grade(records, bad) == [0.0, 0.0]


def test_mbpp_conversion_runs_setup_and_tests():
    rec = tf.CONVERTERS["mbpp"](MBPP)
    assert rec["domain"] == "code" and "assert isqrt(10) == 3" in rec["prompt"]
    assert rec["verifier"]["tests"].startswith("import math\n")
    assert _grade([rec], [f"```python\n{MBPP['code']}\n```"]) == [1.0]
    assert _grade([rec], ["```python\ndef isqrt(x):\n    return x\n```"]) == [0.0]
    sanitized = {
        "prompt": MBPP["text"],
        "test_list": MBPP["test_list"],
        "test_imports": ["import math"],
    }
    rec = tf.CONVERTERS["mbpp"](sanitized)
    assert rec["verifier"]["tests"] == "\n".join(["import math", *MBPP["test_list"]])
    assert _grade([rec], [f"```python\n{MBPP['code']}\n```"]) == [1.0]


def test_ifeval_conversion():
    rec = tf.CONVERTERS["ifeval"](IFEVAL)
    assert rec["prompt"] == IFEVAL["prompt"] and rec["domain"] == "instruction"
    assert rec["verifier"]["instruction_id_list"] == ["punctuation:no_comma"]
    assert _grade([rec, rec], ["The sea is blue and wide.", "Blue, wide, deep."]) == [1.0, 0.0]


def test_mcqa_conversion_forms():
    rec = tf.CONVERTERS["mcqa"](MCQA)
    assert "A. 3\nB. 4\nC. 5" in rec["prompt"] and rec["verifier"] == {
        "type": "mcqa",
        "answer": "B",
    }
    assert _grade([rec, rec], ["\\boxed{B}", "\\boxed{A}"]) == [1.0, 0.0]
    same = [
        {"question": "q", "options": {"A": "3", "B": "4"}, "answer": "(B)"},
        {"question": "q", "choices": ["3", "4"], "answer": 1},  # MMLU: an index
        {"question": "q", "choices": {"label": ["1", "2"], "text": ["3", "4"]}, "answerKey": "2"},
        {"question": "q", "choices": ["3", "4"], "answer": "4"},  # the option's text
    ]
    for raw in same:
        assert tf.CONVERTERS["mcqa"](raw)["verifier"]["answer"] == "B", raw


def test_prompt_records_pass_through(tmp_path):
    path = _write(tmp_path, "ours.jsonl", [OURS, {**OURS, "id": "x"}])
    records, fmt = tf.read_task_file(path)
    assert fmt == "prompt" and records[0] == {**OURS, "id": "ours.jsonl:1"}
    assert records[1]["id"] == "x"


def test_named_format_overrides_detection(tmp_path):
    path = _write(tmp_path, "t.jsonl", [{"question": "1+1?", "answer": "2", "choices": ["1", "2"]}])
    assert tf.read_task_file(path)[1] == "mcqa"
    records, fmt = tf.read_task_file(path, "gsm8k")
    assert fmt == "gsm8k" and records[0]["verifier"]["type"] == "math"


@pytest.mark.parametrize(
    "rows, fmt, match",
    [
        ([GSM8K, {"question": "q"}], "auto", r"bad\.jsonl:2: gsm8k record lacks key 'answer'"),
        ([GSM8K, GSM8K, '{"question": "q",'], "auto", r"bad\.jsonl:3:\d+: invalid JSON"),
        ([{"text": "hi"}], "auto", r"bad\.jsonl:1: cannot tell the task format from keys"),
        ([{"prompt": "p", "test": "t"}], "humaneval", r":1: humaneval record lacks key 'entry_"),
        ([{**IFEVAL, "kwargs": []}], "auto", r":1: ifeval record: 1 ids .* but 0 dicts"),
        ([{**MCQA, "answer": "D"}], "auto", r":1: mcqa record: answer 'D' is none of the opt"),
        (
            [{**MBPP, "test_list": [1]}],
            "auto",
            r":1: mbpp record: keys 'test_list' and 'test_imports' must list",
        ),
        ([{"problem": "p", "solution": "no box"}], "auto", r":1: math record lacks key 'answ"),
        ([OURS, {"prompt": "p", "domain": "math"}], "auto", r"bad\.jsonl:2: field 'verifier'"),
        (["", "  "], "auto", r"bad\.jsonl: no records"),
        ([GSM8K, "[1, 2]"], "auto", r"bad\.jsonl:2: expected a JSON object, got list"),
    ],
)
def test_bad_files_name_file_and_line(tmp_path, rows, fmt, match):
    path = _write(tmp_path, "bad.jsonl", rows)
    with pytest.raises(nc_data.DataError, match=match):
        tf.read_task_file(path, fmt)


# ----------------------------------------------------------------------------- grading
_CALLS = []


@rw.register("eval_test_counting")
def _counting(record, response, finished):
    _CALLS.append(response)
    return float(response == "yes"), {"seen": response}


def test_grade_scores_each_distinct_response_once_and_reports_errors():
    rec = {"verifier": {"type": "eval_test_counting"}}
    _CALLS.clear()
    scores, errors, details = ev.grade(
        [rec] * 4, ["yes", "no", "yes", "yes"], [True] * 4, thinking=False, num_workers=0
    )
    assert scores.tolist() == [1.0, 0.0, 1.0, 1.0] and sorted(_CALLS) == ["no", "yes"]
    assert details[2]["seen"] == "yes" and not errors.any()
    cache = rw.RewardCache()
    for _ in range(2):  # through a cache: the same verdicts, memoised across calls
        _CALLS.clear()
        got, err, _ = ev.grade(
            [rec] * 2, ["yes", "no"], [True] * 2, thinking=False, num_workers=0, reward_cache=cache
        )
        assert got.tolist() == [1.0, 0.0] and not err.any()
    assert _CALLS == [] and cache.hits == 2
    bad = {"verifier": {"type": "no_such_verifier"}}
    scores, errors, details = ev.grade([bad], ["x"], [True], thinking=False, num_workers=0)
    assert errors.tolist() == [True] and scores.tolist() == [0.0]
    assert details[0]["error_kind"] == "bad_record"


def test_grade_thinking_rule():
    rec = {"verifier": {"type": "math", "answer": "5"}}
    responses = ["reasoning \\boxed{5}", "hmm</think>\\boxed{5}"]
    plain, _, _ = ev.grade([rec] * 2, responses, [True] * 2, thinking=False, num_workers=0)
    think, _, d = ev.grade([rec] * 2, responses, [True] * 2, thinking=True, num_workers=0)
    assert plain.tolist() == [1.0, 1.0] and think.tolist() == [0.0, 1.0]
    assert d[0].get("no_final_answer") is True


# ----------------------------------------------------------------------------- metrics
def test_pass_at_k_hand_values():
    assert ev.pass_at_k(5, 2, 1) == pytest.approx(0.4)
    assert ev.pass_at_k(4, 1, 2) == pytest.approx(1 - 3 / 6)
    assert ev.pass_at_k(10, 3, 5) == pytest.approx(1 - math.comb(7, 5) / math.comb(10, 5))
    assert ev.pass_at_k(5, 0, 5) == 0.0 and ev.pass_at_k(5, 1, 5) == 1.0
    with pytest.raises(ValueError, match="n=2 c=3"):
        ev.pass_at_k(2, 3, 1)


def test_mean_ci95_hand_values():
    m, lo, hi = ev.mean_ci95([1.0, 0.0, 1.0, 1.0])  # s = 0.5, s / sqrt(4) = 0.25
    assert m == 0.75 and lo == pytest.approx(0.75 - 1.959964 * 0.25) and hi == 1.0
    assert ev.mean_ci95([0.5, 0.5]) == (0.5, 0.5, 0.5)
    assert ev.mean_ci95([0.2]) == (0.2, None, None)


def test_paired_ci95_hand_values():
    # differences [0.5, 0.25, 0.0, 0.25]: mean 0.25, s = sqrt(0.125 / 3), P = 4
    d, lo, hi = ev.paired_ci95([1.0, 0.5, 0.5, 0.75], [0.5, 0.25, 0.5, 0.5])
    half = 1.959964 * math.sqrt(0.125 / 3) / 2
    assert d == 25.0 and lo == pytest.approx(100 * (0.25 - half), abs=0.01)
    assert hi == pytest.approx(100 * (0.25 + half), abs=0.01)
    # the same shift on problems of very different difficulty: the pairs agree exactly
    assert ev.paired_ci95([1.0, 0.25, 0.5], [0.75, 0.0, 0.25]) == [25.0, 25.0, 25.0]
    assert ev.paired_ci95([0.5], [0.0]) == [50.0, None, None]
    with pytest.raises(ValueError, match="same"):
        ev.paired_ci95([0.5, 0.5], [0.5])


def test_paired_deltas_saves_and_compares_only_the_same_problems(tmp_path):
    a, b, c = (tmp_path / n for n in "abc")
    for p in (a, b, c):
        p.mkdir()
    ev.paired_deltas({"x": [0.0, 1.0], "y": [0.5]}, str(a), {})
    assert json.loads((a / ev.PROBLEM_SCORES).read_text()) == {"x": [0.0, 1.0], "y": [0.5]}
    # "y" has another number of problems in b; c never saved its scores: left out
    got = ev.paired_deltas({"x": [1.0, 1.0], "y": [0.5, 0.5]}, str(b), {"a": str(a), "c": str(c)})
    assert got == {"a": {"x": [50.0, pytest.approx(-48.0, abs=0.1), pytest.approx(148.0, abs=0.1)]}}


def test_task_metrics_hand_values():
    s = ev.EvalSamples(
        records=[{"id": "a"}, {"id": "b"}],
        n=3,
        responses=["r"] * 6,
        response_tokens=np.array([4, 5, 6, 1, 2, 3], np.int32),
        finished=np.array([True, True, True, False, True, True]),
        scores=np.array([1, 0, 1, 0, 0, 0], np.float32),
        errors=np.array([False, False, False, True, False, False]),
        details=[{}, {}, {}, {"error_kind": "timeout"}, {}, {}],
    )
    m = ev.task_metrics(s)
    assert m["n_problems"] == 2 and m["n_samples"] == 3
    assert m["pass@1"] == 33.33 and m["pass@k"] == {"1": 33.33, "3": 50.0}
    half = 1.959964 * math.sqrt(2 * (1 / 3) ** 2) / math.sqrt(2)  # s of [2/3, 0], P = 2
    assert m["ci95"]["low"] == 0.0 and m["ci95"]["high"] == pytest.approx(
        100 * (1 / 3 + half), abs=0.01
    )
    assert m["pass@1_graded_only"] == 40.0
    assert m["verifier_errors"] == 1 and m["verifier_errors_by_kind"] == {"timeout": 1}
    assert m["mean_response_tokens"] == 3.5 and m["truncation_rate"] == 16.67


# ----------------------------------------------------------------------------- with a model
@rw.register("eval_test_even")
def _even(record, response, finished):
    return float(len(response) % 2 == 0), {}


def random_model(cfg: ModelConfig, seed: int = 0) -> NemotronH:
    """A NemotronH with N(0, 0.05^2) weights, filled on the host (no compiled initialiser)."""
    graphdef, state = nnx.split(nnx.eval_shape(lambda: NemotronH(cfg, rngs=nnx.Rngs(0))))
    rng = np.random.default_rng(seed)

    def fill(x):
        if not jnp.issubdtype(x.dtype, jnp.floating):
            return jnp.zeros(x.shape, x.dtype)
        return jnp.asarray(0.05 * rng.standard_normal(x.shape), x.dtype)

    return nnx.merge(graphdef, jax.tree.map(fill, state))


@pytest.fixture(scope="module")
def tiny():
    texts = [r["question"] for r in map(json.loads, open(DATA / "gsm8k_sample.jsonl"))]
    tok = nc_data.train_bpe(texts * 4, 300)
    model = random_model(ModelConfig.tiny(vocab_size=300, pattern="M*E"))
    graphdef, params, rest = split_model(model)
    return graphdef, nnx.merge_state(params, rest), tok


def test_evaluate_domains_matches_rollout_sampling(tiny):
    """The cascade's numbers are those of `rl.rollouts.sample` (same samples, same scores)."""
    graphdef, state, tok = tiny
    recs = [
        {"prompt": f"Count to {i}.", "domain": "x", "verifier": {"type": "eval_test_even"}}
        for i in range(2)
    ]
    cfg = ev.EvalConfig(n_samples=2, temperature=1.0, top_p=0.9, max_new_tokens=6, thinking=False)
    roll = ro.sample(
        graphdef, state, tok, recs, n=2, max_new_tokens=6, temperature=1.0, top_p=0.9, seed=3,
        num_workers=0,
    )  # fmt: skip
    s = ev.sample_and_grade(graphdef, state, tok, recs, cfg, seed=3, num_workers=0)
    assert s.responses == roll.responses
    np.testing.assert_array_equal(s.finished, roll.finished)
    np.testing.assert_array_equal(s.scores, roll.rewards)
    np.testing.assert_array_equal(s.response_tokens, roll.response_lengths())
    want = {"x": round(100.0 * float(roll.rewards.mean()), 2)}
    problems: dict = {}
    assert (
        ev.evaluate_domains(
            graphdef, state, tok, {"x": recs}, cfg, seed=3, num_workers=0, problems=problems
        )
        == want
    )
    assert problems["x"] == pytest.approx(list(roll.rewards.reshape(2, 2).mean(axis=1)))
    cache = rw.RewardCache()  # the cascade passes its run's cache
    for _ in range(2):
        got = ev.evaluate_domains(
            graphdef, state, tok, {"x": recs}, cfg, seed=3, num_workers=0, reward_cache=cache
        )
        assert got == want
    assert cache.hits >= 4


def test_sample_and_grade_in_batches(tiny):
    graphdef, state, tok = tiny
    recs = [
        {"prompt": f"Say {i}.", "domain": "x", "verifier": {"type": "eval_test_even"}}
        for i in range(4)
    ]  # two batches of the same shape as above: the compiled programs are reused
    cfg = ev.EvalConfig(n_samples=2, temperature=1.0, top_p=0.9, max_new_tokens=6, thinking=False)
    seen = []
    s = ev.sample_and_grade(
        graphdef, state, tok, recs, cfg, seed=0, num_workers=0, batch_size=2,
        on_batch=lambda part: seen.append(len(part.records)),
    )  # fmt: skip
    assert seen == [2, 4] and len(s.responses) == 8 and s.scores.shape == (8,)
    assert s.records == recs and ev.batch_seed(0, 0) == 0 and ev.batch_seed(0, 1) != 1


def test_continuous_batching_gives_the_static_samples(tiny):
    """`slots` (RL `rollout_slots`, eval `slots`): 3 of the 8 rows resident at once, a finished
    row's slot refilled, the same responses and scores as one static batch (row r samples with
    its own key whatever the slot); slots >= rows keeps the static engine."""
    graphdef, state, tok = tiny
    recs = [
        {"prompt": f"Say {i}.", "domain": "x", "verifier": {"type": "eval_test_even"}}
        for i in range(4)
    ]
    kw = dict(n=2, max_new_tokens=6, temperature=1.0, top_p=0.9, seed=5, num_workers=0)
    static = ro.sample(graphdef, state, tok, recs, **kw)
    cont = ro.sample(graphdef, state, tok, recs, slots=2, **kw)
    assert cont.timings["slots"] == 2 and "slots" not in static.timings
    assert cont.responses == static.responses
    np.testing.assert_array_equal(cont.rewards, static.rewards)
    for a, b in zip(cont.sampler_logprobs, static.sampler_logprobs, strict=True):
        np.testing.assert_allclose(a, b, atol=1e-5)
    assert "slots" not in ro.sample(graphdef, state, tok, recs, slots=8, **kw).timings
    cfg = ev.EvalConfig(
        n_samples=2, temperature=1.0, top_p=0.9, max_new_tokens=6, thinking=False, slots=2
    )
    s = ev.sample_and_grade(graphdef, state, tok, recs, cfg, seed=5, num_workers=0)
    assert s.responses == static.responses
    with pytest.raises(ValueError, match="slots"):
        ev.EvalConfig(
            n_samples=1, temperature=1.0, top_p=1.0, max_new_tokens=6, thinking=False, slots=-1
        )
