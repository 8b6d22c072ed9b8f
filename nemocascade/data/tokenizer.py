"""Tokenizer: any Hugging Face `tokenizer.json`, plus a tiny byte-level BPE trainer.

The released Nemotron-3-Nano / Cascade-2 checkpoints ship a `tokenizer.json`
(a 131072-entry byte-level BPE). `Tokenizer.from_file` loads it, or the small
BPE that `train_bpe` trains from the project's own text for tests and the tiny
pipeline, through the same code path.

Special tokens. The chat template needs `<s>`, `</s>`, `<|im_start|>`,
`<|im_end|>`, `<think>`, `</think>` and a padding token (`<pad>`, or `<unk>` as
in the released tokenizer where id 0 is `<unk>`). `from_file` raises
`MissingSpecialTokensError` listing every one that is absent. `train_bpe` puts
them first: `<pad>`=0, `<s>`=1, `</s>`=2, `<|im_start|>`=3, `<|im_end|>`=4,
`<think>`=5, `</think>`=6, `<tool_call>`=7, `</tool_call>`=8. The chat stop
token for generation is `<|im_end|>` (`Tokenizer.im_end_id`).

`encode` never adds BOS/EOS (the chat template does not use them); special
tokens written in the text (e.g. `<|im_start|>`) are recognised as single ids.
`decode` keeps special tokens, so `decode(encode(s)) == s` for byte-level BPEs.

Bounded training time. The BPE trainer's cost grows faster than linearly in
the length of a pre-tokenized word (measured: one 10,000-character word ~0.1 s,
100,000 ~5 s, so a 10 MiB line without spaces runs for hours). `train_bpe`
therefore truncates each text to `max_text_chars` (default `MAX_TEXT_CHARS` =
100,000) with a warning: merges are learned from statistics that the first
100,000 characters of a document already carry, and the worst case per text
stays at seconds.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Iterable, Iterator, Sequence

import tokenizers
from tokenizers import decoders, models, pre_tokenizers, trainers

PAD_CANDIDATES = ("<pad>", "<unk>")
BOS, EOS = "<s>", "</s>"
IM_START, IM_END = "<|im_start|>", "<|im_end|>"
THINK, THINK_END = "<think>", "</think>"
TOOL_CALL, TOOL_CALL_END = "<tool_call>", "</tool_call>"

# Order of the special tokens in a BPE trained by `train_bpe` (ids 0..8).
TRAINED_SPECIALS = ("<pad>", BOS, EOS, IM_START, IM_END, THINK, THINK_END, TOOL_CALL, TOOL_CALL_END)
# Tokens that must exist (besides a pad token) for the chat template to work.
REQUIRED_SPECIALS = (BOS, EOS, IM_START, IM_END, THINK, THINK_END)
# Longest text `train_bpe` trains on; longer ones are truncated (see the module docstring).
MAX_TEXT_CHARS = 100_000

log = logging.getLogger(__name__)


class MissingSpecialTokensError(ValueError):
    """A tokenizer lacks special tokens that the chat template needs."""


class Tokenizer:
    """Thin wrapper over `tokenizers.Tokenizer` with the chat special-token ids."""

    def __init__(self, hf_tokenizer: tokenizers.Tokenizer, *, source: str = "<memory>"):
        self._tok = hf_tokenizer
        self.source = source
        ids = {name: hf_tokenizer.token_to_id(name) for name in REQUIRED_SPECIALS}
        pad_name = next(
            (p for p in PAD_CANDIDATES if hf_tokenizer.token_to_id(p) is not None), None
        )
        missing = [name for name, i in ids.items() if i is None]
        if pad_name is None:
            missing.insert(0, " or ".join(PAD_CANDIDATES))
        if missing:
            raise MissingSpecialTokensError(
                f"{source}: tokenizer lacks special tokens required by the chat template: {missing}"
            )
        self._pad_id = hf_tokenizer.token_to_id(pad_name)
        self._ids = ids

    # ---------------------------------------------------------------- loading
    @classmethod
    def from_file(cls, path: str | os.PathLike) -> Tokenizer:
        """Loads a Hugging Face `tokenizer.json` (a file, or a directory holding one).

        Raises `FileNotFoundError` if there is none and `ValueError` naming the
        file if it cannot be read as a tokenizer (empty, truncated, not one).
        """
        path = os.fspath(path)
        if os.path.isdir(path):
            path = os.path.join(path, "tokenizer.json")
        if not os.path.isfile(path):
            raise FileNotFoundError(f"no tokenizer file at {path}")
        try:
            hf_tokenizer = tokenizers.Tokenizer.from_file(path)
        except Exception as e:  # the Rust side raises a bare Exception
            raise ValueError(f"{path}: not a valid tokenizer.json ({e})") from None
        return cls(hf_tokenizer, source=path)

    def save(self, path: str | os.PathLike) -> None:
        """Writes the tokenizer as a Hugging Face `tokenizer.json`."""
        self._tok.save(os.fspath(path))

    # ---------------------------------------------------------------- coding
    def encode(self, text: str) -> list[int]:
        """Token ids of `text`; no BOS/EOS added; special tokens in the text map to their ids."""
        return self._tok.encode(text, add_special_tokens=False).ids

    def encode_with_offsets(self, text: str) -> tuple[list[int], list[tuple[int, int]]]:
        """Token ids of `text` and each token's (start, end) character span in `text`."""
        enc = self._tok.encode(text, add_special_tokens=False)
        return enc.ids, enc.offsets

    def decode(self, ids: Iterable[int]) -> str:
        """Text of `ids`, special tokens included."""
        return self._tok.decode([int(i) for i in ids], skip_special_tokens=False)

    def token_to_id(self, token: str) -> int | None:
        return self._tok.token_to_id(token)

    @property
    def vocab_size(self) -> int:
        """Number of ids, added tokens included (the model's vocab may be padded larger)."""
        return self._tok.get_vocab_size(with_added_tokens=True)

    @property
    def pad_id(self) -> int:
        return self._pad_id

    @property
    def bos_id(self) -> int:
        return self._ids[BOS]

    @property
    def eos_id(self) -> int:
        return self._ids[EOS]

    @property
    def im_start_id(self) -> int:
        return self._ids[IM_START]

    @property
    def im_end_id(self) -> int:
        """`<|im_end|>`: closes every chat turn; the stop token for generation."""
        return self._ids[IM_END]

    @property
    def think_id(self) -> int:
        return self._ids[THINK]

    @property
    def think_end_id(self) -> int:
        return self._ids[THINK_END]

    def __repr__(self) -> str:
        return f"Tokenizer(source={self.source!r}, vocab_size={self.vocab_size})"


