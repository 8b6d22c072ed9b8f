"""Learned rewards for RL: verdict parsing, both-order pairwise judging (position bias cancels),
the length penalty, the registry, the Bradley-Terry scorer end to end and a NemotronH judge."""

import re

import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from nemocascade.data import preferences as pf
from nemocascade.data import train_bpe
from nemocascade.data.synthetic import preference as ps
from nemocascade.model import ModelConfig, NemotronH, save_hf_checkpoint
from nemocascade.model.reward_head import (
    RewardModel,
    RewardModelMismatchError,
    export_reward_model,
)
from nemocascade.rewards import reward_models as rmod

CFG = ModelConfig.tiny(vocab_size=512, pattern="M*")


@pytest.mark.parametrize(
    "text,want",
    [
        ("Response A is clearer. [[A]]", "A"),
        ("verdict: [[b]]", "B"),
        ("[[ TIE ]]", "tie"),
        ("[[C]]", "tie"),
        ("At first [[A]], but on reflection [[B]]", "B"),  # the last label counts
        ("A: 7/10, B: 4/10", "A"),
        ("Response A: 3\nResponse B: 8.5", "B"),
        ("assistant a score = 6 ; ASSISTANT B SCORE=6", "tie"),
        ("A: 9/10 then B: 4/5", "A"),  # 0.9 vs 0.8
        ("A: 2, B: 5 ... revised A: 7", "A"),  # the last score of each side counts
        ("<think>[[B]] maybe</think>\n[[A]]", "A"),  # only the text after the reasoning
        ("I cannot decide between them.", None),
        ("A: 7 but nothing for the other", None),
        ("[[D]]", None),
        ("", None),
    ],
)
def test_parse_verdict_formats(text, want):
    assert rmod.parse_verdict(text) == want


def test_parse_verdict_on_adversarial_text():
    # long runs that a backtracking pattern could take quadratic time on
    for text in ("A" + " \t" * 20_000, "[[" * 20_000 + "A", "Response " * 10_000 + "A:"):
        assert rmod.parse_verdict(text) is None


def _field(prompt: str, name: str) -> str:
    return re.search(rf"\[Response {name}\]\n(.*?)\n\n", prompt, re.S).group(1)


class _Stub:
    """A judge stub: `rule(response_a, response_b) -> verdict text`; records its calls."""

    def __init__(self, rule):
        self.rule, self.calls = rule, []

    def __call__(self, prompts):
        self.calls.append(list(prompts))
        return [self.rule(_field(p, "A"), _field(p, "B")) for p in prompts]


RECORDS = [{"prompt": "Say hi."}] * 3 + [{"messages": [{"role": "user", "content": "Bye?"}]}] * 3


def test_a_judge_that_always_prefers_position_a_gives_equal_rewards():
    for verdict in ("[[A]]", "[[B]]", "no idea"):
        stub = _Stub(lambda a, b, v=verdict: v)
        scorer = rmod.PairwiseJudgeScorer(stub)
        rewards, metrics = scorer.score_group_rows(RECORDS, ["x", "yy", "zzz"] * 2, 3)
        np.testing.assert_array_equal(rewards, np.full(6, 0.5, np.float32))
        assert rewards.dtype == np.float32
        assert len(stub.calls) == 1 and len(stub.calls[0]) == 2 * 3 * 2  # groups x G(G-1)
        assert metrics["rm/comparisons"] == 12
    assert metrics["rm/unparseable"] == 12 and metrics["rm/unparseable_frac"] == 1.0


def test_a_judge_that_prefers_the_longer_response_ranks_in_both_orders():
    def longer(a, b):
        return "[[A]]" if len(a) > len(b) else "[[B]]" if len(b) > len(a) else "[[TIE]]"

    stub = _Stub(longer)
    scorer = rmod.PairwiseJudgeScorer(stub)
    responses = ["a", "bbb", "cc", "dd", "ee", "f"]
    rewards, metrics = scorer.score_group_rows(RECORDS, responses, 3)
    np.testing.assert_allclose(rewards, [0.0, 1.0, 0.5, 0.75, 0.75, 0.0])
    assert metrics["rm/first_wins_frac"] == 0.5  # decided verdicts split evenly over positions
    assert metrics["rm/ties_frac"] == pytest.approx(2 / 12)
    # the judge saw the question and both orders of every pair
    prompts = stub.calls[0]
    assert "[Question]\nSay hi." in prompts[0] and "[Question]\nBye?" in prompts[-1]
    seen = {(_field(p, "A"), _field(p, "B")) for p in prompts}
    assert ("a", "bbb") in seen and ("bbb", "a") in seen


def test_scores_format_and_reasoning_hidden_from_the_judge():
    def by_score(a, b):
        return f"Response A: {len(a)}/10\nResponse B: {len(b)}/10"

    stub = _Stub(by_score)
    scorer = rmod.PairwiseJudgeScorer(stub, thinking=True)
    responses = ["secret</think>ok", "secret too</think>longer"]
    rewards, _ = scorer.score_group_rows([{"prompt": "q"}] * 2, responses, 2)
    np.testing.assert_allclose(rewards, [0.0, 1.0])
    assert not any("secret" in p for p in stub.calls[0])
    # a group of one has nothing to compare: neutral reward, no judge call
    stub = _Stub(by_score)
    rewards, metrics = rmod.PairwiseJudgeScorer(stub).score_group_rows([{"prompt": "q"}], ["x"], 1)
    assert rewards.tolist() == [0.5] and metrics["rm/comparisons"] == 0 and not stub.calls


