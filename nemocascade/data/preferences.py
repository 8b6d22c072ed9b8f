"""Preference pairs for reward models: JSONL reading with validation, cleaning, what a reward
model sees of a (prompt, response), and fixed-shape batches.

Record (one JSON object per line)::

    {"prompt": "Which is ...?"  or  [{"role": "user", "content": "..."}, ...],
     "chosen": "the preferred response", "rejected": "the other response",
     "domain": "chat", ...}                   (domain optional; other keys are kept)

Validation, with `file:line` errors as in `sources.py`: `prompt` is a non-empty string or a
non-empty list of chat messages (the rules of `sources.py`; it must not end with an assistant
message); `chosen` and `rejected` are present and strings. An empty response is allowed (a
model may answer nothing) and counted.

Cleaning (`clean_pairs`): a pair whose chosen and rejected are the same text as the reward model
sees them (after reasoning stripping, edge whitespace ignored) carries no signal: it is skipped
and counted, with one warning per source.

What a reward model sees (`render_scored`): the prompt, then the response as one assistant turn,
rendered by the chat template and ending at that turn's `<|im_end|>` (no newline after it); the
last token, `<|im_end|>`, is the one whose final hidden state the head reads.
  * `strip_reasoning=True` (default; Cascade 2's RLHF judges responses without their reasoning
    trace): the response is reduced to its final answer (`scored_response`: the text after the
    last `</think>`; empty if a reasoning block is never closed, which with `thinking=True`, a
    response sampled after the prompt opened `<think>`, means any response without `</think>`)
    and rendered in non-thinking mode, `<think></think>{answer}`;
  * `strip_reasoning=False`: the response is rendered with its reasoning in `thinking` mode.

Batch of P pairs (`pair_batch`), right-padded to T = seq_len::

    chosen_ids     [P, T] int32    pad_id after the sequence
    chosen_last    [P]    int32    index of the last real token (<|im_end|>)
    rejected_ids   [P, T] int32
    rejected_last  [P]    int32
    pair_mask      [P]    float32  1 for a real pair, 0 for a padding pair (a short last batch)

A pair that does not fit `seq_len` is skipped and counted (`tokenize_pairs`): cutting it would
make the reward model judge a response that is not the one in the data. Rows to score
(`sequence_batch`) are `input_ids [R, T]` and `last [R]` the same way.
"""

from __future__ import annotations

import dataclasses
import functools
import logging
import os
from collections.abc import Mapping, Sequence
from typing import Any

import grain
import numpy as np

from nemocascade.data.chat import render_text
from nemocascade.data.sources import (
    MAX_RECORD_CHARS,
    DataError,
    _check_messages,
    _check_str,
    _FieldError,
    _read_jsonl,
)
from nemocascade.data.tokenizer import IM_END, THINK, THINK_END, Tokenizer

log = logging.getLogger(__name__)

PAIR_KEYS = ("chosen_ids", "chosen_last", "rejected_ids", "rejected_last", "pair_mask")


@dataclasses.dataclass
class PairCounts:
    """What reading and cleaning did: `read` pairs, of which `identical` were skipped (no
    signal); `empty_chosen` / `empty_rejected`: kept pairs with an empty response (as scored);
    `bad_lines` / `too_long`: JSONL lines skipped (`skip_bad`, `max_record_chars`). Pairs too
    long for the sequence length are counted later, by `tokenize_pairs`."""

    read: int = 0
    identical: int = 0
    empty_chosen: int = 0
    empty_rejected: int = 0
    bad_lines: int = 0
    too_long: int = 0

    @property
    def kept(self) -> int:
        return self.read - self.identical


# ----------------------------------------------------------------------------- validation
def validate_preference_record(record: Any) -> None:
    """Raises `sources._FieldError` naming the field if `record` is not a valid preference pair."""
    if not isinstance(record, dict):
        raise _FieldError("<record>", f"expected a JSON object, got {type(record).__name__}")
    if "prompt" not in record:
        raise _FieldError("prompt", "missing")
    prompt = record["prompt"]
    if isinstance(prompt, list):
        try:
            messages = _check_messages({"messages": prompt})
        except _FieldError as e:  # the message rules of sources.py, named after our field
            renamed = _FieldError("prompt", "")
            renamed.args = (str(e).replace("field 'messages", "field 'prompt", 1),)
            raise renamed from None
        if messages[-1]["role"] == "assistant":
            raise _FieldError(
                f"prompt[{len(messages) - 1}].role",
                "a prompt must not end with an assistant message",
            )
    else:
        _check_str(record, "prompt", nonempty=True)
    for key in ("chosen", "rejected"):
        _check_str(record, key)
    if "domain" in record:
        _check_str(record, "domain", nonempty=True)


