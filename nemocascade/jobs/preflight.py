"""Checks that run before anything trains: a usable workdir and room for the checkpoints planned.

Each failure is a `PreflightError` naming the key or path and the fix; the launcher prints it on
one line and exits non-zero, and nothing is written into the workdir. (Stage-level checks of a
cascade, such as data, verifiers, the sandbox and mesh vs batch, are in `jobs.validate`.)
"""

from __future__ import annotations

import os
import shutil
from typing import Any

import jax

from nemocascade.typed_config import ConfigError

GiB = 1 << 30


class PreflightError(ConfigError):
    """The run cannot start here; the message says why and how to fix it."""


def check_workdir(workdir: str) -> None:
    """`--workdir` must be a writable directory, or creatable as one (checked, not created)."""
    path = os.path.abspath(workdir)
    if os.path.exists(path):
        if not os.path.isdir(path):
            raise PreflightError(f"--workdir={workdir}: exists and is not a directory")
        if not os.access(path, os.W_OK | os.X_OK):
            raise PreflightError(f"--workdir={workdir}: not writable by this user")
        return
    parent = path
    while not os.path.exists(parent):
        parent = os.path.dirname(parent)
    if not os.path.isdir(parent) or not os.access(parent, os.W_OK | os.X_OK):
        raise PreflightError(
            f"--workdir={workdir}: cannot be created ({parent} is not a writable directory)"
        )


def state_bytes(abstract_state: Any) -> int:
    """Bytes of a (possibly abstract) pytree of arrays, as a checkpoint stores it."""
    return int(sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(abstract_state)))


def check_disk(workdir: str, needed: int, what: str) -> None:
    """Enough free space on `workdir`'s filesystem for `needed` bytes of checkpoints (`what`
    says which), with 10% headroom."""
    path = os.path.abspath(workdir)
    while not os.path.exists(path):
        path = os.path.dirname(path)
    free = shutil.disk_usage(path).free
    if needed * 1.1 > free:
        raise PreflightError(
            f"--workdir={workdir}: {what} need about {needed / GiB:.2f} GiB, but only "
            f"{free / GiB:.2f} GiB are free on {path}; free some space or use another workdir"
        )
