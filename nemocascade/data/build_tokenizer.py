"""Train the tiny byte-level BPE from the project's own JSONL data (the real one can't be fetched).

    python -m nemocascade.data.build_tokenizer --vocab_size=2048 --out=DIR/tokenizer.json \\
        --chat=sft.jsonl --prompts=rl_prompts.jsonl

Every chat record is rendered with the chat template in both thinking and
non-thinking mode and every prompt record as its thinking-mode prompt (tool
declarations included), so the merges cover the template's own text; records
over `sources.MAX_RECORD_CHARS` are skipped and texts are cut to
`tokenizer.MAX_TEXT_CHARS`, so training time is bounded; the special tokens
take ids 0..8 (`tokenizer.TRAINED_SPECIALS`). Load the result with
`Tokenizer.from_file`.
"""

from __future__ import annotations

import argparse
import os
from collections.abc import Iterator, Sequence

from nemocascade.data.chat import render_text
from nemocascade.data.sources import read_chat_jsonl, read_prompt_jsonl
from nemocascade.data.tokenizer import Tokenizer, train_bpe


def corpus_texts(
    chat_paths: Sequence[str | os.PathLike] = (), prompt_paths: Sequence[str | os.PathLike] = ()
) -> Iterator[str]:
    """Rendered template text of every record in the given (validated) JSONL files."""
    for path in chat_paths:
        for record in read_chat_jsonl(path)[0]:
            tools = record.get("tools")
            yield render_text(record["messages"], thinking=True, tools=tools)
            yield render_text(record["messages"], thinking=False, tools=tools)
    for path in prompt_paths:
        for record in read_prompt_jsonl(path)[0]:
            messages = record.get("messages") or [{"role": "user", "content": record["prompt"]}]
            yield render_text(
                messages, thinking=True, add_generation_prompt=True, tools=record.get("tools")
            )


def train_from_jsonl(
    chat_paths: Sequence[str | os.PathLike],
    prompt_paths: Sequence[str | os.PathLike],
    *,
    vocab_size: int,
    out: str | os.PathLike,
) -> Tokenizer:
    """Trains a BPE of at most `vocab_size` ids on the files and writes it to `out`."""
    if not chat_paths and not prompt_paths:
        raise ValueError("no data files given")
    return train_bpe(corpus_texts(chat_paths, prompt_paths), vocab_size, out)


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--chat", action="append", default=[], help="chat JSONL (repeatable)")
    parser.add_argument(
        "--prompts", action="append", default=[], help="RL prompt JSONL (repeatable)"
    )
    parser.add_argument("--vocab_size", type=int, required=True)
    parser.add_argument("--out", required=True, help="tokenizer.json path or an existing directory")
    args = parser.parse_args(argv)
    tok = train_from_jsonl(args.chat, args.prompts, vocab_size=args.vocab_size, out=args.out)
    print(f"wrote {tok.source} ({tok.vocab_size} ids)")


if __name__ == "__main__":
    main()