def prompt_messages(prompt: str | Sequence[Mapping]) -> list[dict]:
    """A prompt as chat messages (a string is one user message)."""
    if isinstance(prompt, str):
        return [{"role": "user", "content": prompt}]
    return [dict(m) for m in prompt]


def scored_response(response: str, *, thinking: bool = False, strip_reasoning: bool = True) -> str:
    """The part of `response` a reward model judges (see the module docstring)."""
    if not strip_reasoning:
        return response
    if THINK_END in response:
        return response.rsplit(THINK_END, 1)[1].strip()
    if thinking or THINK in response:
        return ""
    return response.strip()


def clean_pairs(
    pairs: Sequence[Mapping],
    *,
    thinking: bool = False,
    strip_reasoning: bool = True,
    source: str = "<memory>",
) -> tuple[list[dict], PairCounts]:
    """The pairs that carry a signal, and the counts (see `PairCounts`)."""
    counts = PairCounts(read=len(pairs))
    kept = []
    for p in pairs:
        c, r = (
            scored_response(p[k], thinking=thinking, strip_reasoning=strip_reasoning)
            for k in ("chosen", "rejected")
        )
        if c.strip() == r.strip():
            counts.identical += 1
            continue
        counts.empty_chosen += not c.strip()
        counts.empty_rejected += not r.strip()
        kept.append(dict(p))
    if counts.identical:
        log.warning(
            "%s: skipped %d of %d preference pairs whose chosen and rejected responses are "
            "identical as scored (no signal)",
            source,
            counts.identical,
            counts.read,
        )
    return kept, counts


def read_preference_jsonl(
    path: str | os.PathLike,
    *,
    skip_bad: bool = False,
    max_record_chars: int = MAX_RECORD_CHARS,
    thinking: bool = False,
    strip_reasoning: bool = True,
) -> tuple[list[dict], PairCounts]:
    """(valid pairs that carry a signal, counts) of a JSONL file; a bad line raises
    `DataError("file.jsonl:17: field 'chosen': ...")` (or is skipped and counted with
    `skip_bad`); a file left without pairs raises `DataError`."""
    records, skipped = _read_jsonl(
        path, validate_preference_record, skip_bad=skip_bad, max_record_chars=max_record_chars
    )
    kept, counts = clean_pairs(
        records, thinking=thinking, strip_reasoning=strip_reasoning, source=os.fspath(path)
    )
    counts.bad_lines, counts.too_long = skipped.bad, skipped.too_long
    if not kept:
        raise DataError(
            f"{os.fspath(path)}: no usable preference pairs ({counts.identical} of "
            f"{counts.read} have identical chosen and rejected responses)"
        )
    return kept, counts


# ----------------------------------------------------------------------------- rendering
def render_scored(
    tokenizer: Tokenizer,
    prompt: str | Sequence[Mapping],
    response: str,
    *,
    thinking: bool = False,
    strip_reasoning: bool = True,
    tools: Sequence[Mapping] | None = None,
) -> list[int]:
    """Token ids of `prompt + response` as a reward model sees them, ending with `<|im_end|>`
    (see the module docstring)."""
    content = scored_response(response, thinking=thinking, strip_reasoning=strip_reasoning)
    messages = prompt_messages(prompt) + [{"role": "assistant", "content": content}]
    text = render_text(messages, thinking=thinking and not strip_reasoning, tools=tools)
    if not text.endswith(IM_END + "\n"):
        raise AssertionError(f"a rendered assistant turn ends with {text[-20:]!r}")
    return tokenizer.encode(text[:-1])


