"""Fixtures for the data tests: the sample JSONL files and a tiny BPE trained on them."""

import pathlib

import pytest

from nemocascade.data import read_chat_jsonl, render_text, train_bpe

DATA_DIR = pathlib.Path(__file__).parent


@pytest.fixture(scope="session")
def chat_path():
    return DATA_DIR / "chat_sample.jsonl"


@pytest.fixture(scope="session")
def prompt_path():
    return DATA_DIR / "prompts_sample.jsonl"


@pytest.fixture(scope="session")
def chat_records(chat_path):
    records, n_skipped = read_chat_jsonl(chat_path)
    assert n_skipped == 0
    return records


@pytest.fixture(scope="session")
def tokenizer(chat_records, tmp_path_factory):
    """A 512-id byte-level BPE trained on the rendered sample chats, loaded back from disk."""
    texts = [render_text(r["messages"]) for r in chat_records]
    path = tmp_path_factory.mktemp("tok") / "tokenizer.json"
    return train_bpe(texts, 512, path)
