"""The long-context stage's lift by document length: held-out score of each stage per length
group of the documents, and the paired difference of the last stage from the first.

    python -m nemocascade.launch --config=configs/tiny_cascade.py:long --workdir=runs/long
    python experiments/tiny_cascade/long_context.py runs/long

Reads the run's `config.json` (the held-out problems: `data.eval_per_domain` of the domain its
`long_context_rl` stage trains, at the run's seed) and each finished stage's per-problem scores
(`stages/<name>/eval_problems.json`), groups the problems by document length (`long_needle`:
filler sentences around the one fact, 0-15 / 16-30 / 31-45 / 46-60; `long_document`: facts in the
document, 1 / 2-3 / 4-7 / 8-15 / 16, drawn equally often) and prints a markdown table with the
paired 95% interval of the difference per group; `--json` also writes it.
"""

from __future__ import annotations

import argparse
import json
import os

from nemocascade.config_files import read_json
from nemocascade.data import synthetic
from nemocascade.jobs.evaluation import PROBLEM_SCORES, paired_ci95

# domain -> (the sentence a document's length is counted in, its name, the groups)
LENGTH = {
    "long_needle": (
        "Nothing happened",
        "filler sentences",
        ((0, 15), (16, 30), (31, 45), (46, 60)),
    ),
    "long_document": ("has the number", "facts", ((1, 1), (2, 3), (4, 7), (8, 15), (16, 16))),
}


def _name(lo: int, hi: int) -> str:
    return f"{lo}" if lo == hi else f"{lo}-{hi}"


def by_length(workdir: str) -> dict:
    cfg = read_json(os.path.join(workdir, "config.json"))
    stages = [s["name"] for s in read_json(os.path.join(workdir, "summary.json"))["stages"]]
    domain = cfg["stages"]["long_context_rl"]["domains"]
    if domain not in LENGTH:
        raise SystemExit(f"{workdir}: long_context_rl trains {domain!r}; known: {sorted(LENGTH)}")
    marker, unit, groups = LENGTH[domain]
    n = int(cfg["data"]["eval_per_domain"])
    lengths = [
        p.prompt.count(marker) for p in synthetic.problems(domain, "test", n, seed=int(cfg["seed"]))
    ]
    scores = {}
    for name in stages:
        path = os.path.join(workdir, "stages", name, PROBLEM_SCORES)
        per_problem = read_json(path)[domain]
        if len(per_problem) != len(lengths):
            raise SystemExit(f"{path}: {len(per_problem)} problems, the config has {len(lengths)}")
        scores[name] = per_problem
    first, last = stages[0], stages[-1]
    rows = []
    everything = (groups[0][0], groups[-1][1])
    for lo, hi in (*groups, everything):
        idx = [i for i, k in enumerate(lengths) if lo <= k <= hi]
        if not idx:
            continue
        label = "all" if (lo, hi) == everything else _name(lo, hi)
        row = {"length": label, "problems": len(idx)}
        for name in stages:
            row[name] = round(100 * sum(scores[name][i] for i in idx) / len(idx), 1)
        row["delta_ci95"] = paired_ci95(
            [scores[last][i] for i in idx], [scores[first][i] for i in idx]
        )
        rows.append(row)
    return {"domain": domain, "length_in": unit, "stages": stages, "rows": rows}


def markdown(res: dict) -> str:
    first, last = res["stages"][0], res["stages"][-1]
    head = [res["length_in"], "problems", *res["stages"], f"{last} - {first} [95%]"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in res["rows"]:
        d, lo, hi = r["delta_ci95"]
        ci = f"{d:+.1f} [{lo:+.1f}, {hi:+.1f}]" if lo is not None else f"{d:+.1f}"
        cells = [r["length"], str(r["problems"]), *(f"{r[s]:.1f}" for s in res["stages"]), ci]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("workdir")
    ap.add_argument("--json", default=None, help="also write the table's numbers here")
    a = ap.parse_args()
    res = by_length(a.workdir)
    print(markdown(res))
    if a.json:
        with open(a.json, "w") as f:
            json.dump(res, f, indent=1)


if __name__ == "__main__":
    main()
