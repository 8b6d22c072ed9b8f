"""Repository repair tasks for the tiny SWE stage (domain `swe`): a small helper package with one
injected bug, visible tests that expose it, and hidden tests that check it is really fixed.

A task is an issue in one of twelve repositories (`REPOSITORIES`: as SWE-bench's 2,294 tasks come
from a dozen projects, the model learns the projects' names; the issue number keeps every task's
prompt distinct). Its package `<repository>/` has one or two modules (plus `__init__.py`), each
holding two or three helpers drawn from a pool (arithmetic, text, sequences), a visible test file
`tests/test_<repository>.py` with one case per helper, and a hidden test file with several more
per helper. One helper is broken by one of its mutations (a changed operator, an off-by-one range,
a dropped normalisation). The prompt names only the repository and the issue number, never the
helper: which function is wrong is found by running the tests or reading the code. Every
mutation is checked at generation time (in-process: this is our own code) to fail its visible
case while the original passes everything, so each task has a solution (`RepairTask.solution`,
the original files).

`repair_task(rng) -> RepairTask`; `record` is the repository record of
`nemocascade.rl.envs.repo` (what the `swe` environment reads), and the registered domain wraps
it as a `Problem` whose verifier is `{"type": "swe", **record}`.

The domain's SFT target is a whole agentic episode (`demonstration`), as the `swe` environment
would play it: run the tests (the failure names the helper), list the files (the module's path,
package name included, is then in the last tool message: copied from a few tokens back, not from
the prompt ~1K tokens back), read the module, write the fix, run the tests again, submit. Its
tool messages are what the environment answers: file texts and write acknowledgements exactly,
and the test runs through the same unittest runner, in-process (our own code), with the
sandbox's report format; a test replays every demonstration's calls in the real environment and
compares.
"""

from __future__ import annotations

import dataclasses
import io
import os
import random
import sys
import tempfile
import unittest

from nemocascade.data.synthetic.base import Problem, register_domain

TEST_COMMAND = "python -m unittest discover -s tests"
SWE_SYSTEM = (
    "You are working in a small Python repository. Use the tools to list, read and write its "
    "files and to run its tests; when the tests pass, call submit()."
)
# The repositories the tasks come from: single names of this domain's tokenizer (with names of two
# random words, ~8,800 of them, a 128-wide model did not learn to copy the task's own name into
# its paths from the prompt or the file list in 1,000 SFT steps: experiments/tiny_cascade)
REPOSITORIES = tuple(
    f"{tree}lib"
    for tree in (
        "acorn", "birch", "cedar", "elm", "hazel", "larch",
        "maple", "oak", "pine", "rowan", "spruce", "willow",
    )
)  # fmt: skip
SANDBOX_REPO = "/tmp/repo"  # where the sandbox materialises a repository (tracebacks name it)

