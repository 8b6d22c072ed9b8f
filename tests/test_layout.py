"""The codebase's shape: no import cycle between modules (lazy imports inside functions
included), no module over 500 lines, and packages layered: each imports only the ones before it
in `model`, `data`, `generate`, `rewards`, `train` (the steps and the one loop), `rl` (stages
built on them), `jobs` (plus the shared leaves `typed_config` and `sharding`)."""

import ast
import pathlib

ROOT = pathlib.Path(__file__).parents[1]
PACKAGES = ("nemocascade", "pallas_kernels")
MAX_LINES = 500


def _modules():
    out = {}
    for pkg in PACKAGES:
        for path in (ROOT / pkg).rglob("*.py"):
            rel = path.relative_to(ROOT).with_suffix("")
            parts = list(rel.parts)
            if parts[-1] == "__init__":
                parts = parts[:-1]
            out[".".join(parts)] = path
    return out


def _imports(name, path, modules):
    """Modules of this repository that `name` imports (at any depth of the file)."""
    tree = ast.parse(path.read_text())
    is_pkg = path.name == "__init__.py"
    found = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            targets = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = name.split(".") if is_pkg else name.split(".")[:-1]
                anchor = anchor[: len(anchor) - (node.level - 1)]
                base = ".".join(anchor + ([base] if base else []))
            targets = [base] + [f"{base}.{a.name}" for a in node.names]
        else:
            continue
        for t in targets:
            while t and t not in modules:
                t = t.rpartition(".")[0]
            if t and t != name:
                found.add(t)
    return found


def test_no_import_cycles():
    modules = _modules()
    graph = {m: _imports(m, p, modules) for m, p in modules.items()}
    # a package's __init__ re-exporting its submodules is not a cycle with them
    for m in graph:
        graph[m] = {t for t in graph[m] if not (t.startswith(m + ".") or m.startswith(t + "."))}
    state, stack, cycles = {}, [], []

    def visit(m):
        state[m] = "open"
        stack.append(m)
        for t in sorted(graph[m]):
            if state.get(t) == "open":
                cycles.append(stack[stack.index(t) :] + [t])
            elif t not in state:
                visit(t)
        stack.pop()
        state[m] = "done"

    for m in sorted(graph):
        if m not in state:
            visit(m)
    assert not cycles, "import cycles:\n" + "\n".join(" -> ".join(c) for c in cycles)


def test_no_module_over_500_lines():
    long = {
        str(p.relative_to(ROOT)): n
        for p in _modules().values()
        if (n := len(p.read_text().splitlines())) > MAX_LINES
    }
    assert not long, f"modules over {MAX_LINES} lines: {long}"


def test_packages_depend_downstream_only():
    """A package imports only packages before it in the layering (or the shared leaves)."""
    order = ["model", "data", "generate", "rewards", "train", "rl", "jobs"]
    leaves = {"typed_config", "sharding"}
    modules = _modules()
    bad = []
    for m, path in modules.items():
        parts = m.split(".")
        if parts[0] != "nemocascade" or len(parts) < 2 or parts[1] not in order:
            continue
        for t in _imports(m, path, modules):
            tp = t.split(".")
            if tp[0] != "nemocascade" or len(tp) < 2 or tp[1] in leaves or tp[1] == parts[1]:
                continue
            if tp[1] not in order or order.index(tp[1]) > order.index(parts[1]):
                bad.append(f"{m} imports {t}")
    assert not bad, "\n".join(bad)
