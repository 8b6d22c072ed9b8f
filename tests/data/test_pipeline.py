"""grain pipelines: packing, overlong handling, determinism, sharding, resumable state."""

import collections
import json

import grain
import numpy as np
import pytest

from nemocascade.data import (
    mixed_length_dataset,
    pack_documents,
    render_chat,
    sft_dataset,
    tokenize_chat_record,
)

SEQ_LEN = 96


@pytest.fixture(scope="module")
def records(chat_records):
    """The 12 sample chats plus 28 distinct synthetic ones of varied length."""
    extra = []
    for i in range(28):
        words = " ".join(f"w{i}_{k}" for k in range(1 + (i * 7) % 23))
        extra.append(
            {
                "messages": [
                    {"role": "user", "content": f"Question {i}: repeat {words}"},
                    {"role": "assistant", "reasoning_content": f"r{i}" * (i % 4), "content": words},
                ],
                "domain": "synthetic",
            }
        )
    return list(chat_records) + extra


@pytest.fixture(scope="module")
def docs(records, tokenizer):
    return [tokenize_chat_record(r, tokenizer) for r in records]


def segments(rows):
    """Each (inputs, targets, loss_mask) segment of packed rows as tuples; checks row invariants."""
    out = []
    for row in rows:
        seg, pos = row["segment_ids"], row["positions"]
        pad = seg == 0
        assert not row["input_ids"][pad].any() and not row["loss_mask"][pad].any()
        assert not row["targets"][pad].any() and not pos[pad].any()
        n_seg = seg.max()
        # segments are 1..n, contiguous, then padding
        assert list(seg[~pad]) == sorted(seg[~pad]) and set(seg[~pad]) == set(range(1, n_seg + 1))
        assert not pad[: (~pad).sum()].any()
        for s in range(1, n_seg + 1):
            sel = seg == s
            np.testing.assert_array_equal(pos[sel], np.arange(sel.sum()))
            out.append(
                tuple(tuple(row[k][sel].tolist()) for k in ("input_ids", "targets", "loss_mask"))
            )
    return out


def doc_tuples(doc, start=0, stop=None):
    return tuple(tuple(doc[k][start:stop].tolist()) for k in ("inputs", "targets", "loss_mask"))


def test_document_targets_are_next_tokens(docs, records, tokenizer):
    ids, mask = render_chat(tokenizer, records[0]["messages"])
    d = docs[0]
    assert d["inputs"].dtype == np.int32 and len(d["inputs"]) == len(ids) - 1
    np.testing.assert_array_equal(d["inputs"], ids[:-1])
    np.testing.assert_array_equal(d["targets"], ids[1:])
    np.testing.assert_array_equal(d["loss_mask"], mask[1:])


@pytest.mark.parametrize("mode", ["truncate", "split"])
def test_packing_keeps_every_token_once(docs, mode):
    lengths = np.array([len(d["inputs"]) for d in docs])
    assert (lengths > SEQ_LEN).sum() >= 5 and (
        lengths <= SEQ_LEN // 2
    ).sum() >= 3  # the test data has both
    ds = grain.MapDataset.source(docs).to_iter_dataset()
    rows = list(pack_documents(ds, seq_len=SEQ_LEN, num_packing_bins=4, seed=3, overlong=mode))
    assert all(
        r["input_ids"].shape == (SEQ_LEN,) and r["input_ids"].dtype == np.int32 for r in rows
    )
    assert all(r["loss_mask"].dtype == np.float32 for r in rows)
    got = collections.Counter(segments(rows))
    if mode == "truncate":
        want = collections.Counter(doc_tuples(d, 0, SEQ_LEN) for d in docs)
        assert sum(int(r["num_dropped"]) for r in rows) == int(
            np.maximum(lengths - SEQ_LEN, 0).sum()
        )
    else:
        want = collections.Counter(
            doc_tuples(d, s, s + SEQ_LEN) for d in docs for s in range(0, len(d["inputs"]), SEQ_LEN)
        )
        assert sum(int(r["num_dropped"]) for r in rows) == 0
    assert got == want
    assert sum(int(r["num_overlong"]) for r in rows) == int((lengths > SEQ_LEN).sum())
    # first-fit actually packs several documents into some rows
    assert max(int(r["segment_ids"].max()) for r in rows) >= 2


