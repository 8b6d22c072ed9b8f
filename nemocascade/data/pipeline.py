"""grain pipelines: chat records -> packed, batched numpy arrays for SFT (`sft_dataset`);
RL prompt records -> batches of prompt token ids (`prompt_dataset`).

Order of operations (`sft_dataset`)::

    records --shard [shard_index::shard_count]--> --shuffle(seed), reshuffled per epoch-->
    --repeat(num_epochs)--> --render + tokenise--> --overlong: truncate | split-->
    --grain FirstFitPackIterDataset--> --rename--> --batch(batch_size)

Target convention (no target ever crosses a document boundary): each document's
tokens `t[0..L-1]` and loss mask `m` (from `render_chat`) become, BEFORE packing,

    inputs  = t[:-1]      targets = t[1:]      loss_mask = m[1:]

so `input_ids[b, j]` is trained to predict `targets[b, j]` with weight
`loss_mask[b, j]` (the mask of the target token). A loss is therefore
`sum(loss_mask * ce(logits(input_ids), targets)) / sum(loss_mask)` with no shift.

Batch (`T = seq_len`)::

    input_ids    [B, T] int32    token ids, 0 on padding
    targets      [B, T] int32    next token of the same document, 0 on padding
    loss_mask    [B, T] float32  1.0 where the target is an assistant token
    segment_ids  [B, T] int32    1, 2, ... per document in the row; 0 = padding
    positions    [B, T] int32    position within its document, restarting at 0
    num_overlong [B]    int32    documents in the row that were longer than T
    num_dropped  [B]    int32    tokens those documents lost to truncation

Documents longer than the row (`len(inputs) > seq_len`) are never silently
lost: `overlong="truncate"` keeps the first `seq_len` positions and counts the
dropped ones; `overlong="split"` cuts the document into consecutive chunks of
at most `seq_len`, each packed as its own segment (positions restart at 0,
attention does not cross chunks). Both count the document in `num_overlong`
(on the row that holds its first chunk).

Packing is grain's first-fit packing (`grain.experimental.FirstFitPackIterDataset`):
`num_packing_bins` rows are filled in order, each document going to the first
row with room; when one does not fit, all rows are emitted (in a seeded
shuffled order when `shuffle`) and packing restarts. grain packs every
sequence feature independently; `loss_mask` and `targets` are simply packed as
features of the same length as `inputs`, so their segment ids and positions
equal those of `inputs` (only the latter are returned).

The iterator (`iter(ds)`) is a grain `DatasetIterator`: `get_state()` returns a
JSON-serialisable dict and `set_state(state)` resumes exactly after it.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any

import grain
import grain.experimental as grain_exp
import numpy as np

from nemocascade.data.chat import render_chat, render_prompt
from nemocascade.data.tokenizer import Tokenizer

PACKED_FEATURES = ("inputs", "targets", "loss_mask")
OVERLONG_MODES = ("truncate", "split")


def tokenize_chat_record(
    record: Mapping, tokenizer: Tokenizer, *, thinking: bool = True
) -> dict[str, np.ndarray]:
    """One chat record as `inputs`, `targets`, `loss_mask` ([L-1] int32 each); see module doc.

    The record's `tools` (if any) are declared in the system turn.
    """
    ids, mask = render_chat(
        tokenizer, record["messages"], thinking=thinking, tools=record.get("tools")
    )
    if len(ids) < 2:
        raise ValueError(f"record renders to {len(ids)} token(s); need at least 2")
    ids_L = np.asarray(ids, dtype=np.int32)
    mask_L = np.asarray(mask, dtype=np.int32)
    return {"inputs": ids_L[:-1], "targets": ids_L[1:], "loss_mask": mask_L[1:]}


class _HandleOverlong(grain_exp.FlatMapTransform):
    """Truncates or splits documents longer than `seq_len`, and counts them."""

    max_fan_out = 1 << 20  # only used by MapDataset flat maps; splits are unbounded here

    def __init__(self, seq_len: int, mode: str):
        self.seq_len, self.mode = seq_len, mode

    def flat_map(self, doc: Mapping[str, np.ndarray]) -> list[dict[str, Any]]:
        n = len(doc["inputs"])
        overlong = n > self.seq_len
        if not overlong or self.mode == "split":
            starts = range(0, n, self.seq_len)
            dropped = 0
        else:  # truncate
            starts = range(1)
            dropped = n - self.seq_len
        chunks = []
        for k, s in enumerate(starts):
            chunk = {f: doc[f][s : s + self.seq_len] for f in PACKED_FEATURES}
            chunk["overlong"] = np.int32(overlong and k == 0)
            chunk["dropped"] = np.int32(dropped if k == 0 else 0)
            chunks.append(chunk)
        return chunks


def _finalize_row(row: Mapping[str, Any]) -> dict[str, np.ndarray]:
    """Renames grain's packed features to the batch layout of the module docstring."""
    return {
        "input_ids": row["inputs"],
        "targets": row["targets"],
        "loss_mask": row["loss_mask"].astype(np.float32),
        "segment_ids": row["inputs_segment_ids"],
        "positions": row["inputs_positions"],
        "num_overlong": np.int32(sum(int(x) for x in row["overlong"])),
        "num_dropped": np.int32(sum(int(x) for x in row["dropped"])),
    }


