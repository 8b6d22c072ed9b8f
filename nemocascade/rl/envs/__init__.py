"""Environments for multi-turn tool use: the model calls tools (Nemotron-3 `<tool_call>` format),
the environment executes them in the bubblewrap sandbox and answers, until the episode ends;
then a reward in [0, 1].

    base         EnvLimits, ToolTurn, Environment (the shared turn logic), the registry
    python       `python`: answer a question with a sandboxed interpreter (`run_python`)
    code_repair  `code_repair`: fix a program against hidden tests (`run_tests`, `submit`)
    swe          `swe`: fix a miniature repository in a private working directory
    repo         repository records, their JSONL files, the confined working directory
    sandboxed    what runs in the sandbox, and its report for the model

`make_env(name, record, limits, sandbox)` builds one environment per episode.
"""

from nemocascade.rl.envs import code_repair as _code_repair  # noqa: F401  (registers it)
from nemocascade.rl.envs import python as _python  # noqa: F401  (registers it)
from nemocascade.rl.envs import swe as _swe  # noqa: F401  (registers it)
from nemocascade.rl.envs.base import (
    ENVS,
    FAILURE_REASONS,
    Environment,
    EnvLimits,
    ToolTurn,
    make_env,
    register_env,
)
from nemocascade.rl.envs.repo import read_repo_jsonl, validate_repo_record

__all__ = [
    "ENVS",
    "FAILURE_REASONS",
    "EnvLimits",
    "Environment",
    "ToolTurn",
    "make_env",
    "read_repo_jsonl",
    "register_env",
    "validate_repo_record",
]
