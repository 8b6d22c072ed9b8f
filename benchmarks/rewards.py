"""Throughput of the reward verifiers, above all sandboxed code scoring (programs per second).

Run (after `pip install -e .`, or with PYTHONPATH=.):
  python benchmarks/rewards.py --num_programs=64 --workers=1,2 --out=rewards_bench.json
Prints a table and writes JSON. Each code program runs in a fresh bubblewrap sandbox (function
tests: one sandbox per program; stdin/stdout tests: one sandbox per case). Math and instruction
items are scored through the same `score_batch` path for comparison.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import time
from decimal import Decimal
from pathlib import Path

from nemocascade.rewards import score_batch
from nemocascade.rewards.code import run_tests
from nemocascade.rewards.sandbox import SandboxConfig, find_bwrap

FUNC_OK = "```python\ndef solve(n):\n    return sum(i * i for i in range(n))\n```"
FUNC_BAD = "```python\ndef solve(n):\n    return sum(i for i in range(n))\n```"
FUNC_TESTS = "\n".join(f"assert solve({n}) == {sum(i * i for i in range(n))}" for n in range(20))
IO_OK = "```python\nimport sys\nn = int(sys.stdin.readline())\nprint(sum(range(n + 1)))\n```"
IO_CASES = [{"input": f"{n}\n", "output": f"{n * (n + 1) // 2}\n"} for n in (1, 10, 100, 1000, 7)]
DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "gsm8k" / "train_1000.jsonl"


def _code_batch(n: int, io: bool) -> tuple[list[dict], list[str]]:
    """n code records (3 in 4 correct) with their responses."""
    if io:
        rec = {"verifier": {"type": "code_io", "cases": IO_CASES, "time_limit_s": 2.0}}
        resp = [IO_OK if i % 4 else IO_OK.replace("n + 1", "n") for i in range(n)]
    else:
        rec = {"verifier": {"type": "code", "tests": FUNC_TESTS, "timeout_s": 10.0}}
        resp = [FUNC_OK if i % 4 else FUNC_BAD for i in range(n)]
    return [rec] * n, resp


def _math_batch(n: int) -> tuple[list[dict], list[str]]:
    rows = [json.loads(x) for x in DATA.read_text().splitlines()[:n]] if DATA.exists() else []
    recs = [{"verifier": {"type": "math", "answer": r["answer"]}} for r in rows]
    resps = [
        f"<think>...</think>The answer is \\boxed{{{r['answer'].split('####')[-1].strip()}}}"
        for r in rows
    ]
    return recs, resps


def _math_latex_batch(n: int) -> tuple[list[dict], list[str]]:
    """Answers written as \\frac{2g}{2}: no string/number fast path, math-verify does the work."""
    recs, _ = _math_batch(n)
    golds = [r["verifier"]["answer"].split("####")[-1].strip().replace(",", "") for r in recs]
    return recs, [f"\\boxed{{\\frac{{{2 * Decimal(g)}}}{{2}}}}" for g in golds]


def _if_batch(n: int) -> tuple[list[dict], list[str]]:
    rec = {
        "verifier": {
            "type": "instruction",
            "kwargs": [{}, {"relation": "at least", "num_words": 20}, {}],
            "instruction_id_list": [
                "punctuation:no_comma",
                "length_constraints:number_words",
                "detectable_format:title",
            ],
        }
    }
    return [rec] * n, ["<<title>>\n" + "word " * 50] * n


def _row(name, workers, recs, resps):
    scores, _, m = score_batch(recs, resps, None, num_workers=workers, timeout_s=60.0)
    return {
        "verifier": name,
        "workers": workers,
        "items": len(recs),
        "wall_s": round(m["rewards/wall_s"], 3),
        "items_per_s": round(len(recs) / m["rewards/wall_s"], 2),
        "mean_reward": round(sum(scores) / len(scores), 3),
        "errors": m["rewards/errors"],
        "timeouts": m["rewards/timeouts"],
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--num_programs", type=int, default=64)
    ap.add_argument("--num_math", type=int, default=500)
    ap.add_argument("--workers", default="1,2")
    ap.add_argument("--out", default="rewards_bench.json")
    args = ap.parse_args()
    if find_bwrap(SandboxConfig()) is None:
        raise SystemExit("bwrap not installed: `apt-get install -y bubblewrap`")
    latencies = []
    for _ in range(10):
        t0 = time.monotonic()
        assert run_tests(FUNC_OK.strip("`").removeprefix("python\n"), FUNC_TESTS).passed
        latencies.append(time.monotonic() - t0)
    rows = []
    for w in [int(x) for x in args.workers.split(",")]:
        rows.append(_row("code", w, *_code_batch(args.num_programs, io=False)))
        rows.append(_row("code_io (5 cases)", w, *_code_batch(args.num_programs, io=True)))
        if DATA.exists():
            rows.append(_row("math (gsm8k)", w, *_math_batch(args.num_math)))
            rows.append(_row("math (latex, math-verify)", w, *_math_latex_batch(args.num_math)))
        rows.append(_row("instruction", w, *_if_batch(args.num_math)))
    result = {
        "cpu_count": os.cpu_count(),
        "machine": platform.machine(),
        "run_tests_latency_s_median": round(statistics.median(latencies), 4),
        "rows": rows,
    }
    cols = [
        "verifier",
        "workers",
        "items",
        "wall_s",
        "items_per_s",
        "mean_reward",
        "errors",
        "timeouts",
    ]
    print(f"single run_tests latency (median of 10): {result['run_tests_latency_s_median']} s")
    width = {c: max(len(c), *(len(str(r[c])) for r in rows)) for c in cols}
    print(" | ".join(c.rjust(width[c]) for c in cols))
    for r in rows:
        print(" | ".join(str(r[c]).rjust(width[c]) for c in cols))
    Path(args.out).write_text(json.dumps(result, indent=2))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