def test_loss_mask_survives_packing(docs):
    ds = grain.MapDataset.source(docs).to_iter_dataset()
    rows = list(pack_documents(ds, seq_len=512, num_packing_bins=2, seed=0, shuffle_bins=False))
    total = sum(float(r["loss_mask"].sum()) for r in rows)
    assert total == sum(int(d["loss_mask"].sum()) for d in docs) > 0
    # no target crosses a document: inside a segment, target[j] == input[j + 1]
    for r in rows:
        same = (r["segment_ids"][:-1] == r["segment_ids"][1:]) & (r["segment_ids"][:-1] > 0)
        np.testing.assert_array_equal(r["targets"][:-1][same], r["input_ids"][1:][same])


def _batches(records, tokenizer, n=None, **kw):
    kw = {"seq_len": SEQ_LEN, "batch_size": 2, "seed": 0, "num_epochs": 1, **kw}
    it = iter(sft_dataset(records, tokenizer, **kw))
    return [next(it) for _ in range(n)] if n else list(it)


def _rows(batches):
    return [{k: v[i] for k, v in b.items()} for b in batches for i in range(len(b["input_ids"]))]


def _assert_same(a, b):
    assert len(a) == len(b)
    for x, y in zip(a, b, strict=True):
        assert x.keys() == y.keys()
        for k in x:
            np.testing.assert_array_equal(x[k], y[k], err_msg=k)


def test_batch_layout(records, tokenizer):
    b = _batches(records, tokenizer, n=1)[0]
    shapes = {k: (v.shape, v.dtype) for k, v in b.items()}
    i32, f32 = np.dtype(np.int32), np.dtype(np.float32)
    assert shapes == {
        "input_ids": ((2, SEQ_LEN), i32),
        "targets": ((2, SEQ_LEN), i32),
        "loss_mask": ((2, SEQ_LEN), f32),
        "segment_ids": ((2, SEQ_LEN), i32),
        "positions": ((2, SEQ_LEN), i32),
        "num_overlong": ((2,), i32),
        "num_dropped": ((2,), i32),
    }


def test_determinism_by_seed(records, tokenizer):
    a = _batches(records, tokenizer, seed=5, drop_remainder=False)
    _assert_same(a, _batches(records, tokenizer, seed=5, drop_remainder=False))
    c = _batches(records, tokenizer, seed=6, drop_remainder=False)
    assert any(
        not np.array_equal(x["input_ids"], y["input_ids"]) for x, y in zip(a, c, strict=False)
    )
    # a different order of the same documents
    assert collections.Counter(segments(_rows(a))) == collections.Counter(segments(_rows(c)))


def test_shards_cover_data_disjointly(records, tokenizer):
    def segs(**kw):
        bs = _batches(records, tokenizer, seq_len=1024, drop_remainder=False, **kw)
        return collections.Counter(segments(_rows(bs)))

    full = segs()
    s0, s1 = segs(shard_index=0, shard_count=2), segs(shard_index=1, shard_count=2)
    assert sum(full.values()) == len(records) and max(full.values()) == 1
    assert not (s0 & s1) and s0 + s1 == full
    assert sum(s0.values()) == sum(s1.values()) == len(records) // 2
    with pytest.raises(ValueError, match="shard_index=2"):
        sft_dataset(
            records, tokenizer, seq_len=8, batch_size=1, seed=0, shard_index=2, shard_count=2
        )


def test_epochs_reshuffle(records, tokenizer):
    # With one packing bin, rows hold the documents in stream order.
    bs = _batches(records, tokenizer, seq_len=1024, batch_size=1, num_epochs=2, num_packing_bins=1)
    stream = []
    for b in bs:
        seg = b["segment_ids"][0]
        stream += [tuple(b["input_ids"][0][seg == s]) for s in range(1, seg.max() + 1)]
    n = len(records)
    assert len(stream) == 2 * n
    assert sorted(stream[:n]) == sorted(stream[n:]) and stream[:n] != stream[n:]