def test_length_penalty():
    pen = rmod.LengthPenalty(coef=0.5, target=10)
    np.testing.assert_allclose(pen(np.ones(4, np.float32), [5, 10, 30, 0]), [0, 0, 1.0, 0])
    assert not rmod.LengthPenalty()(np.ones(2, np.float32), [100, 200]).any()
    with pytest.raises(ValueError, match="target >= 1"):
        rmod.LengthPenalty(coef=0.1, target=0)
    scorer = rmod.PairwiseJudgeScorer(_Stub(lambda a, b: "[[TIE]]"), length_penalty=pen)
    rewards, metrics = scorer.score_group_rows(
        [{"prompt": "q"}] * 3, ["a", "b", "c"], 3, response_lengths=[10, 20, 40]
    )
    np.testing.assert_allclose(rewards, [0.5, 0.0, -1.0])
    assert metrics["rm/length_penalty_mean"] == pytest.approx((0 + 0.5 + 1.5) / 3)
    with pytest.raises(ValueError, match="needs response_lengths or the scorer's tokenizer"):
        scorer.score_group_rows([{"prompt": "q"}] * 3, ["a", "b", "c"], 3)


def test_bad_arguments_and_templates():
    scorer = rmod.PairwiseJudgeScorer(_Stub(lambda a, b: "[[A]]"))
    with pytest.raises(ValueError, match="multiple of group_size=2"):
        scorer.score_group_rows([{"prompt": "q"}] * 3, ["a", "b", "c"], 2)
    with pytest.raises(ValueError, match=r"missing \['response_b'\], unknown \['answer'\]"):
        rmod.check_template("{question} {response_a} {answer}")
    rmod.check_template("{{literal}} {question} {response_a} {response_b}")
    with pytest.raises(ValueError, match="judge_template"):
        rmod.RewardModelConfig(kind="genrm", path="x", judge_template="{question}")


def test_registry():
    assert {"bt", "genrm"} <= set(rmod.reward_model_names())
    with pytest.raises(KeyError, match="no reward model 'llm_judge'"):
        rmod.build_reward_model(rmod.RewardModelConfig(kind="llm_judge", path="x"))


@pytest.fixture(scope="module")
def tokenizer():
    return train_bpe(ps.all_texts(100), 400)


def test_bt_scorer_end_to_end(tmp_path, tokenizer):
    model = RewardModel(CFG, rngs=nnx.Rngs(3))
    path = export_reward_model(model, tmp_path / "rm", tokenizer=tokenizer)
    cfg = rmod.RewardModelConfig(kind="bt", path=str(path), batch_size=4)
    scorer = rmod.build_reward_model(cfg, policy_config=CFG, policy_tokenizer=tokenizer)
    records = [ps.prompt_record(p) for p in ps.problems("test", 3)]
    rows = [r for r in records for _ in range(2)]
    responses = ["The sun is calm!", "<think>hm</think>The sun is calm.", "", "x", "a b", "c"]
    rewards, metrics = scorer.score_group_rows(rows, responses, 2, finished=[True] * 5 + [False])
    assert rewards.shape == (6,) and rewards.dtype == np.float32
    assert metrics["rm/unfinished"] == 1 and metrics["rm/rows_cut"] == 0
    seqs = [
        pf.render_scored(tokenizer, r["messages"], x) for r, x in zip(rows, responses, strict=True)
    ]
    b = pf.sequence_batch(seqs, seq_len=64, num_rows=6, pad_id=tokenizer.pad_id)
    want = model(jnp.asarray(b["input_ids"]), jnp.asarray(b["last"]))
    np.testing.assert_allclose(rewards, want, rtol=1e-5, atol=1e-6)

    with pytest.raises(RewardModelMismatchError, match="num_attention_heads: checkpoint 4"):
        rmod.build_reward_model(cfg, policy_config=CFG.replace(num_attention_heads=8))
    other = train_bpe(["entirely different text"] * 20, 300)
    with pytest.raises(RewardModelMismatchError, match="tokenizer: the checkpoint's vocabulary"):
        rmod.build_reward_model(cfg, policy_config=CFG, policy_tokenizer=other)


def test_genrm_with_a_nemotron_judge_never_crashes(tmp_path, tokenizer):
    judge_dir = tmp_path / "judge"
    save_hf_checkpoint(NemotronH(CFG, rngs=nnx.Rngs(0)), judge_dir)
    tokenizer.save(judge_dir / "tokenizer.json")
    cfg = rmod.RewardModelConfig(kind="genrm", path=str(judge_dir), judge_max_new_tokens=4)
    scorer = rmod.build_reward_model(cfg)
    rows = [{"prompt": "Tell me about the moon."}] * 3 + [{"prompt": "And the sun?"}] * 3
    rewards, metrics = scorer.score_group_rows(rows, ["A!", "B.", "C", "D", "E!", "F"], 3)
    # an untrained judge writes no verdict: every comparison is a counted tie
    assert scorer.judge.calls == 1  # every comparison of the batch in one generate call
    assert metrics["rm/comparisons"] == 12
    assert metrics["rm/unparseable"] + metrics["rm/ties_frac"] * 12 <= 12
    assert rewards.shape == (6,) and ((rewards >= 0) & (rewards <= 1)).all()
    with pytest.raises(FileNotFoundError, match="tokenizer.json"):
        rmod.build_reward_model(rmod.RewardModelConfig(kind="genrm", path=str(tmp_path)))