def pack_documents(
    docs: grain.IterDataset,
    *,
    seq_len: int,
    num_packing_bins: int,
    seed: int,
    shuffle_bins: bool = True,
    overlong: str = "truncate",
) -> grain.IterDataset:
    """Packs documents (dicts of `inputs`/`targets`/`loss_mask` [L] int32) into rows of `seq_len`.

    Yields unbatched rows with the keys of the module docstring (shapes [T] and []).
    """
    if overlong not in OVERLONG_MODES:
        raise ValueError(f"overlong={overlong!r}: expected one of {list(OVERLONG_MODES)}")
    if seq_len < 1 or num_packing_bins < 1:
        raise ValueError(
            f"need seq_len >= 1 and num_packing_bins >= 1, got {seq_len}, {num_packing_bins}"
        )
    docs = grain_exp.FlatMapIterDataset(docs, _HandleOverlong(seq_len, overlong))
    packed = grain_exp.FirstFitPackIterDataset(
        docs,
        length_struct={f: seq_len for f in PACKED_FEATURES},
        num_packing_bins=num_packing_bins,
        seed=seed,
        shuffle_bins=shuffle_bins,
        meta_features=("overlong", "dropped"),
    )
    return packed.map(_finalize_row)


def sft_dataset(
    records: Sequence[Mapping],
    tokenizer: Tokenizer,
    *,
    seq_len: int,
    batch_size: int,
    seed: int,
    shuffle: bool = True,
    num_epochs: int | None = None,
    shard_index: int = 0,
    shard_count: int = 1,
    thinking: bool = True,
    non_thinking_fraction: float = 0.0,
    overlong: str = "truncate",
    num_packing_bins: int | None = None,
    drop_remainder: bool = True,
) -> grain.IterDataset:
    """A grain dataset of packed SFT batches from validated chat records (see module doc).

    `shard_index`/`shard_count` (normally `jax.process_index()`/`jax.process_count()`)
    give each process the disjoint slice `records[shard_index::shard_count]`,
    shuffled with `seed` (a new order each epoch). `num_epochs=None` repeats
    forever; prefer it for multi-process training and stop by step count,
    since shards pack into different numbers of rows and a finite pipeline
    would end at a different step on each process. `num_packing_bins`
    defaults to `batch_size`.

    `thinking=False` renders every record in non-thinking mode. With
    `thinking=True`, a seeded random `non_thinking_fraction` of the samples is
    rendered in non-thinking mode instead (Nemotron-3-Nano's SFT stripped the
    reasoning of 10% of samples to teach the on/off switch).
    """
    ds = _shuffled_shard(records, seed, shuffle, num_epochs, shard_index, shard_count)
    if not 0.0 <= non_thinking_fraction <= 1.0:
        raise ValueError(f"non_thinking_fraction={non_thinking_fraction} must be in [0, 1]")
    if thinking and non_thinking_fraction > 0:
        docs = ds.random_map(
            lambda r, rng: tokenize_chat_record(
                r, tokenizer, thinking=rng.random() >= non_thinking_fraction
            ),
            seed=seed,
        )
    else:
        docs = ds.map(lambda r: tokenize_chat_record(r, tokenizer, thinking=thinking))
    rows = pack_documents(
        docs.to_iter_dataset(),
        seq_len=seq_len,
        num_packing_bins=num_packing_bins or batch_size,
        seed=seed,
        shuffle_bins=shuffle,
        overlong=overlong,
    )
    return rows.batch(batch_size, drop_remainder=drop_remainder)


