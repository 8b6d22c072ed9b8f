"""The main job's targets checked over seeds: one table of mean, spread and 95% interval.

    for s in 0 1 2; do
      python -m nemocascade.launch --config=configs/tiny_cascade.py --workdir=runs/seed$s \
          --config.seed=$s
    done
    python experiments/tiny_cascade/seeds.py runs/seed0 runs/seed1 runs/seed2 --out=seeds

Reads each run's `summary.json` and checks, per seed, the targets the main job is held to:

  * every GRPO stage raises each of its own domains by >= `--lift` points (10) over the stage it
    started from (an RLHF stage after a reward model starts from the policy chain's last stage);
  * MOPD leaves each of its domains within `--mopd_margin` points (3) of that domain's best
    teacher, the best score of any stage before it (the registry's choice).

Writes `<out>.json` (per seed: scores, lifts, gaps, pass/fail; over seeds: mean, standard
deviation and the t-based 95% interval of each stage x domain) and `<out>.md` (the tables).
Within one run, each score also has its own 95% interval over held-out problems
(`eval_ci95` in the summary), shown beside the seed's score in `<out>.md`, and each lift or
MOPD gap its paired 95% interval (`paired_ci95`: the two checkpoints on the same problems),
shown beside the value when the run recorded it.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys

import numpy as np

# two-sided 95% Student t quantiles for n - 1 degrees of freedom (n seeds)
_T95 = {1: 12.706, 2: 4.303, 3: 3.182, 4: 2.776, 5: 2.571, 6: 2.447, 7: 2.365, 8: 2.306, 9: 2.262}


def load_run(workdir: str) -> dict:
    path = os.path.join(workdir, "summary.json")
    try:
        with open(path) as f:
            summary = json.load(f)
    except FileNotFoundError:
        raise SystemExit(f"{path}: not found (has the run finished a stage?)") from None
    except json.JSONDecodeError as e:
        raise SystemExit(f"{path}:{e.lineno}:{e.colno}: not JSON ({e.msg})") from None
    if not summary.get("stages"):
        raise SystemExit(f"{path}: no finished stage")
    return summary


def _paired(stage: dict, reference: str, domain: str) -> list[float] | None:
    """The run's paired 95% interval of `stage` - `reference` on `domain` (per-problem scores
    of both on the same held-out problems: `paired_ci95` in the summary), if recorded."""
    x = stage.get("paired_ci95", {}).get(reference, {}).get(domain)
    return None if x is None or x[1] is None else [x[1], x[2]]


def check_targets(summary: dict, *, lift: float = 10.0, mopd_margin: float = 3.0) -> dict:
    """{stage: {"kind": "lift" | "mopd", "domains": {d: {"value", "ok"}}, "ok"}} of one run: the
    lift of each GRPO stage on its own domains over its start, MOPD's gap to the best teacher."""
    stages = summary["stages"]
    by_name = {s["name"]: s for s in stages}
    out: dict[str, dict] = {}
    for i, st in enumerate(stages):
        if st["type"] == "grpo" and st["eval"]:
            start = by_name.get(st.get("start_from") or "")
            if start is None:
                continue
            doms = {}
            for d in st["domains"]:
                if d in st["eval"] and d in start["eval"]:
                    v = round(st["eval"][d] - start["eval"][d], 2)
                    doms[d] = {"value": v, "ok": v >= lift, "ci95": _paired(st, start["name"], d)}
            out[st["name"]] = {"kind": "lift", "domains": doms}
        elif st["type"] == "mopd":
            doms = {}
            for d in st["domains"]:
                before = [s for s in stages[:i] if d in s.get("eval", {})]
                if before and d in st["eval"]:  # the registry's teacher: earliest of the best
                    best = max(before, key=lambda s: s["eval"][d])
                    gap = round(st["eval"][d] - best["eval"][d], 2)
                    doms[d] = {
                        "value": gap,
                        "best_teacher": best["eval"][d],
                        "teacher": best["name"],
                        "ok": gap >= -mopd_margin,
                        "ci95": _paired(st, best["name"], d),
                    }
            out[st["name"]] = {"kind": "mopd", "domains": doms}
    for v in out.values():
        v["ok"] = all(x["ok"] for x in v["domains"].values())
    return out


def mean_spread(values: list[float], clip: tuple[float, float] | None = None) -> dict:
    """Mean, sample standard deviation and the t-based 95% interval of the mean over seeds
    (clipped to `clip`: scores are percentages; lifts and gaps are not clipped)."""
    v = np.asarray(values, np.float64)
    m = float(v.mean())
    if v.size < 2:
        return {"mean": round(m, 2), "sd": None, "ci95": None, "n": int(v.size)}
    sd = float(v.std(ddof=1))
    half = _T95.get(v.size - 1, 1.96) * sd / math.sqrt(v.size)
    lo, hi = m - half, m + half
    if clip is not None:
        lo, hi = max(lo, clip[0]), min(hi, clip[1])
    return {
        "mean": round(m, 2),
        "sd": round(sd, 2),
        "ci95": [round(lo, 2), round(hi, 2)],
        "n": int(v.size),
    }


