"""Python sources that run inside the sandbox (as `python -c SOURCE RESULT_FD`), after the rlimit
prelude. Kept as strings: they must not import anything from this project.

Protocol: stdin starts with a length-prefixed blob ("<n>\\n" + n bytes of UTF-8), read without
over-reading; fd RESULT_FD is a pipe only the host reads. Both sources first write "S\\n" there
(proof that the sandbox started).

FUNC_HARNESS (unit tests): the blob is JSON {program, tests, entry_point, program_functions,
strict_compare}. It swaps stdin for /dev/null (keeping a private copy, from which it reads the
nonce that follows the blob only after every test ran), runs the program in its own namespace,
then the tests in a copy of it, then `check(candidate)` if the tests define a top-level `check`
that they did not call themselves (a marker at the top of `check`'s body records each call, so
HumanEval-style tests that end with `check(fn)` run exactly as written, whatever the program
defines).
On failure it writes "F:failed|error:Type: message". On success it writes "P:<nonce>" and
`_exit(0)`s at once (lingering threads cannot turn a pass into a timeout or vice versa).

With strict_compare (default), every comparison and every assert in the tests is rewritten to go
through a checker that refuses operands whose type is not a builtin scalar, a builtin container of
such values (checked recursively), Fraction or Decimal: a program cannot pass by returning an
object whose `__eq__` always answers True. Tests that compare instances of classes the program
defines need strict_compare=False.

IO_BOOT (stdin/stdout tests): the blob is the program; what follows on stdin is the case input.
It closes the result pipe and runs the program as `__main__`.
"""

READ_BLOB = r"""
import os as _os, sys as _sys
def _read_blob():
    hdr = b""
    while not hdr.endswith(b"\n"):
        c = _os.read(0, 1)
        if not c:
            raise SystemExit(97)
        hdr += c
    n, buf = int(hdr), b""
    while len(buf) < n:
        c = _os.read(0, n - len(buf))
        if not c:
            raise SystemExit(97)
        buf += c
    return buf.decode("utf-8")
_res = int(_sys.argv[1])
_os.write(_res, b"S\n")
"""

FUNC_HARNESS = (
    READ_BLOB
    + r"""
def _main(res, read_blob):
    import ast, collections, fractions, decimal, json, operator, os, sys
    spec = json.loads(read_blob())
    nonce_fd = os.dup(0)
    null = os.open("/dev/null", os.O_RDONLY)
    os.dup2(null, 0)
    os.close(null)
    sys.argv = ["main.py"]
    # Everything used after the program ran is bound now: the program may rebind builtins.
    write, exit_, read, type_ = os.write, os._exit, os.read, type
    bool_, zip_, dict_, str_, len_, exec_, compile_ = bool, zip, dict, str, len, exec, compile
    assertion_error, base_exception = AssertionError, BaseException
    lookup_error, name_error = LookupError, NameError
    atoms = frozenset({int, float, complex, bool, str, bytes, bytearray, type(None), range,
                       fractions.Fraction, decimal.Decimal})
    seqs = frozenset({list, tuple, set, frozenset, collections.deque})
    maps = frozenset({dict, collections.OrderedDict, collections.defaultdict, collections.Counter})
    ops = {"Eq": operator.eq, "NotEq": operator.ne, "Lt": operator.lt, "LtE": operator.le,
           "Gt": operator.gt, "GtE": operator.ge, "In": lambda a, b: a in b,
           "NotIn": lambda a, b: a not in b, "Is": operator.is_, "IsNot": operator.is_not}

    class StrictCompareError(assertion_error):
        pass

    def trust(v):
        stack = [v]
        while stack:
            x = stack.pop()
            t = type_(x)
            if t in atoms:
                continue
            if t in seqs:
                stack.extend(x)
            elif t in maps:
                stack.extend(dict_.keys(x))
                stack.extend(dict_.values(x))
            else:
                raise StrictCompareError("strict_compare: a non-builtin value was compared")
        return v

    def cmp_(left, names, rights):
        for name, right in zip_(names, rights):
            if name not in ("Is", "IsNot"):
                trust(left)
                trust(right)
            if not ops[name](left, right):
                return False
            left = right
        return True

    def truth(v):
        return bool_(trust(v))

    called = []

    def mark():
        called.append(True)

    class MarkCheck(ast.NodeTransformer):
        def visit_Module(self, node):
            for fn in node.body:
                if isinstance(fn, ast.FunctionDef) and fn.name == "check":
                    hook = ast.Expr(ast.Call(ast.Name("_nc_mark_", ast.Load()), [], []))
                    fn.body.insert(0, ast.copy_location(hook, fn))
            return node

    class Strict(ast.NodeTransformer):
        def visit_Compare(self, node):
            self.generic_visit(node)
            names = ast.Tuple([ast.Constant(type_(o).__name__) for o in node.ops], ast.Load())
            call = ast.Call(ast.Name("_nc_cmp_", ast.Load()),
                            [node.left, names, ast.Tuple(node.comparators, ast.Load())], [])
            return ast.copy_location(call, node)

        def visit_Assert(self, node):
            self.generic_visit(node)
            node.test = ast.copy_location(
                ast.Call(ast.Name("_nc_truth_", ast.Load()), [node.test], []), node.test)
            return node

    def report(kind, exc):
        try:
            msg = "F:%s:%s: %s\n" % (kind, type_(exc).__name__, str_(exc)[:300])
        except base_exception:
            msg = "F:%s:unprintable exception\n" % kind
        write(res, msg.encode("utf-8", "replace"))
        flush()
        exit_(1)

    def flush():
        for f in (sys.stdout, sys.stderr):
            try:
                f.flush()
            except base_exception:
                pass

    g = {"__name__": "__main__", "__builtins__": __builtins__}
    try:
        tree = ast.parse(spec["tests"], "tests.py")
        has_check = any(isinstance(n, ast.FunctionDef) and n.name == "check" for n in tree.body)
        tree = MarkCheck().visit(tree)
        if spec["strict_compare"]:
            tree = Strict().visit(tree)
        tree = ast.fix_missing_locations(tree)
        tests = compile(tree, "tests.py", "exec")
    except BaseException as e:
        report("error", e)
    try:
        exec_(compile_(spec["program"], "main.py", "exec"), g)
    except base_exception as e:
        report("error", e)
    try:
        t = dict_(g)
        t["_nc_cmp_"], t["_nc_truth_"], t["_nc_mark_"] = cmp_, truth, mark
        exec_(tests, t)
        if has_check and not called:
            name = spec["entry_point"]
            if not name:
                fns = spec["program_functions"]
                if len_(fns) != 1:
                    raise lookup_error("check() needs an entry_point; program defines %r" % (fns,))
                name = fns[0]
            if name not in g:
                raise name_error("entry point %r is not defined by the program" % name)
            t["check"](g[name])
    except assertion_error as e:
        report("failed", e)
    except base_exception as e:
        report("error", e)
    flush()
    write(res, b"P:" + read(nonce_fd, 64) + b"\n")
    exit_(0)
_main(_res, _read_blob)
"""
)

IO_BOOT = (
    READ_BLOB
    + r"""
_src = _read_blob()
_os.close(_res)
_sys.argv = ["main.py"]
del _read_blob, _res
exec(compile(_src, "main.py", "exec"), {"__name__": "__main__", "__builtins__": __builtins__})
"""
)
