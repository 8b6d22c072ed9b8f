"""Registry of launchable jobs: `config.job` names a function `fn(config, workdir) -> metrics`.

    from nemocascade.jobs.registry import register_job

    @register_job("cascade")
    def run_cascade(config, workdir) -> dict: ...

A job registers itself when its module is imported. `get_job(name)` imports the modules listed
in `JOB_MODULES` in order until the name is registered (a module that does not exist is
skipped), so a new job only needs `@register_job` in one of them, or its module appended to
`JOB_MODULES`, or `config.job = "some.module:name"` naming the module to import.
"""

from __future__ import annotations

import difflib
import importlib
from collections.abc import Callable, Mapping
from typing import Any

JobFn = Callable[[Any, str], Mapping[str, Any]]

JOB_MODULES: list[str] = ["nemocascade.jobs.sft", "nemocascade.jobs.cascade"]

IdentityFn = Callable[[Any], Mapping[str, Any]]
PreflightFn = Callable[[Any, str], None]
_JOBS: dict[str, JobFn] = {}
_IDENTITIES: dict[str, IdentityFn] = {}
_PREFLIGHTS: dict[str, PreflightFn] = {}


def register_job(
    name: str, *, identity: IdentityFn | None = None, preflight: PreflightFn | None = None
) -> Callable[[JobFn], JobFn]:
    """Decorator: make `fn(config, workdir) -> dict of final metrics` launchable as `name`.

    `identity(config) -> dict`: what the run's checkpoints and tokenizer depend on
    (`jobs.identity`); the launcher refuses to resume a workdir whose identity differs.
    `preflight(config, workdir)`: checks run before anything is written (raise an error whose
    message names the key or file and the fix)."""

    def deco(fn: JobFn) -> JobFn:
        old = _JOBS.get(name)
        if old is not None and _origin(old) != _origin(fn):  # re-importing a file is fine
            raise ValueError(f"job {name!r} is already registered by {_origin(old)}")
        _JOBS[name] = fn
        if identity is not None:
            _IDENTITIES[name] = identity
        if preflight is not None:
            _PREFLIGHTS[name] = preflight
        return fn

    return deco


def get_identity(name: str) -> IdentityFn | None:
    """The identity function of a registered job (see `register_job`), or None."""
    get_job(name)
    return _IDENTITIES.get(name.split(":", 1)[-1])


def get_preflight(name: str) -> PreflightFn | None:
    """The preflight checks of a registered job (see `register_job`), or None."""
    get_job(name)
    return _PREFLIGHTS.get(name.split(":", 1)[-1])


def _origin(fn: JobFn) -> tuple[str, str]:
    code = getattr(fn, "__code__", None)
    return (code.co_filename if code else fn.__module__), fn.__qualname__


def _import_optional(module: str) -> None:
    try:
        importlib.import_module(module)
    except ModuleNotFoundError as e:
        if e.name != module:  # the module exists but one of its imports is missing: a real error
            raise


def get_job(name: str) -> JobFn:
    """The job registered as `name` (or `module:name`); unknown names list the known ones."""
    if ":" in name:
        module, name = name.split(":", 1)
        importlib.import_module(module)
    for module in JOB_MODULES:  # in order, stopping as soon as the job is known
        if name in _JOBS:
            break
        _import_optional(module)
    if name not in _JOBS:
        near = difflib.get_close_matches(name, list(_JOBS), n=3)
        hint = f"; did you mean {near}?" if near else ""
        raise KeyError(
            f"config.job={name!r} is not a registered job{hint} (registered: {sorted(_JOBS)})"
        )
    return _JOBS[name]