@pytest.mark.parametrize("skip", [1, 3, 7])
def test_state_restore_resumes_exactly(records, tokenizer, skip):
    # 6 bins, batches of 2: states fall mid-way through a packed group; the
    # infinite repeat crosses epoch boundaries within the 12 checked batches.
    kw = {
        "seq_len": SEQ_LEN,
        "batch_size": 2,
        "seed": 1,
        "num_epochs": None,
        "num_packing_bins": 6,
        "overlong": "split",
    }
    recs = records[:10]  # about 4 batches per epoch
    it = iter(sft_dataset(recs, tokenizer, **kw))
    for _ in range(skip):
        next(it)
    state = json.loads(json.dumps(it.get_state()))
    expected = [next(it) for _ in range(12)]
    it2 = iter(sft_dataset(recs, tokenizer, **kw))
    for _ in range(2):  # somewhere else
        next(it2)
    it2.set_state(state)
    _assert_same([next(it2) for _ in range(12)], expected)


def test_non_thinking_fraction(records, tokenizer):
    with_reasoning = [r for r in records if any(m.get("reasoning_content") for m in r["messages"])]
    kw = {"seq_len": 1024, "drop_remainder": False}

    def segs(**k):
        return collections.Counter(segments(_rows(_batches(with_reasoning, tokenizer, **kw, **k))))

    on, off = segs(thinking=True), segs(thinking=False)
    assert not (on & off)
    assert segs(non_thinking_fraction=1.0) == off
    mixed = segs(non_thinking_fraction=0.5)
    assert mixed == segs(non_thinking_fraction=0.5)  # seeded
    assert sum(mixed.values()) == len(with_reasoning)
    assert (mixed & on) and (mixed & off) and mixed == (mixed & on) + (mixed & off)


def test_prompt_dataset(prompt_path, tokenizer):
    from nemocascade.data import prompt_dataset, read_prompt_jsonl, render_prompt

    prompts, _ = read_prompt_jsonl(prompt_path)
    prompts = [{**p, "idx": i} for i, p in enumerate(prompts * 3)]  # 12 distinct records
    kw = {"batch_size": 2, "seed": 0, "num_epochs": 1}
    batches = list(prompt_dataset(prompts, tokenizer, thinking=False, **kw))
    assert len(batches) == 6 and all(len(b) == 2 for b in batches)
    for item in (x for b in batches for x in b):
        src = item["record"].get("prompt") or item["record"]["messages"]
        assert item["prompt_ids"] == render_prompt(tokenizer, src, thinking=False)
        assert item["prompt_ids"][-2:] == [tokenizer.think_id, tokenizer.think_end_id]
    order = [x["record"]["idx"] for b in batches for x in b]
    assert sorted(order) == list(range(12)) and order != list(range(12))
    shards = [
        [
            x["record"]["idx"]
            for b in prompt_dataset(prompts, tokenizer, shard_index=i, shard_count=2, **kw)
            for x in b
        ]
        for i in range(2)
    ]
    assert not set(shards[0]) & set(shards[1]) and sorted(shards[0] + shards[1]) == sorted(order)
    it = iter(prompt_dataset(prompts, tokenizer, batch_size=2, seed=0))
    next(it)
    state = json.loads(json.dumps(it.get_state()))
    want = [[x["prompt_ids"] for x in next(it)] for _ in range(8)]
    it.set_state(state)
    assert [[x["prompt_ids"] for x in next(it)] for _ in range(8)] == want


