"""`swe`: fix a miniature repository (the paper's SWE RL at toy size).

The record is a repository record (`repo.py`), or an RL prompt record whose `verifier` is one
(`{"type": "swe", "files", "hidden_tests", "test_command", ...}`, as the synthetic `swe` domain
writes it). Each episode materialises `files` in a fresh temporary directory (`repo.WorkDir`);
the tools see only that directory:

  list_files()               the repository's paths
  read_file(path)            a file's text
  write_file(path, content)  create or replace a file
  run_tests()                the visible test command, run in the sandbox on a copy of the
                             directory; exit status and the runner's output
  submit()                   end the episode ("submitted")

Paths are confined (relative, no `..`, no escape through symlinks). A turn without a tool call
also ends the episode and the repository is scored as it stands. Reward: the repository with
`hidden_tests` copied over it (only now: the tools never see them) passes `hidden_test_command`
(default `test_command`) in the sandbox: 1.0, else 0.0, the cause in the details ("failed",
"collection_error" when a test module cannot even be imported, "no_tests", "timeout", ...).
"""

from __future__ import annotations

from nemocascade.data.synthetic.repair import SWE_SYSTEM, SWE_TOOLS
from nemocascade.data.tools import ToolCall, ToolSpec
from nemocascade.rl.envs import sandboxed
from nemocascade.rl.envs.base import Environment, SandboxUnavailable, ToolError, register_env
from nemocascade.rl.envs.repo import WorkDir, validate_repo_record

SYSTEM = SWE_SYSTEM  # the synthetic SFT demonstrations open with the same system turn
TOOLS = tuple(ToolSpec.from_mapping(t) for t in SWE_TOOLS)
OUTPUT_CAP = 1 << 18  # bytes of test-runner output the host reads
_COLLECTION_MARKERS = ("Failed to import test module", "SyntaxError", "IndentationError")


def repo_record(record: dict) -> dict:
    """The repository record inside `record` (itself, or its `verifier` of type swe); the
    prompt of a prompt record becomes the repository's `prompt`. ValueError if malformed."""
    spec = record.get("verifier")
    if "files" not in record and isinstance(spec, dict) and spec.get("type") == "swe":
        prompt = spec.get("prompt")
        if prompt is None:
            users = [m for m in record.get("messages", []) if m.get("role") == "user"]
            prompt = users[-1]["content"] if users else record.get("prompt")
        record = {**spec, "prompt": prompt}
    validate_repo_record(record)
    return record


@register_env("swe")
class SweEnv(Environment):
    """Read, edit and test a repository in a private working directory."""

    def __init__(self, record, limits, sandbox=None):
        super().__init__(record, limits, sandbox)
        self.repo = repo_record(record)
        self.test_argv = sandboxed.parse_test_command(self.repo["test_command"])
        self.hidden_argv = sandboxed.parse_test_command(
            self.repo.get("hidden_test_command") or self.repo["test_command"]
        )
        self.workdir = WorkDir(self.repo["files"])

    @property
    def tools(self) -> list[ToolSpec]:
        return list(TOOLS)

    def initial_messages(self) -> list[dict]:
        return [
            {"role": "system", "content": SYSTEM},
            {"role": "user", "content": self.repo["prompt"]},
        ]

    def _execute(self, call: ToolCall) -> str:
        args = call.arguments
        try:
            if call.name == "list_files":
                return "\n".join(self.workdir.list())
            if call.name == "read_file":
                return self.workdir.read(args["path"])
            if call.name == "write_file":
                self.workdir.write(args["path"], args["content"])
                return f"wrote {args['path']} ({len(args['content'])} characters)"
        except ValueError as e:  # a bad path or size: the model's mistake, answered
            raise ToolError("bad_path", str(e)) from None
        if call.name == "submit":
            self._end("submitted")
            return "submitted"
        try:
            files = self.workdir.snapshot()
        except ValueError as e:
            raise ToolError("repo_too_large", str(e)) from None
        out = self._run(files, self.test_argv)
        if out.status in ("timeout", "output_cap"):
            raise ToolError(out.status, out.report)
        return out.report

    def _run(self, files: dict[str, str], argv: list[str]) -> sandboxed.Outcome:
        out = sandboxed.run_repo(files, argv, self.limits.tool_timeout_s, self.sandbox, OUTPUT_CAP)
        if out.status == "sandbox_error":
            raise SandboxUnavailable(out.report[:300])
        return out

    def _score(self) -> tuple[float, dict]:
        try:
            files = {**self.workdir.snapshot(), **self.repo["hidden_tests"]}
        except ValueError as e:
            return 0.0, {"status": "bad_repository", "detail": str(e)}
        try:
            out = self._run(files, self.hidden_argv)
        except SandboxUnavailable as e:
            return 0.0, {"status": "sandbox_error", "detail": str(e)}
        output = out.stdout + out.stderr
        if out.passed and "Ran 0 tests" not in output:
            return 1.0, {"status": "passed"}
        status = out.status
        if "Ran 0 tests" in output:
            status = "no_tests"
        elif any(m in output for m in _COLLECTION_MARKERS):
            status = "collection_error"
        return 0.0, {"status": status, "detail": output[-500:]}

    def close(self) -> None:
        self.workdir.remove()
