"""Config files for the launcher: loading, `--config.key` overrides and sweep tables.

A config file is Python with `get_config(arg) -> ConfigDict` (every key declared) and optionally
`get_sweep(arg) -> list[dict]`, each dict a variant: dotted keys -> values (e.g.
`{"optim.lr": 1e-3}`), plus an optional "_name" for the variant's directory name. The spec
`path.py:arg` passes `arg`; a bare `path.py` calls `get_config()` as ml_collections does.
"""

from __future__ import annotations

import csv
import difflib
import importlib.util
import json
import os
import re
from collections.abc import Iterable, Mapping, Sequence
from types import ModuleType
from typing import Any

from ml_collections import ConfigDict

NAME_KEY = "_name"


class ConfigKeyError(KeyError):
    """An override names a key the config does not declare."""

    def __str__(self) -> str:  # KeyError would repr() the message
        return str(self.args[0])


def split_spec(spec: str) -> tuple[str, str | None]:
    """`"configs/x.py:arg"` -> `("configs/x.py", "arg")`; no colon -> arg None."""
    path, sep, arg = spec.partition(":")
    return path, (arg if sep else None)


def load_module(path: str | os.PathLike) -> ModuleType:
    """Import a config file by path."""
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"config file {path!r} does not exist")
    name = "_nemocascade_config_" + re.sub(r"\W", "_", os.path.abspath(path))
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    if not hasattr(module, "get_config"):
        raise AttributeError(f"config file {path} defines no get_config(arg)")
    return module


def load_config(spec: str) -> ConfigDict:
    """The ConfigDict of a spec `path.py[:arg]`."""
    path, arg = split_spec(spec)
    module = load_module(path)
    config = module.get_config() if arg is None else module.get_config(arg)
    if not isinstance(config, ConfigDict):
        raise TypeError(f"{path}: get_config returned {type(config).__name__}, not a ConfigDict")
    return config


def load_sweep(spec: str) -> list[dict[str, Any]]:
    """The variants of `get_sweep(arg)` in the spec's file (an error if it has none)."""
    path, arg = split_spec(spec)
    module = load_module(path)
    if not hasattr(module, "get_sweep"):
        raise AttributeError(f"config file {path} defines no get_sweep(arg); cannot --sweep")
    variants = module.get_sweep() if arg is None else module.get_sweep(arg)
    if not variants or not all(isinstance(v, Mapping) for v in variants):
        raise ValueError(f"{path}: get_sweep must return a non-empty list of dicts")
    return [dict(v) for v in variants]


def flat_keys(config: ConfigDict | Mapping, prefix: str = "") -> list[str]:
    """Every dotted key of `config`, sections included (e.g. "optim", "optim.lr")."""
    keys = []
    for k, v in config.items():
        key = f"{prefix}{k}"
        keys.append(key)
        if isinstance(v, (ConfigDict, dict)):
            keys.extend(flat_keys(v, key + "."))
    return keys


def check_keys(config: ConfigDict, keys: Iterable[str], *, prefix: str = "") -> None:
    """Raise ConfigKeyError naming every key of `keys` that `config` does not declare, with the
    closest declared keys (`prefix` is prepended to key names in the message, e.g. "--config.")."""
    declared = flat_keys(config)
    sections = {k.rsplit(".", 1)[0] for k in declared if "." in k}
    leaves = [k for k in declared if k not in sections]
    problems = []
    for key in keys:
        if key in declared:
            continue
        leaf = key.rsplit(".", 1)[-1]
        near = difflib.get_close_matches(key, leaves, n=3, cutoff=0.6)
        near += [d for d in leaves if d.rsplit(".", 1)[-1] == leaf and d not in near]
        hint = f"; did you mean {', '.join(prefix + n for n in near[:4])}?" if near else ""
        problems.append(f"{prefix}{key}: no such config key{hint}")
    if problems:
        raise ConfigKeyError("\n".join(problems))


def apply_overrides(config: ConfigDict, overrides: Mapping[str, Any]) -> ConfigDict:
    """A copy of `config` with dotted-key `overrides` set (keys must exist; "_name" ignored)."""
    overrides = {k: v for k, v in overrides.items() if k != NAME_KEY}
    check_keys(config, overrides, prefix="sweep key ")
    out = config.copy_and_resolve_references()
    for key, value in overrides.items():
        *parents, leaf = key.split(".")
        node = out
        for p in parents:
            node = node[p]
        node[leaf] = value
    return out


def variant_name(overrides: Mapping[str, Any]) -> str:
    """The directory name of a sweep variant: its "_name", else `leaf=value` pairs."""
    if NAME_KEY in overrides:
        name = str(overrides[NAME_KEY])
    else:
        name = ",".join(
            f"{k.rsplit('.', 1)[-1]}={v:g}"
            if isinstance(v, float)
            else f"{k.rsplit('.', 1)[-1]}={v}"
            for k, v in overrides.items()
        )
    name = re.sub(r"[^A-Za-z0-9=,._+-]", "_", name)
    if not name:
        raise ValueError(f"sweep variant {overrides} has an empty name")
    return name


def variant_names(variants: Sequence[Mapping[str, Any]]) -> list[str]:
    """Names of all variants; duplicates are an error."""
    names = [variant_name(v) for v in variants]
    dup = sorted({n for n in names if names.count(n) > 1})
    if dup:
        raise ValueError(f"sweep variants share names {dup}; give them distinct '_name's")
    return names


def write_config_json(config: ConfigDict, workdir: str | os.PathLike) -> str:
    """Write `<workdir>/config.json` and return its path."""
    os.makedirs(workdir, exist_ok=True)
    path = os.path.join(os.fspath(workdir), "config.json")
    with open(path, "w") as f:
        f.write(config.to_json_best_effort(indent=2, sort_keys=True) + "\n")
    return path


def _cell(v: Any) -> str:
    if isinstance(v, float):
        return f"{v:.6g}"
    return "" if v is None else str(v)


def write_sweep_tables(
    rows: Sequence[Mapping[str, Any]],
    workdir: str | os.PathLike,
) -> tuple[str, str]:
    """`sweep.csv` and `sweep.md` in `workdir`, one row per variant (columns: the union of keys,
    in first-seen order). Returns their paths."""
    columns: list[str] = []
    for row in rows:
        columns.extend(k for k in row if k not in columns)
    csv_path = os.path.join(os.fspath(workdir), "sweep.csv")
    md_path = os.path.join(os.fspath(workdir), "sweep.md")
    with open(csv_path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=columns)
        writer.writeheader()
        for row in rows:
            writer.writerow({c: _cell(row.get(c)) for c in columns})
    with open(md_path, "w") as f:
        f.write("| " + " | ".join(columns) + " |\n")
        f.write("|" + "|".join("---" for _ in columns) + "|\n")
        for row in rows:
            f.write("| " + " | ".join(_cell(row.get(c)) for c in columns) + " |\n")
    return csv_path, md_path


def read_json(path: str | os.PathLike) -> dict[str, Any]:
    with open(path) as f:
        return json.load(f)