# name -> (source, [(mutated substring, replacement)], visible case, hidden cases); a case is
# (args tuple, expected result)
_POOL: dict[str, dict[str, tuple]] = {
    "arith": {
        "clamp": (
            "def clamp(x, lo, hi):\n    return max(lo, min(x, hi))\n",
            [("min(x, hi)", "min(x, lo)"), ("max(lo, ", "min(lo, ")],
            ((5, 0, 10), 5),
            [((-3, 0, 10), 0), ((12, 0, 10), 10), ((7, 2, 9), 7)],
        ),
        "mean": (
            "def mean(xs):\n    return sum(xs) / len(xs)\n",
            [("/ len(xs)", "/ (len(xs) + 1)"), ("sum(xs)", "max(xs)")],
            (([1, 2, 3, 6],), 3.0),
            [(([4],), 4.0), (([1, 2],), 1.5), (([2, 2, 2, 10],), 4.0)],
        ),
        "factorial": (
            "def factorial(n):\n    out = 1\n    for i in range(2, n + 1):\n"
            "        out *= i\n    return out\n",
            [("range(2, n + 1)", "range(2, n)"), ("out *= i", "out += i")],
            ((5,), 120),
            [((0,), 1), ((1,), 1), ((4,), 24), ((6,), 720)],
        ),
        "gcd": (
            "def gcd(a, b):\n    while b:\n        a, b = b, a % b\n    return abs(a)\n",
            [("a % b", "(a + 1) % b"), ("return abs(a)", "return abs(b)")],
            ((12, 18), 6),
            [((7, 3), 1), ((0, 5), 5), ((-4, 6), 2), ((21, 14), 7)],
        ),
    },
    "text": {
        "count_vowels": (
            'def count_vowels(s):\n    return sum(1 for c in s.lower() if c in "aeiou")\n',
            [('"aeiou"', '"aeio"'), ("s.lower()", "s")],
            (("Education",), 5),
            [(("",), 0), (("sky",), 0), (("AEIOU",), 5), (("queue",), 4)],
        ),
        "reverse_words": (
            'def reverse_words(s):\n    return " ".join(reversed(s.split()))\n',
            [("reversed(s.split())", "sorted(s.split())"), ('" ".join', '"".join')],
            (("one two three",), "three two one"),
            [(("one",), "one"), (("a b",), "b a"), (("  x   y ",), "y x")],
        ),
        "is_palindrome": (
            "def is_palindrome(s):\n    t = [c.lower() for c in s if c.isalnum()]\n"
            "    return t == t[::-1]\n",
            [("c.lower()", "c"), ("t[::-1]", "t[1:]")],
            (("Racecar",), True),
            [(("abca",), False), (("A man, a plan, a canal: Panama",), True), (("",), True)],
        ),
        "initials": (
            'def initials(name):\n    return "".join(w[0].upper() for w in name.split())\n',
            [("w[0].upper()", "w[0]"), ("w[0]", "w[-1]")],
            (("ada lovelace",), "AL"),
            [(("Grace Brewster Hopper",), "GBH"), (("x",), "X"), (("  alan   turing ",), "AT")],
        ),
    },
    "seqs": {
        "dedupe": (
            "def dedupe(xs):\n    seen, out = set(), []\n    for x in xs:\n"
            "        if x not in seen:\n            seen.add(x)\n            out.append(x)\n"
            "    return out\n",
            [("if x not in seen:", "if x in seen or not seen:"), ("seen.add(x)", "pass")],
            (([3, 1, 3, 2, 1],), [3, 1, 2]),
            [(([],), []), (([5, 5, 5],), [5]), ((["b", "a", "b"],), ["b", "a"])],
        ),
        "chunk": (
            "def chunk(xs, n):\n    return [xs[i : i + n] for i in range(0, len(xs), n)]\n",
            [("range(0, len(xs), n)", "range(0, len(xs) - n, n)"), ("xs[i : i + n]", "xs[i : n]")],
            (([1, 2, 3, 4, 5], 2), [[1, 2], [3, 4], [5]]),
            [(([], 3), []), (([1, 2, 3], 3), [[1, 2, 3]]), (([1, 2, 3], 1), [[1], [2], [3]])],
        ),
        "argmax": (
            "def argmax(xs):\n    best = 0\n    for i in range(1, len(xs)):\n"
            "        if xs[i] > xs[best]:\n            best = i\n    return best\n",
            [("xs[i] > xs[best]", "xs[i] >= xs[best]"), ("best = 0", "best = len(xs) - 1")],
            (([1, 7, 3, 7, 7],), 1),
            [(([4],), 0), (([1, 2, 9],), 2), (([5, 1, 5],), 0)],
        ),
        "running_sum": (
            "def running_sum(xs):\n    out, total = [], 0\n    for x in xs:\n"
            "        total += x\n        out.append(total)\n    return out\n",
            [("total += x", "total = x"), ("out.append(total)", "out.append(x)")],
            (([1, 2, 3],), [1, 3, 6]),
            [(([],), []), (([5],), [5]), (([2, -2, 4],), [2, 0, 4])],
        ),
    },
}


