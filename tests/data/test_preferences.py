"""Preference pairs: JSONL validation with file:line, identical pairs skipped and counted, empty
responses counted, what a reward model sees (reasoning stripped), right-padded batches."""

import json
import logging

import numpy as np
import pytest

from nemocascade.data import DataError, render_text
from nemocascade.data import preferences as pf
from nemocascade.data.tokenizer import IM_END

GOOD = {"prompt": "Name a colour.", "chosen": "Blue!", "rejected": "Blue.", "domain": "chat"}


def _write(tmp_path, lines, name="pairs.jsonl"):
    path = tmp_path / name
    path.write_text("\n".join(x if isinstance(x, str) else json.dumps(x) for x in lines) + "\n")
    return path


BAD = [
    ("[1, 2]", "<record>"),
    ({"chosen": "a", "rejected": "b"}, "prompt"),
    ({"prompt": "", "chosen": "a", "rejected": "b"}, "prompt"),
    ({"prompt": 3, "chosen": "a", "rejected": "b"}, "prompt"),
    ({"prompt": "q", "rejected": "b"}, "chosen"),
    ({"prompt": "q", "chosen": "a"}, "rejected"),
    ({"prompt": "q", "chosen": ["a"], "rejected": "b"}, "chosen"),
    ({"prompt": "q", "chosen": "a", "rejected": None}, "rejected"),
    ({"prompt": [], "chosen": "a", "rejected": "b"}, "prompt"),
    (
        {"prompt": [{"role": "user", "content": "q"}, {"role": "bot", "content": "x"}]}
        | {"chosen": "a", "rejected": "b"},
        "prompt[1].role",
    ),
    (
        {"prompt": [{"role": "user", "content": 5}], "chosen": "a", "rejected": "b"},
        "prompt[0].content",
    ),
    (
        {
            "prompt": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "x"}],
            "chosen": "a",
            "rejected": "b",
        },
        "prompt[1].role",
    ),
    ({**GOOD, "domain": ""}, "domain"),
]


@pytest.mark.parametrize("bad,field", BAD)
def test_bad_lines_name_file_line_and_field(tmp_path, bad, field):
    path = _write(tmp_path, [GOOD, GOOD, bad, GOOD])
    with pytest.raises(DataError) as e:
        pf.read_preference_jsonl(path)
    msg = str(e.value)
    assert msg.startswith(f"{path}:3: ")
    if field != "<record>":
        assert f"field {field!r}" in msg, msg
    # skip_bad keeps the good lines and counts the bad one
    pairs, counts = pf.read_preference_jsonl(path, skip_bad=True)
    assert len(pairs) == 3 and counts.bad_lines == 1


def test_invalid_json_names_line_and_column(tmp_path):
    path = _write(tmp_path, [GOOD, '{"prompt": "q", "chosen": }'])
    with pytest.raises(DataError, match=r"pairs\.jsonl:2:\d+: invalid JSON"):
        pf.read_preference_jsonl(path)


def test_identical_pairs_skipped_and_counted_empty_counted(tmp_path, caplog):
    chat_prompt = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"}]
    lines = [
        GOOD,
        {**GOOD, "rejected": "Blue!"},  # identical
        {**GOOD, "rejected": "  Blue!\n"},  # identical up to edge whitespace
        {**GOOD, "chosen": "<think>a</think>Blue!", "rejected": "<think>b</think>Blue!"},
        {"prompt": chat_prompt, "chosen": "Hello.", "rejected": ""},  # empty: kept, counted
        {**GOOD, "chosen": "", "rejected": "Blue."},
    ]
    path = _write(tmp_path, lines)
    with caplog.at_level(logging.WARNING, logger="nemocascade.data.preferences"):
        pairs, counts = pf.read_preference_jsonl(path)
    assert (counts.read, counts.identical, counts.kept) == (6, 3, 3)
    assert (counts.empty_chosen, counts.empty_rejected) == (1, 1)
    assert "skipped 3 of 6" in caplog.text and str(path) in caplog.text
    assert [p["chosen"] for p in pairs] == ["Blue!", "Hello.", ""]
    # judged with their reasoning, the two think-pairs differ
    _, counts = pf.clean_pairs(lines, strip_reasoning=False)
    assert counts.identical == 2


