"""Tokenizer wrapper: special-token layout, round trip, file loading, missing-special errors."""

import logging

import pytest
import tokenizers
from tokenizers import models, pre_tokenizers

from nemocascade.data import MissingSpecialTokensError, Tokenizer, train_bpe
from nemocascade.data.tokenizer import TRAINED_SPECIALS

ROUND_TRIP_TEXTS = [
    "Hello world!",
    "  leading spaces, tabs\tand\nnewlines\n\n",
    "Unicode: héllo, 日本語, emoji 🙂, ∑ x_i²",
    "<|im_start|>user\nhi<|im_end|>\n<think>\nr\n</think>\nok",
    "",
]


def test_trained_special_ids(tokenizer):
    assert [tokenizer.token_to_id(t) for t in TRAINED_SPECIALS] == list(
        range(len(TRAINED_SPECIALS))
    )
    assert (tokenizer.pad_id, tokenizer.bos_id, tokenizer.eos_id) == (0, 1, 2)
    assert (tokenizer.im_start_id, tokenizer.im_end_id) == (3, 4)
    assert (tokenizer.think_id, tokenizer.think_end_id) == (5, 6)
    assert 256 + len(TRAINED_SPECIALS) < tokenizer.vocab_size <= 512


@pytest.mark.parametrize("text", ROUND_TRIP_TEXTS)
def test_round_trip(tokenizer, text):
    ids = tokenizer.encode(text)
    assert all(0 <= i < tokenizer.vocab_size for i in ids)
    assert tokenizer.decode(ids) == text


def test_specials_are_single_ids_and_no_bos(tokenizer):
    ids = tokenizer.encode("<|im_start|>assistant\n<think></think>x<|im_end|>")
    assert ids[0] == tokenizer.im_start_id and ids[-1] == tokenizer.im_end_id
    assert ids.count(tokenizer.think_id) == 1 and ids.count(tokenizer.think_end_id) == 1
    assert tokenizer.bos_id not in ids and tokenizer.eos_id not in ids
    # merges learned from the data: common words are shorter than their bytes
    assert len(tokenizer.encode("assistant")) < len("assistant")


def test_save_and_reload(tokenizer, tmp_path):
    tokenizer.save(tmp_path / "tokenizer.json")
    again = Tokenizer.from_file(tmp_path)  # a directory holding tokenizer.json
    text = ROUND_TRIP_TEXTS[2] + ROUND_TRIP_TEXTS[3]
    assert again.encode(text) == tokenizer.encode(text)
    assert again.vocab_size == tokenizer.vocab_size


def _bare_bpe(specials):
    tok = tokenizers.Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.add_special_tokens(list(specials))
    return tok


def test_missing_specials_listed(tmp_path):
    path = tmp_path / "tokenizer.json"
    _bare_bpe(["<s>", "</s>", "<|im_start|>", "<|im_end|>"]).save(str(path))
    with pytest.raises(MissingSpecialTokensError) as e:
        Tokenizer.from_file(path)
    msg = str(e.value)
    for name in ("<pad> or <unk>", "<think>", "</think>"):
        assert name in msg
    assert "<|im_end|>" not in msg and str(path) in msg


def test_unk_serves_as_pad_like_the_released_tokenizer(tmp_path):
    # The released tokenizer has <unk> (not <pad>) at id 0.
    specials = ["<unk>", "<s>", "</s>", "<|im_start|>", "<|im_end|>", "<think>", "</think>"]
    path = tmp_path / "tokenizer.json"
    _bare_bpe(specials).save(str(path))
    tok = Tokenizer.from_file(path)
    assert (tok.pad_id, tok.bos_id, tok.eos_id, tok.im_end_id) == (0, 1, 2, 4)


def test_train_bpe_rejects_tiny_vocab():
    with pytest.raises(ValueError, match="vocab_size=100"):
        train_bpe(["abc"], 100)


def test_missing_file(tmp_path):
    with pytest.raises(FileNotFoundError):
        Tokenizer.from_file(tmp_path / "nope.json")


def test_build_tokenizer_cli(chat_path, prompt_path, tmp_path, capsys, chat_records):
    from nemocascade.data import render_text
    from nemocascade.data.build_tokenizer import main

    main(
        [
            "--chat",
            str(chat_path),
            "--prompts",
            str(prompt_path),
            "--vocab_size=400",
            f"--out={tmp_path}",
        ]
    )
    assert "tokenizer.json (400 ids)" in capsys.readouterr().out
    tok = Tokenizer.from_file(tmp_path / "tokenizer.json")
    assert tok.vocab_size == 400 and tok.im_end_id == 4
    text = render_text(chat_records[0]["messages"])
    ids = tok.encode(text)
    assert tok.decode(ids) == text and len(ids) < len(text.encode()) / 2


@pytest.mark.parametrize("content", [b"", b'{"model": ', b"\xff\xfe not json", b"{}"])
def test_corrupt_file_is_named(tmp_path, content):
    path = tmp_path / "tokenizer.json"
    path.write_bytes(content)
    with pytest.raises(ValueError, match="not a valid tokenizer.json") as e:
        Tokenizer.from_file(path)
    assert str(e.value).startswith(str(path))


def test_train_bpe_truncates_texts_over_the_cap(caplog):
    texts = ["ab cd " * 10, "ab " * 20 + "zq" * 500]
    with caplog.at_level(logging.WARNING, logger="nemocascade.data.tokenizer"):
        tok = train_bpe(texts, 300, max_text_chars=60)
    assert "text 1 has 1060 characters; training on its first 60" in caplog.text
    assert "truncated 1 text(s) to max_text_chars=60" in caplog.text
    # nothing past the cap was trained on: "zq" never merged
    assert len(tok.encode("zqzq")) == 4 and len(tok.encode("ab")) == 1
    assert len(train_bpe(texts, 300).encode("zqzq")) < 4