_PATH = {"path": {"type": "string", "description": "a path relative to the repository root"}}
# The tools of the `swe` environment (`nemocascade.rl.envs.swe` declares these): here so that the
# domain's SFT records carry them, and defined once.
SWE_TOOLS = (
    {"name": "list_files", "description": "List the repository's files."},
    {
        "name": "read_file",
        "description": "Return the text of a file.",
        "parameters": _PATH,
        "required": ["path"],
    },
    {
        "name": "write_file",
        "description": "Create or replace a file with the given text.",
        "parameters": {
            **_PATH,
            "content": {"type": "string", "description": "the file's complete new text"},
        },
        "required": ["path", "content"],
    },
    {"name": "run_tests", "description": "Run the repository's tests and return the output."},
    {"name": "submit", "description": "Submit the repository as it is now; ends the episode."},
)


@dataclasses.dataclass(frozen=True)
class RepairTask:
    """One task: `record` (a repository record with the buggy files), `solution` (the original
    files), `bug` ({"path", "function", "original", "mutated"}: where the bug was injected)."""

    record: dict
    solution: dict
    bug: dict


def _call(source: str, name: str, args: tuple):
    """`name(*args)` from `source`; the exception it raised stands for the result when it fails."""
    ns: dict = {}
    exec(compile(source, f"<{name}>", "exec"), ns)
    try:
        return ns[name](*args)
    except Exception as e:  # a mutation may crash on a case: that is a failing case
        return e


def _case_line(name: str, args: tuple, expected) -> str:
    return f"        self.assertEqual({name}({', '.join(map(repr, args))}), {expected!r})\n"


def _test_file(pkg: str, modules: dict[str, list[str]], hidden: bool) -> str:
    imports = "".join(
        f"from {pkg}.{mod} import {', '.join(names)}\n" for mod, names in modules.items()
    )
    out = f"import unittest\n\n{imports}\n\nclass {'Hidden' if hidden else 'Visible'}Test"
    out += "(unittest.TestCase):\n"
    for mod, names in modules.items():
        for name in names:
            _, _, visible, more = _POOL[mod][name]
            cases = more if hidden else [visible]
            out += f"    def test_{name}(self):\n"
            out += "".join(_case_line(name, args, want) for args, want in cases)
            out += "\n"
    return out.rstrip() + "\n\n\nif __name__ == '__main__':\n    unittest.main()\n"


def repair_task(rng: random.Random) -> RepairTask:
    """A repair task drawn from `rng` (deterministic in its state)."""
    pkg = rng.choice(REPOSITORIES)
    issue = rng.randint(1000, 9999)
    groups = sorted(rng.sample(sorted(_POOL), rng.randint(1, 2)))
    modules = {g: sorted(rng.sample(sorted(_POOL[g]), rng.randint(2, 3))) for g in groups}
    solution = {f"{pkg}/__init__.py": f'"""Small helpers: {", ".join(groups)}."""\n'}
    for g, names in modules.items():
        solution[f"{pkg}/{g}.py"] = "\n\n".join(_POOL[g][n][0] for n in names)
    solution[f"tests/test_{pkg}.py"] = _test_file(pkg, modules, hidden=False)
    group = rng.choice(groups)
    name = rng.choice(modules[group])
    source, mutations, visible, _ = _POOL[group][name]
    old, new = rng.choice(mutations)
    mutated = source.replace(old, new, 1)
    if mutated == source or _call(mutated, name, visible[0]) == visible[1]:
        raise AssertionError(f"mutation {old!r} -> {new!r} of {name} is not exposed")
    path = f"{pkg}/{group}.py"
    files = dict(solution)
    files[path] = solution[path].replace(source, mutated, 1)
    record = {
        "id": f"{pkg}-{issue}-{name}-{mutations.index((old, new))}",
        "prompt": (
            f"Issue #{issue}: a test fails in the repository `{pkg}`. Find the bug and fix it in "
            "the package (do not change the tests), then submit."
        ),
        "files": files,
        "hidden_tests": {f"tests/test_{pkg}_hidden.py": _test_file(pkg, modules, hidden=True)},
        "test_command": TEST_COMMAND,
    }
    bug = {"path": path, "function": name, "original": old, "mutated": new}
    return RepairTask(record, solution, bug)