def test_a_file_of_identical_pairs_is_an_error(tmp_path):
    path = _write(tmp_path, [{**GOOD, "rejected": GOOD["chosen"]}])
    with pytest.raises(DataError, match="no usable preference pairs"):
        pf.read_preference_jsonl(path)


def test_scored_response():
    assert pf.scored_response("<think>\nhmm\n</think>\n\nFinal!") == "Final!"
    assert pf.scored_response("hmm\n</think>\nFinal!", thinking=True) == "Final!"
    assert pf.scored_response("still thinking", thinking=True) == ""  # never closed
    assert pf.scored_response("<think>never closed") == ""
    assert pf.scored_response(" plain ") == "plain"
    raw = "<think>r</think>x"
    assert pf.scored_response(raw, strip_reasoning=False) == raw


def test_render_scored_ends_at_im_end_and_strips_reasoning(tokenizer):
    ids = pf.render_scored(tokenizer, "Q?", "<think>secret</think>Answer!")
    text = tokenizer.decode(ids)
    assert ids[-1] == tokenizer.im_end_id and text.endswith(f"Answer!{IM_END}")
    assert "secret" not in text
    assert text == render_text(
        [{"role": "user", "content": "Q?"}, {"role": "assistant", "content": "Answer!"}],
        thinking=False,
    ).removesuffix("\n")
    kept = tokenizer.decode(
        pf.render_scored(
            tokenizer, "Q?", "secret</think>Answer!", thinking=True, strip_reasoning=False
        )
    )
    assert "<think>\nsecret\n</think>\nAnswer!" in kept


def test_pair_batch_right_pads_and_marks_last_tokens():
    pairs = [{"chosen": [5, 6, 7], "rejected": [5, 8]}, {"chosen": [1], "rejected": [2, 3, 4, 9]}]
    b = pf.pair_batch(pairs, seq_len=6, num_pairs=3, pad_id=0)
    assert b["chosen_ids"].tolist() == [[5, 6, 7, 0, 0, 0], [1, 0, 0, 0, 0, 0], [0] * 6]
    assert b["rejected_ids"][1].tolist() == [2, 3, 4, 9, 0, 0]
    assert b["chosen_last"].tolist() == [2, 0, 0] and b["rejected_last"].tolist() == [1, 3, 0]
    assert b["pair_mask"].tolist() == [1.0, 1.0, 0.0]
    assert set(b) == set(pf.PAIR_KEYS) and b["chosen_ids"].dtype == np.int32
    with pytest.raises(ValueError, match="row 0 has 7 tokens"):
        pf.pair_batch([{"chosen": [1] * 7, "rejected": [1]}], seq_len=6, num_pairs=1, pad_id=0)


def test_tokenize_pairs_skips_overlong_and_dataset_resumes(tokenizer, caplog):
    pairs = [{"prompt": f"Say {i}.", "chosen": f"{i}!", "rejected": f"{i}."} for i in range(10)]
    pairs.append({"prompt": "long " * 200, "chosen": "a", "rejected": "b"})
    with caplog.at_level(logging.WARNING):
        tok, overlong = pf.tokenize_pairs(pairs, tokenizer, seq_len=48)
    assert (len(tok), overlong) == (10, 1) and "longer than seq_len=48" in caplog.text
    with pytest.raises(ValueError, match="no preference pair fits"):
        pf.tokenize_pairs(pairs[-1:], tokenizer, seq_len=48)

    ds = pf.preference_dataset(tok, batch_size=4, seq_len=48, pad_id=tokenizer.pad_id, seed=1)
    it = iter(ds)
    next(it)
    state = it.get_state()
    want = [next(it) for _ in range(3)]
    it2 = iter(ds)
    it2.set_state(state)
    for a in want:
        b = next(it2)
        assert all(np.array_equal(a[k], b[k]) for k in pf.PAIR_KEYS)
    assert want[0]["chosen_ids"].shape == (4, 48)
    # one epoch: the short last batch is padded with pair_mask 0
    last = list(
        pf.preference_dataset(tok, batch_size=4, seq_len=48, pad_id=0, seed=1, num_epochs=1)
    )
    assert len(last) == 3 and last[-1]["pair_mask"].tolist() == [1, 1, 0, 0]