def test_records_with_tools_declare_them(tokenizer):
    from nemocascade.data import prompt_dataset

    tools = [{"name": "get_weather", "parameters": {"city": {"type": "string"}}}]
    call = {"name": "get_weather", "arguments": {"city": "Paris"}}
    chat = {
        "messages": [
            {"role": "user", "content": "Weather?"},
            {"role": "assistant", "content": None, "tool_calls": [call]},
        ],
        "tools": tools,
        "domain": "tool_calling",
    }
    doc = tokenize_chat_record(chat, tokenizer)
    text = tokenizer.decode(doc["inputs"].tolist() + doc["targets"][-1:].tolist())
    assert "<name>get_weather</name>" in text and "<parameter=city>\nParis\n" in text
    prompt = {"prompt": "Weather?", "tools": tools, "domain": "t", "verifier": {"type": "t"}}
    (batch,) = prompt_dataset([prompt], tokenizer, batch_size=1, seed=0, num_epochs=1)
    assert "<name>get_weather</name>" in tokenizer.decode(batch[0]["prompt_ids"])


# ------------------------------------------------------------ several row shapes (buckets)
SHAPES = ((48, 4), (SEQ_LEN, 2), (256, 1))


def _mixed(records, tokenizer, repeat=True, seed=0):
    def make(recs, seq_len, batch):
        return sft_dataset(
            recs,
            tokenizer,
            seq_len=seq_len,
            batch_size=batch,
            seed=seed,
            num_epochs=None if repeat else 1,
            overlong="split",
            drop_remainder=repeat,  # every record once, the last batches partial
        )

    return mixed_length_dataset(records, tokenizer, SHAPES, make, repeat=repeat)


def test_mixed_lengths_put_each_record_in_the_shortest_shape_that_holds_it(
    records, docs, tokenizer
):
    lengths = [len(d["inputs"]) for d in docs]
    fit = [next((s for s, _ in SHAPES if n <= s), SHAPES[-1][0]) for n in lengths]
    assert len(set(fit)) == 3  # the test data fills every shape
    batches = list(_mixed(records, tokenizer, repeat=False))
    shapes = [b["input_ids"].shape for b in batches]
    assert {s[1] for s in shapes} == {s for s, _ in SHAPES}
    assert all(b <= dict(SHAPES)[s] for b, s in shapes)
    assert [s[1] for s in shapes] == sorted(s[1] for s in shapes)  # one shape after another
    # every record once in the rows of its shape (split there if longer than the longest)
    assert max(lengths) > SHAPES[-1][0]
    for seq_len, _ in SHAPES:
        rows = _rows([b for b in batches if b["input_ids"].shape[1] == seq_len])
        want = collections.Counter(
            doc_tuples(d, s, s + seq_len)
            for d, f in zip(docs, fit, strict=True)
            if f == seq_len
            for s in range(0, len(d["inputs"]), seq_len)
        )
        assert collections.Counter(segments(rows)) == want, seq_len


def test_mixed_lengths_draw_shapes_by_tokens_and_resume_exactly(records, docs, tokenizer):
    lengths = [len(d["inputs"]) for d in docs]
    fit = [next((s for s, _ in SHAPES if n <= s), SHAPES[-1][0]) for n in lengths]
    weight = {
        s: sum(n for n, f in zip(lengths, fit, strict=True) if f == s) / (s * b) for s, b in SHAPES
    }
    it = iter(_mixed(records, tokenizer))
    drawn = collections.Counter(next(it)["input_ids"].shape[1] for _ in range(300))
    for s, _ in SHAPES:
        assert drawn[s] / 300 == pytest.approx(weight[s] / sum(weight.values()), abs=0.02), s
    state = json.loads(json.dumps(it.get_state()))
    expected = [next(it) for _ in range(10)]
    it2 = iter(_mixed(records, tokenizer))
    next(it2)
    it2.set_state(state)
    _assert_same([next(it2) for _ in range(10)], expected)
    # another seed: another order of shapes' contents, the same shapes' proportions
    other = iter(_mixed(records, tokenizer, seed=5))
    assert not all(np.array_equal(a["input_ids"], next(other)["input_ids"]) for a in expected[:5])


def test_mixed_lengths_reject_a_repeated_seq_len(records, tokenizer):
    with pytest.raises(ValueError, match="one seq_len"):
        mixed_length_dataset(records, tokenizer, ((48, 4), (48, 2)), lambda *a: None)
