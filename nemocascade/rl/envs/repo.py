"""Miniature repositories for the `swe` environment: the record format, its JSONL files, and a
working directory that paths cannot leave.

Record (one JSON object per line of a JSONL file, for users' own repositories)::

    {"id": "calc-1",
     "prompt": "A test fails in this repository; find and fix the bug.",
     "files": {"calc/ops.py": "...", "tests/test_ops.py": "..."},
     "hidden_tests": {"tests/test_hidden.py": "..."},
     "test_command": "python -m unittest discover -s tests",
     "hidden_test_command": "..."}   # optional, default test_command

Paths are relative POSIX paths without `.` / `..` components. The test commands run in the
sandbox with the standard library only (`python -m unittest ...` or `python SCRIPT`; see
`sandboxed.parse_test_command`). `hidden_tests` are copied over the repository only for the final
scoring, never into the working directory the tools see. Bad lines raise
`DataError("file.jsonl:7: field 'files': ...")` exactly as `nemocascade.data.sources` reports
its own JSONL files (its reader is reused).
"""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Mapping

from nemocascade.data.sources import MAX_RECORD_CHARS, SkipCount, _FieldError, _read_jsonl
from nemocascade.rl.envs.sandboxed import parse_test_command

MAX_FILE_CHARS = 200_000  # one file written by a tool
MAX_REPO_CHARS = 2_000_000  # the whole working directory, as sent into the sandbox
MAX_FILES = 200


class RecordError(ValueError):
    """A malformed repository record; `field` names the key."""

    def __init__(self, field: str, problem: str):
        super().__init__(f"field {field!r}: {problem}")
        self.field, self.problem = field, problem


def check_path(path: object) -> str:
    """`path` if it is a relative POSIX path inside the repository, else ValueError saying why."""
    if not isinstance(path, str) or not path.strip():
        raise ValueError("a path must be a non-empty string")
    if "\\" in path or "\0" in path:
        raise ValueError(f"path {path!r}: use '/' separators and no NUL")
    if path.startswith("/"):
        raise ValueError(f"path {path!r}: absolute paths are not allowed")
    parts = path.split("/")
    if any(p in ("", ".", "..") for p in parts):
        raise ValueError(f"path {path!r}: empty, '.' and '..' components are not allowed")
    return path


def _check_files(record: Mapping, key: str, *, nonempty: bool) -> None:
    files = record.get(key)
    if not isinstance(files, dict) or (nonempty and not files):
        raise RecordError(key, "expected a non-empty object {path: text}")
    for path, text in files.items():
        try:
            check_path(path)
        except ValueError as e:
            raise RecordError(key, str(e)) from None
        if not isinstance(text, str):
            raise RecordError(f"{key}[{path!r}]", f"expected a string, got {type(text).__name__}")


def validate_repo_record(record: object) -> None:
    """RecordError naming the first bad field of a repository record (see the module docs)."""
    if not isinstance(record, dict):
        raise RecordError("<record>", f"expected an object, got {type(record).__name__}")
    for key in ("id", "prompt", "test_command"):
        if not isinstance(record.get(key), str) or not record[key].strip():
            raise RecordError(key, "expected a non-empty string")
    _check_files(record, "files", nonempty=True)
    _check_files(record, "hidden_tests", nonempty=True)
    for key in ("test_command", "hidden_test_command"):
        if key in record:
            if not isinstance(record[key], str):
                raise RecordError(key, "expected a string")
            try:
                parse_test_command(record[key])
            except ValueError as e:
                raise RecordError(key, str(e)) from None


def _validate_line(record: object) -> None:
    try:
        validate_repo_record(record)
    except RecordError as e:
        raise _FieldError(e.field, e.problem) from None


def read_repo_jsonl(
    path: str | os.PathLike, *, skip_bad: bool = False, max_record_chars: int = MAX_RECORD_CHARS
) -> tuple[list[dict], SkipCount]:
    """(valid repository records, lines skipped) of a JSONL file; `DataError` names file:line."""
    return _read_jsonl(path, _validate_line, skip_bad=skip_bad, max_record_chars=max_record_chars)


class WorkDir:
    """A fresh temporary directory holding one episode's repository; every path is confined.

    `resolve` refuses what `check_path` refuses and anything whose real path (symlinks followed)
    leaves the directory; `snapshot` skips symlinks, so nothing outside is ever sent anywhere.
    """

    def __init__(self, files: Mapping[str, str]):
        self.root = os.path.realpath(tempfile.mkdtemp(prefix="nemocascade_swe_"))
        try:
            for path, text in files.items():
                self.write(path, text)
        except BaseException:
            self.remove()
            raise

    def resolve(self, path: object) -> str:
        """The absolute host path of repository path `path`; ValueError if it would escape."""
        rel = check_path(path)
        full = os.path.join(self.root, *rel.split("/"))
        real = os.path.realpath(full)
        if real != self.root and not real.startswith(self.root + os.sep):
            raise ValueError(f"path {path!r} leaves the repository")
        return full

    def read(self, path: str) -> str:
        full = self.resolve(path)
        if os.path.islink(full) or not os.path.isfile(full):
            raise ValueError(f"no file {path!r}")
        with open(full, encoding="utf-8", errors="replace") as f:
            return f.read()

    def write(self, path: str, text: str) -> None:
        if len(text) > MAX_FILE_CHARS:
            raise ValueError(f"file over {MAX_FILE_CHARS} characters")
        full = self.resolve(path)
        if os.path.isdir(full) or os.path.islink(full):
            raise ValueError(f"{path!r} is a directory or a link")
        if not os.path.exists(full) and len(self.list()) >= MAX_FILES:
            raise ValueError(f"the repository already has {MAX_FILES} files")
        os.makedirs(os.path.dirname(full), exist_ok=True)
        # the parent may have been reached through a symlink created outside the tools
        self.resolve(path)
        with open(full, "w", encoding="utf-8") as f:
            f.write(text)

    def list(self) -> list[str]:
        """Repository paths of the regular files (symlinks skipped), sorted."""
        out = []
        for dirpath, dirnames, filenames in os.walk(self.root):
            dirnames[:] = [d for d in dirnames if not os.path.islink(os.path.join(dirpath, d))]
            for name in filenames:
                full = os.path.join(dirpath, name)
                if not os.path.islink(full) and os.path.isfile(full):
                    out.append(os.path.relpath(full, self.root).replace(os.sep, "/"))
        return sorted(out)

    def snapshot(self) -> dict[str, str]:
        """{path: text} of the repository; ValueError when it is over `MAX_REPO_CHARS`."""
        files, total = {}, 0
        for path in self.list():
            files[path] = self.read(path)
            total += len(files[path])
            if total > MAX_REPO_CHARS:
                raise ValueError(f"the repository is over {MAX_REPO_CHARS} characters")
        return files

    def remove(self) -> None:
        shutil.rmtree(self.root, ignore_errors=True)