def tokenize_pairs(
    pairs: Sequence[Mapping],
    tokenizer: Tokenizer,
    *,
    seq_len: int,
    thinking: bool = False,
    strip_reasoning: bool = True,
    source: str = "<memory>",
) -> tuple[list[dict[str, np.ndarray]], int]:
    """(`{"chosen": ids, "rejected": ids}` int32 per pair that fits `seq_len`, number skipped
    for not fitting). Raises ValueError if none fits."""
    out, overlong = [], 0
    for p in pairs:
        ids = {
            k: np.asarray(
                render_scored(
                    tokenizer,
                    p["prompt"],
                    p[k],
                    thinking=thinking,
                    strip_reasoning=strip_reasoning,
                    tools=p.get("tools"),
                ),
                np.int32,
            )
            for k in ("chosen", "rejected")
        }
        if max(len(v) for v in ids.values()) > seq_len:
            overlong += 1
            continue
        out.append(ids)
    if overlong:
        log.warning(
            "%s: skipped %d of %d preference pairs longer than seq_len=%d tokens",
            source,
            overlong,
            len(pairs),
            seq_len,
        )
    if not out:
        raise ValueError(f"{source}: no preference pair fits seq_len={seq_len}")
    return out, overlong


# ----------------------------------------------------------------------------- batches
def sequence_batch(
    seqs: Sequence[Sequence[int]], *, seq_len: int, num_rows: int, pad_id: int
) -> dict[str, np.ndarray]:
    """`{"input_ids": [num_rows, seq_len], "last": [num_rows]}`: each sequence right-padded
    with `pad_id`, `last` the index of its last token (0 on the padding rows after them)."""
    if len(seqs) > num_rows:
        raise ValueError(f"sequence_batch: {len(seqs)} sequences > num_rows={num_rows}")
    ids = np.full((num_rows, seq_len), pad_id, np.int32)
    last = np.zeros((num_rows,), np.int32)
    for i, s in enumerate(seqs):
        if not 1 <= len(s) <= seq_len:
            raise ValueError(f"sequence_batch: row {i} has {len(s)} tokens, not in [1, {seq_len}]")
        ids[i, : len(s)] = s
        last[i] = len(s) - 1
    return {"input_ids": ids, "last": last}


def pair_batch(
    pairs: Sequence[Mapping[str, Sequence[int]]], *, seq_len: int, num_pairs: int, pad_id: int
) -> dict[str, np.ndarray]:
    """The batch layout of the module docstring from tokenized pairs (padding pairs after them
    have pair_mask 0)."""
    out = {}
    for side in ("chosen", "rejected"):
        b = sequence_batch(
            [p[side] for p in pairs], seq_len=seq_len, num_rows=num_pairs, pad_id=pad_id
        )
        out[f"{side}_ids"], out[f"{side}_last"] = b["input_ids"], b["last"]
    out["pair_mask"] = (np.arange(num_pairs) < len(pairs)).astype(np.float32)
    return out


def preference_dataset(
    tokenized: Sequence[Mapping[str, np.ndarray]],
    *,
    batch_size: int,
    seq_len: int,
    pad_id: int,
    seed: int,
    shuffle: bool = True,
    num_epochs: int | None = None,
    shard_index: int = 0,
    shard_count: int = 1,
) -> grain.IterDataset:
    """A grain dataset of `pair_batch`es of `batch_size` pairs from tokenized pairs
    (`tokenize_pairs`): this shard's pairs `[shard_index::shard_count]`, shuffled by `seed` (anew
    each epoch), repeated `num_epochs` times (None: forever). A finite last batch is padded with
    pair_mask 0. The iterator is checkpointable (`get_state` / `set_state`)."""
    if not 0 <= shard_index < shard_count:
        raise ValueError(f"shard_index={shard_index} must be in [0, shard_count={shard_count})")
    if num_epochs is not None and num_epochs < 1:
        raise ValueError(f"num_epochs={num_epochs} must be >= 1 or None")
    ds = grain.MapDataset.source(list(tokenized))[shard_index::shard_count]
    if len(ds) == 0:
        raise ValueError(f"shard {shard_index}/{shard_count} of {len(tokenized)} pairs is empty")
    if shuffle:
        ds = ds.shuffle(seed=seed)
    batch_fn = functools.partial(pair_batch, seq_len=seq_len, num_pairs=batch_size, pad_id=pad_id)
    return (
        ds.repeat(num_epochs)
        .to_iter_dataset()
        .batch(batch_size, drop_remainder=num_epochs is None, batch_fn=batch_fn)
    )
