"""A cascade's inputs: the typed `data` and `tokenizer` sections, each domain's records (read
once per run) and the run's tokenizer."""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Sequence
from typing import Literal

from nemocascade import data as nc_data
from nemocascade.data import synthetic
from nemocascade.data.preferences import read_preference_jsonl
from nemocascade.data.synthetic import preference

RECORD_KINDS = ("sft", "rl", "eval", "pairs")


@dataclasses.dataclass(frozen=True)
class TokenizerConfig:
    path: str  # a tokenizer.json; "" trains a BPE on the synthetic task texts
    vocab_size: int
    split_digits: bool


@dataclasses.dataclass(frozen=True)
class DomainPaths:
    sft: str = ""  # chat records
    rl: str = ""  # prompt records with verifiers
    eval: str = ""  # held-out prompt records
    pairs: str = ""  # preference pairs {"prompt", "chosen", "rejected"} (reward models)


@dataclasses.dataclass(frozen=True)
class CascadeDataConfig:
    source: Literal["synthetic", "jsonl"]
    train_per_domain: int  # synthetic: SFT / RL problems per domain
    eval_per_domain: int  # synthetic: held-out prompts per domain
    paths: dict[str, DomainPaths] = dataclasses.field(default_factory=dict)
    # synthetic: {domain: problems} for the domains that need another count than
    # train_per_domain (a domain learnt only from many distinct records, such as long_needle)
    train_counts: dict[str, int] = dataclasses.field(default_factory=dict)

    def __post_init__(self):
        bad = {d: n for d, n in self.train_counts.items() if int(n) != n or n < 1}
        if bad:
            raise ValueError(f"data.train_counts must be integers >= 1, got {bad}")

    def train_count(self, domain: str) -> int:
        """Synthetic training problems of `domain`."""
        return int(self.train_counts.get(domain, self.train_per_domain))


class DomainRecords:
    """`records(domain, kind)`: kind 'sft' (chat records), 'rl' (prompt records), 'eval'
    (held-out prompt records) or 'pairs' (preference pairs), generated (source "synthetic") or
    read from the configured JSONL files (validated, errors with file:line), each read once."""

    def __init__(self, cfg: CascadeDataConfig, seed: int):
        self.cfg, self.seed = cfg, seed
        self._cache: dict[tuple[str, str], list[dict]] = {}

    def __call__(self, domain: str, kind: str) -> list[dict]:
        if kind not in RECORD_KINDS:
            raise ValueError(f"record kind {kind!r} not in {RECORD_KINDS}")
        if (domain, kind) not in self._cache:
            self._cache[domain, kind] = self._read(domain, kind)
        return self._cache[domain, kind]

    def _read(self, domain: str, kind: str) -> list[dict]:
        cfg = self.cfg
        if cfg.source == "synthetic" and kind == "pairs":
            if domain != preference.DOMAIN:
                raise ValueError(
                    f"data.source='synthetic' has preference pairs only for domain "
                    f"{preference.DOMAIN!r}, not {domain!r}"
                )
            return preference.records("pairs", cfg.train_count(domain), seed=self.seed)
        if cfg.source == "synthetic":
            if domain not in synthetic.DOMAINS:
                raise ValueError(
                    f"data.source='synthetic' has no domain {domain!r}; "
                    f"known: {sorted(synthetic.DOMAINS)}"
                )
            split = "test" if kind == "eval" else "train"
            n = cfg.eval_per_domain if kind == "eval" else cfg.train_count(domain)
            probs = synthetic.problems(domain, split, n, seed=self.seed)
            make = synthetic.sft_record if kind == "sft" else synthetic.prompt_record
            return [make(p) for p in probs]
        path = getattr(cfg.paths.get(domain, DomainPaths()), kind)
        if not path:
            raise FileNotFoundError(
                f"data.paths.{domain}.{kind} is not set: stage data for domain "
                f"{domain!r} is not available here"
            )
        if not os.path.exists(path):
            raise FileNotFoundError(f"data.paths.{domain}.{kind}: {path} does not exist")
        if kind == "pairs":
            pairs, _ = read_preference_jsonl(path)
            return pairs
        reader = nc_data.read_chat_jsonl if kind == "sft" else nc_data.read_prompt_jsonl
        records, _ = reader(path)
        return records


def run_tokenizer(
    cfg: TokenizerConfig, data: CascadeDataConfig, workdir: str, seed: int, domains: Sequence[str]
):
    """`tokenizer.path` if set; else the run's own `tokenizer.json` if it exists (never
    rewritten); else (synthetic data only) a BPE trained on the run's domains' texts and saved
    there."""
    if cfg.path:
        return nc_data.Tokenizer.from_file(cfg.path)
    path = os.path.join(workdir, "tokenizer.json")
    if os.path.exists(path):
        return nc_data.Tokenizer.from_file(path)
    if data.source != "synthetic":
        raise ValueError("tokenizer.path is required unless data.source='synthetic'")
    return nc_data.train_bpe(
        synthetic.all_texts(seed=seed, domains=domains),
        cfg.vocab_size,
        path,
        split_digits=cfg.split_digits,
    )