def mixed_length_dataset(
    records: Sequence[Mapping],
    tokenizer: Tokenizer,
    shapes: Sequence[tuple[int, int]],
    make: Callable[[list[Mapping], int, int], grain.IterDataset],
    *,
    thinking: bool = True,
    repeat: bool = True,
) -> grain.IterDataset:
    """Batches of several row shapes from one record list (sequence-length bucketing).

    `shapes` are `(seq_len, batch_size)` pairs; each record goes to the shortest shape whose rows
    hold it as rendered (`thinking`: the longer rendering), a record longer than every shape to
    the longest (where `overlong` applies). `make(records, seq_len, batch_size)` builds one
    shape's dataset (e.g. `sft_dataset`). With `repeat` (infinite datasets from `make`) the
    shapes are mixed with weights proportional to their records' tokens per batch (tokens /
    (seq_len x batch_size)), so every record is drawn at the same rate whatever its shape;
    grain's mix is deterministic and its iterator state resumes exactly. Without `repeat`, the
    shapes follow one another, shortest first (every batch once: evaluation)."""
    seq_lens = sorted(s for s, _ in shapes)
    if len(set(seq_lens)) != len(seq_lens):
        raise ValueError(f"two shapes with one seq_len: {list(shapes)}")
    batch_of = dict(shapes)
    groups: dict[int, list[Mapping]] = {s: [] for s in seq_lens}
    tokens: dict[int, int] = dict.fromkeys(seq_lens, 0)
    for r in records:
        n = len(tokenize_chat_record(r, tokenizer, thinking=thinking)["inputs"])
        fit = next((s for s in seq_lens if n <= s), seq_lens[-1])
        groups[fit].append(r)
        tokens[fit] += min(n, fit)
    parts = {f"seq_len_{s}": make(groups[s], s, batch_of[s]) for s in seq_lens if groups[s]}
    if not parts:
        raise ValueError("no records to batch")
    if not repeat:
        return grain_exp.InterleaveIterDataset(
            grain.MapDataset.source(list(parts.values())), cycle_length=1
        )
    weights = {f"seq_len_{s}": tokens[s] / (s * batch_of[s]) for s in seq_lens if groups[s]}
    return grain.IterDataset.mix(parts, weights)


def _shuffled_shard(
    records: Sequence[Mapping],
    seed: int,
    shuffle: bool,
    num_epochs: int | None,
    shard_index: int,
    shard_count: int,
) -> grain.MapDataset:
    """`records[shard_index::shard_count]`, shuffled by `seed` (anew each epoch), repeated."""
    if not 0 <= shard_index < shard_count:
        raise ValueError(f"shard_index={shard_index} must be in [0, shard_count={shard_count})")
    if num_epochs is not None and num_epochs < 1:
        raise ValueError(f"num_epochs={num_epochs} must be >= 1 or None")
    ds = grain.MapDataset.source(list(records))[shard_index::shard_count]
    if len(ds) == 0:
        raise ValueError(f"shard {shard_index}/{shard_count} of {len(records)} records is empty")
    if shuffle:
        ds = ds.shuffle(seed=seed)
    return ds.repeat(num_epochs)


def prompt_dataset(
    records: Sequence[Mapping],
    tokenizer: Tokenizer,
    *,
    batch_size: int,
    seed: int,
    thinking: bool = True,
    shuffle: bool = True,
    num_epochs: int | None = None,
    shard_index: int = 0,
    shard_count: int = 1,
    drop_remainder: bool = True,
) -> grain.IterDataset:
    """A grain dataset of RL prompt batches from validated prompt records.

    Each batch is a list of `batch_size` dicts `{"prompt_ids": list[int],
    "record": dict}` (ragged prompts, the record kept for its domain and
    verifier); `prompt_ids` ends with the generation prefix of the mode
    (`render_prompt`, with the record's `tools` declared). Shuffling,
    sharding, epochs and the checkpointable iterator state work as in
    `sft_dataset`.
    """
    ds = _shuffled_shard(records, seed, shuffle, num_epochs, shard_index, shard_count)

    def tokenize(record: Mapping) -> dict[str, Any]:
        source = record["prompt"] if "prompt" in record else record["messages"]
        ids = render_prompt(tokenizer, source, thinking=thinking, tools=record.get("tools"))
        return {"prompt_ids": ids, "record": record}

    return (
        ds.map(tokenize)
        .to_iter_dataset()
        .batch(batch_size, drop_remainder=drop_remainder, batch_fn=list)
    )