def aggregate(runs: dict[str, dict], **targets) -> dict:
    """Per seed: scores, their in-run intervals and the target checks; over seeds: mean/spread."""
    per_seed = {}
    for label, summary in runs.items():
        per_seed[label] = {
            "scores": {s["name"]: s["eval"] for s in summary["stages"] if s["eval"]},
            "intervals": {s["name"]: s.get("eval_ci95", {}) for s in summary["stages"]},
            "sft_steps": next(
                (s.get("steps_done") for s in summary["stages"] if s["type"] == "sft"), None
            ),
            "targets": check_targets(summary, **targets),
        }
    order = [s["name"] for s in next(iter(runs.values()))["stages"] if s["eval"]]
    over: dict[str, dict] = {}
    for name in order:
        domains = sorted({d for p in per_seed.values() for d in p["scores"].get(name, {})})
        over[name] = {
            d: mean_spread(
                [p["scores"][name][d] for p in per_seed.values() if name in p["scores"]],
                clip=(0.0, 100.0),
            )
            for d in domains
        }
    checks: dict[str, dict] = {}
    for p in per_seed.values():
        for name, t in p["targets"].items():
            for d, x in t["domains"].items():
                checks.setdefault(name, {}).setdefault(d, []).append(x["value"])
    targets = {name: {d: mean_spread(v) for d, v in doms.items()} for name, doms in checks.items()}
    all_ok = all(t["ok"] for p in per_seed.values() for t in p["targets"].values())
    return {
        "per_seed": per_seed,
        "over_seeds": over,
        "targets_over_seeds": targets,
        "all_ok": all_ok,
    }


def _fmt(x: dict) -> str:
    if x["sd"] is None:
        return f"{x['mean']:.1f}"
    return f"{x['mean']:.1f} ± {x['sd']:.1f} [{x['ci95'][0]:.1f}, {x['ci95'][1]:.1f}]"


def markdown(result: dict, *, lift: float, mopd_margin: float) -> str:
    seeds = list(result["per_seed"])
    over = result["over_seeds"]
    domains = sorted({d for v in over.values() for d in v})
    lines = [
        f"Scores over {len(seeds)} runs ({', '.join(seeds)}): mean ± standard deviation "
        "[t-based 95% interval of the mean].",
        "",
        "| stage | " + " | ".join(domains) + " |",
        "|---|" + "---:|" * len(domains),
    ]
    for name, doms in over.items():
        cells = [_fmt(doms[d]) if d in doms else "" for d in domains]
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    lines += [
        "",
        f"Targets per seed (lift >= {lift:g} on the stage's own domains over its start; MOPD "
        f"within {mopd_margin:g} of the best teacher): value per seed [its paired 95% interval "
        "over held-out problems, when the run recorded one], PASS/FAIL.",
        "",
        "| stage | domain | " + " | ".join(seeds) + " | mean ± sd |",
        "|---|---|" + "---:|" * (len(seeds) + 1),
    ]
    for name, doms in result["targets_over_seeds"].items():
        for d, agg in doms.items():
            cells = []
            for s in seeds:
                x = result["per_seed"][s]["targets"].get(name, {}).get("domains", {}).get(d)
                if x is None:
                    cells.append("")
                    continue
                lo_hi = x.get("ci95")
                ci = f" [{lo_hi[0]:+.1f}, {lo_hi[1]:+.1f}]" if lo_hi else ""
                cells.append(f"{x['value']:+.1f}{ci} {'PASS' if x['ok'] else 'FAIL'}")
            lines.append(f"| {name} | {d} | " + " | ".join(cells) + f" | {_fmt(agg)} |")
    lines += ["", "Each run's own scores with their 95% interval over held-out problems:", ""]
    for s in seeds:
        p = result["per_seed"][s]
        lines.append(f"- {s} (SFT steps: {p['sft_steps']}):")
        for name, sc in p["scores"].items():
            ci = p["intervals"].get(name, {})
            cells = [
                f"{d} {v:.1f}" + (f" [{ci[d][0]:.1f}, {ci[d][1]:.1f}]" if ci.get(d) else "")
                for d, v in sorted(sc.items())
            ]
            lines.append(f"  - {name}: " + ", ".join(cells))
    lines += ["", f"All targets met on every seed: {'yes' if result['all_ok'] else 'no'}.", ""]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("runs", nargs="+", help="cascade workdirs (one per seed)")
    ap.add_argument("--out", default="seeds", help="writes OUT.json and OUT.md")
    ap.add_argument("--lift", type=float, default=10.0)
    ap.add_argument("--mopd_margin", type=float, default=3.0)
    args = ap.parse_args(argv)
    runs = {os.path.basename(os.path.normpath(r)): load_run(r) for r in args.runs}
    result = aggregate(runs, lift=args.lift, mopd_margin=args.mopd_margin)
    with open(args.out + ".json", "w") as f:
        json.dump(result, f, indent=2)
    md = markdown(result, lift=args.lift, mopd_margin=args.mopd_margin)
    with open(args.out + ".md", "w") as f:
        f.write(md)
    print(md)
    return 0 if result["all_ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