def train_bpe(
    texts: Iterable[str],
    vocab_size: int,
    path: str | os.PathLike | None = None,
    *,
    extra_special_tokens: Sequence[str] = (),
    split_digits: bool = False,
    max_text_chars: int = MAX_TEXT_CHARS,
) -> Tokenizer:
    """Trains a byte-level BPE on `texts`, with `TRAINED_SPECIALS` at ids 0..8.

    The result has at most `vocab_size` ids (fewer if the texts run out of
    merges). If `path` is given the tokenizer is written there as
    `tokenizer.json` and reloaded with `Tokenizer.from_file`, the same path the
    released tokenizer takes. `split_digits` keeps every digit its own token (helps small models
    learn arithmetic). Texts longer than `max_text_chars` are truncated to it,
    with a warning (see the module docstring).
    """
    if max_text_chars < 1:
        raise ValueError(f"max_text_chars={max_text_chars} must be >= 1")
    specials = list(TRAINED_SPECIALS) + [
        t for t in extra_special_tokens if t not in TRAINED_SPECIALS
    ]
    n_min = len(specials) + len(pre_tokenizers.ByteLevel.alphabet())
    if vocab_size < n_min:
        raise ValueError(f"vocab_size={vocab_size} is below specials + 256 byte symbols = {n_min}")
    tok = tokenizers.Tokenizer(models.BPE())
    byte_level = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.pre_tokenizer = (
        pre_tokenizers.Sequence([pre_tokenizers.Digits(individual_digits=True), byte_level])
        if split_digits
        else byte_level
    )
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=specials,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    truncated = []  # (index, length) of each truncated text
    tok.train_from_iterator(_capped(texts, max_text_chars, truncated), trainer)
    if truncated:
        log.warning(
            "train_bpe: truncated %d text(s) to max_text_chars=%d; longest %d characters",
            len(truncated),
            max_text_chars,
            max(n for _, n in truncated),
        )
    if path is None:
        return Tokenizer(tok)
    path = os.fspath(path)
    if os.path.isdir(path):
        path = os.path.join(path, "tokenizer.json")
    tok.save(path)
    return Tokenizer.from_file(path)


def _capped(texts: Iterable[str], max_chars: int, truncated: list) -> Iterator[str]:
    """`texts`, each cut to `max_chars`; appends (index, length) of each cut text to `truncated`."""
    for i, text in enumerate(texts):
        if len(text) > max_chars:
            if not truncated:
                log.warning(
                    "train_bpe: text %d has %d characters; training on its first %d",
                    i,
                    len(text),
                    max_chars,
                )
            truncated.append((i, len(text)))
            text = text[:max_chars]
        yield text
