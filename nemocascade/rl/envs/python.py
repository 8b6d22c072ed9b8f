"""`python`: a question answered with the help of a Python interpreter (the paper's tool-integrated
reasoning at toy size).

Record: `{"prompt": str (or "messages": [user...]), "answer": str}` (scored by the math verifier)
or `{"prompt", "verifier": {"type": ..., ...}}` (any verifier of `nemocascade.rewards`). The one
tool, `run_python(code)`, runs the snippet in the bubblewrap sandbox under `tool_timeout_s` and
answers with its exit status, stdout and stderr. The final answer is the turn without a tool call;
it is scored with `rewards.score_one` (the verifiers are reused, not rewritten), so "no final
answer" (the episode never reached a call-free turn) scores 0.
"""

from __future__ import annotations

from nemocascade.data.tools import ToolCall, ToolSpec
from nemocascade.rewards import VerifierError, score_one
from nemocascade.rl.envs import sandboxed
from nemocascade.rl.envs.base import (
    Environment,
    SandboxUnavailable,
    ToolError,
    register_env,
    user_messages,
)

SYSTEM = (
    "You can run Python code with the run_python tool: it returns the exit status, stdout and "
    "stderr. Only the standard library is available; print what you want to see. When you know "
    "the answer, reply without a tool call and give the final answer as \\boxed{...}."
)
RUN_PYTHON = ToolSpec(
    name="run_python",
    description="Run a Python 3 program (standard library only) and return its exit status, "
    "stdout and stderr.",
    parameters={"code": {"type": "string", "description": "the program"}},
    required=("code",),
)
OUTPUT_CAP_FACTOR = 16  # host reads at most this many times max_tool_output_chars bytes


def verifier_record(record: dict) -> dict:
    """The record `score_one` judges: the record's own `verifier`, else math on `answer`."""
    if isinstance(record.get("verifier"), dict):
        return record
    if "answer" not in record:
        raise ValueError("python env record needs 'answer' or a 'verifier' dict")
    return {"verifier": {"type": "math", "answer": str(record["answer"])}}


@register_env("python")
class PythonEnv(Environment):
    """Answer a question, running Python snippets in the sandbox on the way."""

    def __init__(self, record, limits, sandbox=None):
        super().__init__(record, limits, sandbox)
        self._verifier_record = verifier_record(record)
        self._user = user_messages(record)
        self.final_text: str | None = None

    @property
    def tools(self) -> list[ToolSpec]:
        return [RUN_PYTHON]

    def initial_messages(self) -> list[dict]:
        return [{"role": "system", "content": SYSTEM}, *self._user]

    def _execute(self, call: ToolCall) -> str:
        out = sandboxed.run_snippet(
            call.arguments["code"],
            self.limits.tool_timeout_s,
            self.sandbox,
            OUTPUT_CAP_FACTOR * self.limits.max_tool_output_chars,
        )
        if out.status == "sandbox_error":
            raise SandboxUnavailable(out.report[:300])
        if out.status in ("timeout", "output_cap"):
            raise ToolError(out.status, out.report)
        return out.report

    def _final_answer(self, text: str) -> None:
        self.final_text = text

    def _score(self) -> tuple[float, dict]:
        if self.final_text is None:
            return 0.0, {"no_final_answer": True}
        try:
            score, details = score_one(self._verifier_record, self.final_text, True)
        except VerifierError as e:
            return 0.0, {"verifier_error": e.kind, "detail": str(e)[:300]}
        return score, details
