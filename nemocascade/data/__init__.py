"""Data: tokenizer and chat template, validated JSONL sources, grain packing pipelines."""

from nemocascade.data.chat import render_chat, render_prompt, render_text, split_reasoning
from nemocascade.data.pipeline import (
    pack_documents,
    prompt_dataset,
    sft_dataset,
    tokenize_chat_record,
)
from nemocascade.data.sources import (
    DataError,
    read_chat_jsonl,
    read_prompt_jsonl,
    validate_chat_record,
    validate_prompt_record,
)
from nemocascade.data.tokenizer import MissingSpecialTokensError, Tokenizer, train_bpe

__all__ = [
    "DataError",
    "MissingSpecialTokensError",
    "Tokenizer",
    "pack_documents",
    "prompt_dataset",
    "read_chat_jsonl",
    "read_prompt_jsonl",
    "render_chat",
    "render_prompt",
    "render_text",
    "sft_dataset",
    "split_reasoning",
    "tokenize_chat_record",
    "train_bpe",
    "validate_chat_record",
    "validate_prompt_record",
]