def check_pool() -> None:
    """Every helper passes its own cases and every mutation fails its visible case (raises
    AssertionError naming the culprit); run by the tests."""
    for group in _POOL.values():
        for name, (source, mutations, visible, hidden) in group.items():
            for args, want in [visible, *hidden]:
                got = _call(source, name, args)
                assert got == want, f"{name}{args}: {got!r} != {want!r}"
            for old, new in mutations:
                assert old in source, f"{name}: {old!r} not in its source"
                got = _call(source.replace(old, new, 1), name, visible[0])
                assert got != visible[1], f"{name}: mutation {old!r} passes its visible case"


def run_visible_tests(files: dict[str, str]) -> tuple[bool, str]:
    """(passed, report) of `TEST_COMMAND` on `files`, run in-process with the unittest runner
    the sandbox runs, the report in the `swe` environment's format (`exit status N`, then the
    streams; unittest writes to stderr). Only for the generator's own repositories."""
    with tempfile.TemporaryDirectory() as tmp:
        root = os.path.join(tmp, "repo")
        for path, text in files.items():
            full = os.path.join(root, path)
            os.makedirs(os.path.dirname(full), exist_ok=True)
            with open(full, "w", encoding="utf-8") as f:
                f.write(text)
        stream, saved_path, before = io.StringIO(), list(sys.path), set(sys.modules)
        sys.path[:0] = [root]
        try:
            suite = unittest.TestLoader().discover(os.path.join(root, "tests"))
            passed = unittest.TextTestRunner(stream=stream).run(suite).wasSuccessful()
        finally:
            sys.path[:] = saved_path
            for name in set(sys.modules) - before:  # the package and tests imported above
                del sys.modules[name]
        err = stream.getvalue().replace(root, SANDBOX_REPO)
    return passed, f"exit status {0 if passed else 1}\nstdout:\n\nstderr:\n{err}"


def demonstration(task: RepairTask) -> tuple[dict, ...]:
    """The messages of a successful episode after the user's request (assistant turns with their
    tool calls, each followed by the environment's tool message)."""
    path, name = task.bug["path"], task.bug["function"]
    broken, fixed = task.record["files"], task.solution
    _, failing = run_visible_tests(broken)
    _, passing = run_visible_tests(fixed)

    def turn(text: str, tool: str, result: str, **arguments) -> tuple[dict, dict]:
        call = {"name": tool, "arguments": arguments}
        return {"role": "assistant", "content": text, "tool_calls": [call]}, {
            "role": "tool",
            "content": result,
        }

    steps = [
        turn("I will run the tests first.", "run_tests", failing),
        turn(
            f"`test_{name}` fails. Which files are there?", "list_files", "\n".join(sorted(broken))
        ),
        turn(f"`{name}` is in `{path}`.", "read_file", broken[path], path=path),
        turn(
            f"`{task.bug['mutated'].strip()}` should be `{task.bug['original'].strip()}`.",
            "write_file",
            f"wrote {path} ({len(fixed[path])} characters)",
            path=path,
            content=fixed[path],
        ),
        turn("Now the tests again.", "run_tests", passing),
    ]
    messages = [m for pair in steps for m in pair]
    final = {"name": "submit", "arguments": {}}
    return (*messages, {"role": "assistant", "content": "They pass.", "tool_calls": [final]})


@dataclasses.dataclass(frozen=True)
class _Demonstration:
    """`demonstration(task)` when called: built only for the problems that become SFT records
    (it runs the tests twice), not for every problem drawn (held-out filtering draws many)."""

    task: RepairTask

    def __call__(self) -> tuple[dict, ...]:
        return demonstration(self.task)


@register_domain("swe")
def _swe(rng: random.Random) -> Problem:
    task = repair_task(rng)
    return Problem(
        "swe",
        task.record["prompt"],
        "They pass.",
        {"type": "swe", **task.record},
        tools=SWE_TOOLS,
        system=SWE_SYSTEM,
        turns=_Demonstration(task),
    )
