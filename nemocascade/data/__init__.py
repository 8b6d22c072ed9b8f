"""Data: tokenizer and chat template (thinking modes, tool calls), validated JSONL sources, grain
packing pipelines, and the synthetic task generators (`data.synthetic`)."""

from nemocascade.data.chat import render_chat, render_prompt, render_text, split_reasoning
from nemocascade.data.pipeline import (
    mixed_length_dataset,
    pack_documents,
    prompt_dataset,
    sft_dataset,
    tokenize_chat_record,
)
from nemocascade.data.sources import (
    MAX_RECORD_CHARS,
    DataError,
    SkipCount,
    read_chat_jsonl,
    read_prompt_jsonl,
    validate_chat_record,
    validate_prompt_record,
)
from nemocascade.data.tokenizer import (
    MAX_TEXT_CHARS,
    MissingSpecialTokensError,
    Tokenizer,
    train_bpe,
)
from nemocascade.data.tools import (
    ToolCall,
    ToolCallError,
    ToolSpec,
    parse_tool_calls,
    render_tool_calls,
    render_tool_declarations,
    render_tool_responses,
)

__all__ = [
    "MAX_RECORD_CHARS",
    "MAX_TEXT_CHARS",
    "DataError",
    "SkipCount",
    "ToolCall",
    "ToolCallError",
    "ToolSpec",
    "parse_tool_calls",
    "render_tool_calls",
    "render_tool_declarations",
    "render_tool_responses",
    "MissingSpecialTokensError",
    "Tokenizer",
    "mixed_length_dataset",
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
