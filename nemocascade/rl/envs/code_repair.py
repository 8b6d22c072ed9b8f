"""`code_repair`: fix (or write) one Python program against tests the model cannot read.

Record: `{"prompt": str (or "messages"), "program": str (buggy, or "" to write from scratch),
"tests": str (hidden: top-level asserts, as the `code` verifier takes them), "visible": str
(optional tests shown in the prompt), "entry_point": str (optional), "timeout_s": float
(optional, the final scoring run)}`.

Tools: `run_tests(program)` runs the program against the visible tests when the record has them,
else against the hidden ones, and reports which cases fail (by number, with the values compared)
but never the hidden source; `submit(program)` ends the episode ("submitted"). A turn without a
tool call also ends it; its last ```python block, if any, is the submission. Reward: 1.0 if the
submission passes every hidden test (`rewards.code.run_tests`, the `code` verifier's own run),
else 0.0.
"""

from __future__ import annotations

from nemocascade.data.tools import ToolCall, ToolSpec
from nemocascade.rewards import code as code_lib
from nemocascade.rewards.verifiers import extract_code
from nemocascade.rl.envs import sandboxed
from nemocascade.rl.envs.base import (
    Environment,
    SandboxUnavailable,
    ToolError,
    register_env,
    user_messages,
)

SYSTEM = (
    "You are fixing a Python program. run_tests(program) runs a program against the tests and "
    "says which fail; the tests' source is not shown. When it is right, call submit(program) "
    "with the complete program."
)
_PROGRAM = {"program": {"type": "string", "description": "the complete Python program"}}
RUN_TESTS = ToolSpec(
    "run_tests", "Run the program against the tests; say which fail.", _PROGRAM, ("program",)
)
SUBMIT = ToolSpec("submit", "Submit the final program; ends the episode.", _PROGRAM, ("program",))
OUTPUT_CAP = 1 << 16  # bytes of the program's own output the host reads


@register_env("code_repair")
class CodeRepairEnv(Environment):
    """Repair a program against hidden unit tests."""

    def __init__(self, record, limits, sandbox=None):
        super().__init__(record, limits, sandbox)
        for key in ("program", "tests"):
            if not isinstance(record.get(key), str):
                raise ValueError(f"code_repair record: {key!r} must be a string")
        self._user = user_messages(record)
        self.submission: str | None = None

    @property
    def tools(self) -> list[ToolSpec]:
        return [RUN_TESTS, SUBMIT]

    def initial_messages(self) -> list[dict]:
        user = [dict(m) for m in self._user]
        extra = ""
        if self.record["program"]:
            extra += f"\n\nThe program:\n```python\n{self.record['program']}```"
        if self.record.get("visible"):
            extra += f"\n\nSome of the tests:\n```python\n{self.record['visible']}```"
        if user:
            user[-1]["content"] += extra
        return [{"role": "system", "content": SYSTEM}, *user]

    def _execute(self, call: ToolCall) -> str:
        program = call.arguments["program"]
        if call.name == "submit":
            self.submission = program
            self._end("submitted")
            return "submitted"
        tests = self.record.get("visible") or self.record["tests"]
        timeout_s = self.limits.tool_timeout_s
        entry = self.record.get("entry_point")
        out = sandboxed.run_cases(program, tests, timeout_s, self.sandbox, OUTPUT_CAP, entry)
        if out.status == "sandbox_error":
            raise SandboxUnavailable(out.report[:300])
        if out.status in ("timeout", "output_cap"):
            raise ToolError(out.status, out.report)
        return out.report

    def _final_answer(self, text: str) -> None:
        self.submission = extract_code(text)

    def _score(self) -> tuple[float, dict]:
        if self.submission is None:
            return 0.0, {"status": "no_submission"}
        res = code_lib.run_tests(
            self.submission,
            self.record["tests"],
            timeout_s=float(self.record.get("timeout_s", 10.0)),
            entry_point=self.record.get("entry_point"),
            config=self.sandbox,
        )
        return float(res.passed), {"status": res.status, "detail": res.detail[:300]}
