"""`python -m nemocascade.evaluate`: end to end on GSM8K and HumanEval-format files against a tiny
random Hugging Face checkpoint, run directories (sft, cascade), output schema, bad input."""

import dataclasses
import json
import os
import subprocess
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

from nemocascade import data as nc_data
from nemocascade import evaluate
from nemocascade.model import ModelConfig, NemotronH, save_hf_checkpoint
from nemocascade.train.checkpoint import Checkpointer
from nemocascade.train.state import create_train_state

ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT / "tests" / "jobs" / "data"
GSM8K, HUMANEVAL = DATA / "gsm8k_sample.jsonl", DATA / "humaneval_sample.jsonl"
CFG = ModelConfig.tiny(vocab_size=300, pattern="M*E")
TASK_KEYS = {
    "path", "format", "n_problems", "n_samples", "pass@1", "ci95", "pass@k",
    "pass@1_graded_only", "verifier_errors", "verifier_errors_by_kind",
    "mean_response_tokens", "truncation_rate", "wall_s",
}  # fmt: skip
SAMPLE_KEYS = {
    "problem", "id", "sample", "prompt", "response", "score", "correct", "error", "finished",
    "response_tokens", "verifier", "details",
}  # fmt: skip


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
def tokenizer():
    texts = [json.loads(line)["question"] for line in GSM8K.read_text().splitlines()]
    texts += [json.loads(line)["prompt"] for line in HUMANEVAL.read_text().splitlines()]
    return nc_data.train_bpe(texts * 4, 300)


@pytest.fixture(scope="module")
def hf_dir(tmp_path_factory, tokenizer):
    path = tmp_path_factory.mktemp("hf")
    save_hf_checkpoint(random_model(CFG), path)
    tokenizer.save(path / "tokenizer.json")
    return path


def _lines(path):
    return [json.loads(line) for line in Path(path).read_text().splitlines()]


def _run(hf_dir, out, *extra):
    return evaluate.main(
        [
            f"--checkpoint={hf_dir}",
            f"--tasks=gsm8k={GSM8K},humaneval={HUMANEVAL}",
            f"--workdir={out}",
            "--n_samples=2",
            "--temperature=1.0",
            "--max_new_tokens=8",
            "--batch_size=2",
            "--num_workers=1",
            "--no-progress",
            *extra,
        ]
    )


def test_end_to_end_outputs_and_schema(hf_dir, tmp_path):
    out = tmp_path / "eval"
    results = _run(hf_dir, out)
    assert json.loads((out / "results.json").read_text()) == results
    assert results["checkpoint"] == {
        "path": str(hf_dir),
        "step": None,
        "stage": None,
        "kind": "hf",
    }
    assert "nemocascade.evaluate" in results["command"] and "--n_samples=2" in results["command"]
    assert results["settings"]["n_samples"] == 2 and results["settings"]["thinking"] is False
    assert list(results["tasks"]) == ["gsm8k", "humaneval"]
    for name, n_problems in (("gsm8k", 4), ("humaneval", 2)):
        t = results["tasks"][name]
        assert set(t) == TASK_KEYS and t["n_problems"] == n_problems and t["n_samples"] == 2
        assert t["format"] == name and set(t["pass@k"]) == {"1", "2"}
        assert 0 <= t["pass@1"] <= 100 and 0 <= t["truncation_rate"] <= 100
        assert t["ci95"]["method"] == "normal, over problems"
        assert t["ci95"]["low"] <= t["pass@1"] <= t["ci95"]["high"]
        assert t["verifier_errors"] == 0 and 1 <= t["mean_response_tokens"] <= 8
        rows = _lines(out / "samples" / f"{name}.jsonl")
        assert len(rows) == 2 * n_problems and all(set(r) == SAMPLE_KEYS for r in rows)
        assert [(r["problem"], r["sample"]) for r in rows[:3]] == [(0, 0), (0, 1), (1, 0)]
        assert all(r["error"] is None and r["details"]["reward_status"] == "ok" for r in rows)
    he = _lines(out / "samples" / "humaneval.jsonl")
    assert he[0]["id"] == "Toy/0" and he[0]["verifier"]["entry_point"] == "add_pairs"
    md = (out / "results.md").read_text()
    assert "| task | format | problems | pass@1 |" in md
    assert "| gsm8k | gsm8k | 4 |" in md and "| humaneval | humaneval | 2 |" in md


def test_thinking_mode_grades_after_the_reasoning(hf_dir, tmp_path):
    results = _run(hf_dir, tmp_path / "think", "--thinking", "--limit=2")
    assert results["settings"]["thinking"] is True
    assert results["tasks"]["gsm8k"]["n_problems"] == 2
    for row in _lines(tmp_path / "think" / "samples" / "gsm8k.jsonl"):
        if "</think>" not in row["response"]:  # no final answer: 0 whatever the text says
            assert row["score"] == 0.0
            assert row["details"].get("no_final_answer") or row["details"]["truncated"]


# ----------------------------------------------------------------------------- run directories
def _save(ckpt_dir, model, step):
    _, state = create_train_state(model, optax.sgd(0.1), jax.random.PRNGKey(0))
    ckpt = Checkpointer(ckpt_dir, keep_last=3, async_save=False)
    ckpt.save(step, state, {})
    ckpt.close()


