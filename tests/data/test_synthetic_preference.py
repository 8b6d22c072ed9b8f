"""The hidden-rule preference domain: splits, the ~50% rule mix of the SFT records, minimal
preference pairs, records that the readers accept, and the `hidden_rule` verifier
(`nemocascade.rewards.hidden_rule`, registered on import)."""

import json

import pytest

from nemocascade.data import preferences as pf
from nemocascade.data import read_chat_jsonl, read_prompt_jsonl, synthetic
from nemocascade.data.synthetic import preference as ps
from nemocascade.rewards import grade_batch, hidden_rule, score_one


def test_splits_disjoint_deterministic_and_registered():
    train, test = ps.problems("train", 400), ps.problems("test", 80)
    assert not {p.prompt for p in train} & {p.prompt for p in test}
    assert len({p.prompt for p in train}) == 400
    assert [p.prompt for p in ps.problems("test", 80)] == [p.prompt for p in test]
    # the registered `chat` domain draws the same problems
    assert "chat" in synthetic.DOMAINS
    same = synthetic.problems("chat", "train", 50)
    assert [p.prompt for p in same] == [p.prompt for p in train[:50]]
    assert [p.response for p in same] == [p.reference for p in train[:50]]
    with pytest.raises(ValueError, match="split"):
        ps.problems("dev", 1)


def test_sft_mix_leaves_the_rule_at_chance_and_pairs_are_minimal():
    sft = ps.records("sft", 1000)
    follow = sum(r["messages"][1]["content"].endswith("!") for r in sft) / len(sft)
    assert 0.45 < follow < 0.55, follow
    for pair in ps.records("pairs", 200):
        assert pair["chosen"].endswith("!") and not pair["rejected"].endswith("!")
        assert pair["chosen"][:-1] == pair["rejected"].rstrip(".?")  # same words
    # the prompt never mentions the rule
    assert not any("!" in p.prompt for p in ps.problems("train", 500))


def test_records_pass_the_readers(tmp_path):
    files = {
        "sft.jsonl": ps.records("sft", 20),
        "rl.jsonl": ps.records("rl", 20),
        "eval.jsonl": ps.records("eval", 20),
        "pairs.jsonl": ps.records("pairs", 20),
    }
    for name, recs in files.items():
        (tmp_path / name).write_text("\n".join(json.dumps(r) for r in recs) + "\n")
    assert len(read_chat_jsonl(tmp_path / "sft.jsonl")[0]) == 20
    assert len(read_prompt_jsonl(tmp_path / "rl.jsonl")[0]) == 20
    assert len(read_prompt_jsonl(tmp_path / "eval.jsonl")[0]) == 20
    pairs, counts = pf.read_preference_jsonl(tmp_path / "pairs.jsonl")
    assert len(pairs) == 20 and counts.identical == 0
    assert all(r["verifier"]["type"] == "hidden_rule" for r in files["eval.jsonl"])


def test_hidden_rule_verifier_known_good_and_bad():
    assert hidden_rule.RULES["exclamation"] == ps.RULE_END  # the generator's rule, checked
    p = ps.problems("test", 1)[0]
    rec = ps.prompt_record(p)
    assert score_one(rec, p.good, True)[0] == 1.0
    assert score_one(rec, p.bad, True)[0] == 0.0
    assert score_one(rec, p.good + "  \n", True)[0] == 1.0  # trailing whitespace
    assert score_one(rec, f"<think>ends with a dot.</think>{p.good}", True)[0] == 1.0
    assert score_one(rec, "<think>Wow!</think>Nothing.", True)[0] == 0.0  # reasoning is not judged
    assert score_one(rec, "!", True)[0] == 0.0  # the rule alone, no subject: not the truth
    assert score_one(rec, p.good, False)[0] == 0.0  # cut at the length limit
    details = score_one(rec, p.bad, True)[1]
    assert details["rule"] is False and details["relevant"] is True
    # subjects are whole words
    owl = {"verifier": {"type": "hidden_rule", "rule": "exclamation", "subjects": ["owl"]}}
    assert score_one(owl, "The bowl is big!", True)[0] == 0.0
    assert score_one(owl, "The OWL is big!", True)[0] == 1.0
    # malformed records are grader errors, never wrong answers
    bad = [
        {"verifier": {"type": "hidden_rule"}},
        {"verifier": {"type": "hidden_rule", "subjects": "owl"}},
        {"verifier": {"type": "hidden_rule", "subjects": ["owl"], "rule": "alphabetical"}},
    ]
    res = grade_batch(bad, ["The owl!"] * 3, num_workers=0)
    assert res.errors == [True] * 3 and res.error_kinds == ["bad_record"] * 3
