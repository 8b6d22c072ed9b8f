"""A run's identity: what its checkpoints and its tokenizer depend on, so a rerun in the same
workdir never resumes (or overwrites) them with something incompatible.

A job registers `identity(config) -> dict` with `register_job(name, identity=...)`: the model
fields that define parameter shapes (dtype of the weights included) and the inputs that define the
vocabulary (a given tokenizer file, or the data a tokenizer is trained on). The launcher, before
it writes anything into an existing workdir, compares the new identity with the run's recorded
one (`run_identity.json`, or for runs older than that file the identity of their `config.json`):

  * an incompatible change is refused with `IncompatibleResume` listing every changed key
    (`model.hidden_size: 64 -> 128`), and nothing in the workdir is touched;
  * any other change (more steps, another learning rate, another stage order) is compatible: it
    is logged, the previous `config.json` is kept as `config.<n>.json`, and the run resumes.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import os
from collections.abc import Mapping
from typing import Any

log = logging.getLogger(__name__)

IDENTITY_FILE = "run_identity.json"
CONFIG_FILE = "config.json"
# ModelConfig fields that change how the model runs, not its parameters: free to change on resume
RUNTIME_MODEL_KEYS = frozenset(
    {
        "remat",
        "attention_impl",
        "attention_block_q",
        "attention_block_k",
        "moe_backend",
        "moe_capacity_factor",
        "moe_aux_loss_coef",
        "compute_dtype",
        "dt_floor_like_hf",
    }
)


class IncompatibleResume(ValueError):
    """The workdir holds a run whose checkpoints or tokenizer the new config cannot use."""


def model_identity(model: Mapping[str, Any]) -> dict[str, Any]:
    """The fields of a `model` config section that define the parameters (a field the section
    omits counts as its `ModelConfig` default, so older configs compare equal)."""
    from nemocascade.model.config import ModelConfig

    values = {
        f.name: f.default
        for f in dataclasses.fields(ModelConfig)
        if f.default is not dataclasses.MISSING
    }
    values.update(dict(model))
    return {k: _plain(v) for k, v in sorted(values.items()) if k not in RUNTIME_MODEL_KEYS}


def _plain(v: Any) -> Any:
    if isinstance(v, Mapping) or hasattr(v, "to_dict"):
        return {k: _plain(x) for k, x in sorted(dict(v).items())}
    if isinstance(v, list | tuple):
        return [_plain(x) for x in v]
    return v


def diff(old: Any, new: Any, prefix: str = "") -> list[str]:
    """`key: old -> new` for every leaf that differs (keys present on one side only included)."""
    if isinstance(old, Mapping) and isinstance(new, Mapping):
        out = []
        for k in sorted(set(old) | set(new)):
            key = f"{prefix}.{k}" if prefix else str(k)
            if k not in old:
                out.append(f"{key}: (absent) -> {new[k]!r}")
            elif k not in new:
                out.append(f"{key}: {old[k]!r} -> (absent)")
            else:
                out += diff(old[k], new[k], key)
        return out
    return [] if _plain(old) == _plain(new) else [f"{prefix}: {old!r} -> {new!r}"]


def _read_json(path: str) -> dict | None:
    if not os.path.exists(path):
        return None
    try:
        with open(path) as f:
            return json.load(f)
    except (OSError, ValueError) as e:
        raise IncompatibleResume(f"{path}: unreadable ({e}); the run's records are damaged") from e


def check_resume(workdir: str, identity: Mapping[str, Any], recorded: Mapping | None) -> None:
    """Raise `IncompatibleResume` if `workdir` holds a run whose identity (`recorded`, else the
    one in `run_identity.json`) differs from `identity`. Reads only."""
    old = recorded if recorded is not None else _read_json(os.path.join(workdir, IDENTITY_FILE))
    if old is None:
        return
    changes = diff(old, _plain(dict(identity)))
    if changes:
        raise IncompatibleResume(
            f"{workdir} holds a run these settings cannot resume (its checkpoints and tokenizer "
            "depend on them); nothing was changed. Changed:\n  "
            + "\n  ".join(changes)
            + "\nUse a new --workdir, or restore the previous values."
        )


def record(workdir: str, identity: Mapping[str, Any]) -> None:
    """Write `run_identity.json` (once: an existing one is never rewritten)."""
    path = os.path.join(workdir, IDENTITY_FILE)
    if os.path.exists(path):
        return
    with open(path, "w") as f:
        json.dump(_plain(dict(identity)), f, indent=2, sort_keys=True)
        f.write("\n")


def keep_previous_config(workdir: str, new_config: Mapping[str, Any]) -> list[str]:
    """If `config.json` exists and differs from `new_config`, move it to `config.<n>.json`
    (n = 1, 2, ...) and return the changed keys (logged); else []."""
    path = os.path.join(workdir, CONFIG_FILE)
    old = _read_json(path)
    if old is None:
        return []
    changes = diff(old, _plain(dict(new_config)))
    if changes:
        n = 1
        while os.path.exists(os.path.join(workdir, f"config.{n}.json")):
            n += 1
        os.replace(path, os.path.join(workdir, f"config.{n}.json"))
        log.warning(
            "%s: resuming with changed settings (previous config kept as config.%d.json):\n  %s",
            workdir,
            n,
            "\n  ".join(changes),
        )
    return changes


def tokenizer_identity(path: str) -> dict[str, str]:
    """A given tokenizer file by path and content hash; "" (trained by the run itself and kept
    as its `tokenizer.json`, never rewritten) identifies as itself."""
    if not path:
        return {"file": ""}
    try:
        with open(path, "rb") as f:
            digest = hashlib.sha256(f.read()).hexdigest()
    except OSError:
        digest = "(unreadable)"
    return {"file": path, "sha256": digest}