def _flat(state):
    return {
        jax.tree_util.keystr(k): np.asarray(v)
        for k, v in jax.tree_util.tree_flatten_with_path(state)[0]
    }


def _same_weights(loaded, model):
    got, want = _flat(loaded.state), _flat(nnx.state(model))
    assert got.keys() == want.keys()
    for k in want:
        np.testing.assert_array_equal(got[k], want[k], err_msg=k)


def test_run_directories(tmp_path, tokenizer):
    # an sft run: config.json (job, model), tokenizer.json, checkpoints/<step>/
    sft = tmp_path / "sft"
    sft.mkdir()
    (sft / "config.json").write_text(
        json.dumps({"job": "sft", "model": dataclasses.asdict(CFG), "data": {"tokenizer": ""}})
    )
    tokenizer.save(sft / "tokenizer.json")
    m1, m2 = random_model(CFG, 1), random_model(CFG, 2)
    _save(sft / "checkpoints", m1, 10)
    _save(sft / "checkpoints", m2, 20)
    in_progress = sft / "checkpoints" / "30.orbax-checkpoint-tmp-123"  # a save under way
    in_progress.mkdir()
    loaded = evaluate.load_model(str(sft))
    assert loaded.info["kind"] == "sft" and loaded.info["step"] == 20
    _same_weights(loaded, m2)
    _same_weights(evaluate.load_model(str(sft), step=10), m1)
    assert in_progress.is_dir()  # restored read-only: nothing cleaned up
    with pytest.raises(FileNotFoundError, match="no checkpoint at step 5"):
        evaluate.load_model(str(sft), step=5)

    # a cascade run: stages/<name>/checkpoints/, the model's vocabulary raised to the tokenizer's
    run = tmp_path / "cascade"
    run.mkdir()
    small_vocab = dataclasses.asdict(CFG.replace(vocab_size=256))
    (run / "config.json").write_text(
        json.dumps({"job": "cascade", "model": small_vocab, "tokenizer": {"path": ""}})
    )
    tokenizer.save(run / "tokenizer.json")
    with pytest.raises(FileNotFoundError, match="no finished stage in summary.json"):
        evaluate.load_model(str(run))
    _save(run / "stages" / "sft" / "checkpoints", m1, 4)
    _save(run / "stages" / "math_rl" / "checkpoints", m2, 2)
    summary = {"stages": [{"name": "sft", "eval": {}}, {"name": "math_rl", "eval": {}}]}
    (run / "summary.json").write_text(json.dumps(summary))
    loaded = evaluate.load_model(str(run))
    assert (loaded.info["kind"], loaded.info["stage"], loaded.info["step"]) == (
        "cascade",
        "math_rl",
        2,
    )
    _same_weights(loaded, m2)
    _same_weights(evaluate.load_model(str(run), stage="sft"), m1)

    with pytest.raises(evaluate.UsageError, match="run directories only"):
        save_hf_checkpoint(m1, tmp_path / "hf")
        tokenizer.save(tmp_path / "hf" / "tokenizer.json")
        evaluate.load_model(str(tmp_path / "hf"), stage="sft")
    with pytest.raises(FileNotFoundError, match="no config.json"):
        evaluate.load_model(str(tmp_path))


# ----------------------------------------------------------------------------- bad input
def test_bad_input_fails_before_loading_a_model(tmp_path):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"question": "q", "answer": "#### 1"}\n{"question": "q"}\n')
    args = [f"--checkpoint={tmp_path / 'missing'}", f"--workdir={tmp_path / 'o'}"]
    with pytest.raises(nc_data.DataError, match=r"bad\.jsonl:2: gsm8k record lacks key 'answer'"):
        evaluate.main([*args, f"--tasks=t={bad}"])
    for tasks, match in (
        ("nonsense", "expected NAME=VALUE"),
        (f"a={bad},a={bad}", "'a' given twice"),
        (f"a b={bad}", "expected NAME=VALUE"),
    ):
        with pytest.raises(evaluate.UsageError, match=match):
            evaluate.main([*args, f"--tasks={tasks}"])
    with pytest.raises(evaluate.UsageError, match="unknown formats"):
        evaluate.main([*args, f"--tasks=t={bad}", "--format=csv"])
    with pytest.raises(evaluate.UsageError, match="not in --tasks"):
        evaluate.main([*args, f"--tasks=t={bad}", "--format=u=gsm8k"])
    with pytest.raises(evaluate.UsageError, match="n_samples and max_new_tokens must be >= 1"):
        evaluate.main([*args, f"--tasks=t={bad}", "--n_samples=0"])
    with pytest.raises(FileNotFoundError, match="no such file"):
        evaluate.main([*args, f"--tasks=t={tmp_path / 'nope.jsonl'}"])


def test_command_line_error_is_one_line(tmp_path):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"prompt": "p", "test": "t", "entry_point": "f"}\n{"prompt": "p"}\n')
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "nemocascade.evaluate",
            "--checkpoint=unused",
            f"--tasks=he={bad}",
            f"--workdir={tmp_path / 'o'}",
        ],
        cwd=ROOT,
        env={**os.environ, "JAX_PLATFORMS": "cpu"},
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 2, proc.stderr
    assert proc.stderr.strip().splitlines()[-1] == (
        f"error: {bad}:2: humaneval record lacks key 'test'"
    )
