"""The asynchronous RL mode on the tiny Cascade (issue 20, item 4): an RL stage trained strictly
on-policy and one step off-policy (`rollout_lag=1`: each batch sampled from the previous
update's weights while that update trains, with a token-level correction), from the same SFT
checkpoint, over replicates; held-out score, wall time and staleness side by side.

    python -m nemocascade.launch --config=configs/tiny_cascade.py --workdir=runs/tiny_sft \
        --config.stage_order=sft
    python experiments/tiny_cascade/async_rl.py --src=runs/tiny_sft --work=runs/async \
        --replicates=3 --steps=30 --out=experiments/tiny_cascade/async_rl

Replicate r runs the stage under the name `<stage>_r<r>`: an RL stage's prompt draws and
sampling seeds are keyed by (run seed, stage name, step), so the replicates differ in every
draw while sharing the SFT weights, the data and the held-out problems (the run seed, which
generates the synthetic data, stays the source run's). For each replicate and mode, in that
order (the modes interleaved), the SFT run is forked (`fork_run.fork`) and the stage run in a
process of its own (the same compiles in both modes). Modes: `on_policy` (the paper) and
`lag1_<correction>` (`rollout_lag=1`, `loss.importance_correction`). Read off each run: the
stage's held-out score (the main job's evaluation: 16 samples per prompt) and its paired 95%
interval against SFT; the stage's wall time and median step time (the first step, which
compiles, left out); the mean wait for a batch; the staleness (`logp_gap_mean`,
`logp_off_band_frac`: the sampler's weights against the trained ones; `is_weight_mean`: the
correction's mean weight). Per replicate, the off-policy run is compared with the on-policy one
problem by problem (paired interval); over replicates, the mean and t-based 95% interval of
the score difference and of the step-time ratio. Writes `<out>.json` and `<out>.md`.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import subprocess
import sys

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from fork_run import fork  # noqa: E402
from seeds import _T95  # noqa: E402

from nemocascade.jobs.evaluation import PROBLEM_SCORES, paired_ci95  # noqa: E402
from nemocascade.train.metrics import read_metrics  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def _mean_ci(values: list[float]) -> list[float | None]:
    v = np.asarray(values, float)
    if len(v) < 2:
        return [float(v.mean()), None, None]
    half = _T95.get(len(v) - 1, 1.96) * v.std(ddof=1) / math.sqrt(len(v))
    return [float(v.mean()), float(v.mean() - half), float(v.mean() + half)]


def run_one(src: str, dst: str, *, stage: str, name: str, steps: int, mode: str) -> None:
    """Forks `src` after sft into `dst` and runs `stage` there, as stage `name`, in a process
    of its own (this file with `--child`)."""
    if os.path.exists(os.path.join(dst, "summary.json")):
        with open(os.path.join(dst, "summary.json")) as f:
            if name in [s["name"] for s in json.load(f)["stages"]]:
                return  # done by an earlier invocation
    else:
        fork(src, dst, "sft")
    spec = dict(src=src, dst=dst, stage=stage, name=name, steps=steps, mode=mode)
    print(f"[async_rl] {name} {mode}: {dst}", file=sys.stderr, flush=True)
    child = [sys.executable, os.path.abspath(__file__), "--child", json.dumps(spec)]
    subprocess.run(child, cwd=ROOT, check=True)


def child(spec: dict) -> None:
    """The run of one (replicate, mode): the source run's config, the stage copied under its
    replicate name, trained after the forked SFT."""
    from ml_collections import ConfigDict

    from nemocascade.config_files import read_json
    from nemocascade.jobs.cascade import Cascade

    c = ConfigDict(read_json(os.path.join(spec["src"], "config.json")))
    st = ConfigDict(c.stages[spec["stage"]].to_dict())
    st.update(steps=spec["steps"], checkpoint_every=spec["steps"])
    if spec["mode"] != "on_policy":
        st.rollout_lag = 1
        st.loss.importance_correction = spec["mode"].removeprefix("lag1_")
    c.stages[spec["name"]] = st
    c.stage_order = f"sft,{spec['name']}"
    c.progress = False
    Cascade(c, spec["dst"]).run()


def read_run(dst: str, stage: str) -> dict:
    with open(os.path.join(dst, "summary.json")) as f:
        st = {s["name"]: s for s in json.load(f)["stages"]}[stage]
    rows = read_metrics(os.path.join(dst, "stages", stage))
    later = rows[1:] or rows

    def mean(key):  # over the steps after the first (which compiles)
        vals = [r[key] for r in later if key in r]
        return float(np.mean(vals)) if vals else None

    return {
        "domains": st["domains"],  # the stage's own: the table shows these
        "eval": st["eval"],
        "eval_ci95": st.get("eval_ci95", {}),
        "vs_sft": st.get("paired_ci95", {}).get("sft", {}),
        "train_s": st["train_s"],
        "step_s_median": float(np.median([r["step_s"] for r in later])),
        "rollout_wait_s": mean("rollout_wait_s"),
        "rollout_s": mean("rollout_s"),
        "reward_mean": mean("reward_mean"),
        "logp_gap_mean": mean("logp_gap_mean"),
        "logp_off_band_frac": mean("logp_off_band_frac"),
        "is_weight_mean": mean("is_weight_mean"),
        "lags": sorted({int(r.get("rollout_lag", 0)) for r in rows}),
    }


def tabulate(runs: dict, reps: list[str], modes: list[str], work: str) -> dict:
    base = modes[0]
    out = {"replicates": reps, "modes": modes, "runs": runs, "vs_" + base: {}}
    for mode in modes[1:]:
        per_rep, score_d, ratio = {}, [], []
        for r in reps:
            dirs = [os.path.join(work, f"{m}_{r}", "stages", r) for m in (mode, base)]
            with open(os.path.join(dirs[0], PROBLEM_SCORES)) as f:
                pa = json.load(f)
            with open(os.path.join(dirs[1], PROBLEM_SCORES)) as f:
                pb = json.load(f)
            per_rep[r] = {d: paired_ci95(pa[d], pb[d]) for d in sorted(pa) if d in pb}
            score_d.append([per_rep[r][d][0] for d in per_rep[r]])
            a, b = runs[f"{mode}/{r}"], runs[f"{base}/{r}"]
            ratio.append(a["step_s_median"] / b["step_s_median"])
        domains = list(per_rep[reps[0]])
        out["vs_" + base][mode] = {
            "paired_per_replicate": per_rep,
            "score_delta": {d: _mean_ci([x[i] for x in score_d]) for i, d in enumerate(domains)},
            "step_time_ratio": _mean_ci(ratio),
        }
    return out


def markdown(t: dict) -> str:
    base = t["modes"][0]
    lines = [
        "| replicate | mode | held-out (vs sft, paired 95%) | stage s | step s (median) | "
        "sampling s | wait s | logp gap | off band | IS weight | reward |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]

    def f(x, fmt="{:.3g}"):
        return "-" if x is None else fmt.format(x)

    for rep in t["replicates"]:
        for m in t["modes"]:
            r = t["runs"][f"{m}/{rep}"]
            score = ", ".join(
                f"{d} {v:.1f} ({r['vs_sft'][d][0]:+.1f} [{r['vs_sft'][d][1]:+.1f}, "
                f"{r['vs_sft'][d][2]:+.1f}])"
                if d in r["vs_sft"]
                else f"{d} {v:.1f}"
                for d, v in sorted(r["eval"].items())
                if d in r["domains"]
            )
            lines.append(
                f"| {rep} | {m} | {score} | {r['train_s']:.0f} | {r['step_s_median']:.2f} | "
                f"{f(r['rollout_s'], '{:.2f}')} | {f(r['rollout_wait_s'], '{:.2f}')} | "
                f"{f(r['logp_gap_mean'])} | "
                f"{f(r['logp_off_band_frac'])} | {f(r['is_weight_mean'])} | "
                f"{f(r['reward_mean'], '{:.3f}')} |"
            )
    lines += ["", f"Over replicates, against `{base}` (mean [t-based 95% interval]):", ""]
    own = t["runs"][f"{base}/{t['replicates'][0]}"]["domains"]
    for m, c in t["vs_" + base].items():
        for d, (mu, lo, hi) in c["score_delta"].items():
            if d not in own:
                continue
            ci = "" if lo is None else f" [{lo:+.1f}, {hi:+.1f}]"
            lines.append(f"- `{m}` - `{base}`, held-out {d}: {mu:+.1f}{ci} points")
        mu, lo, hi = c["step_time_ratio"]
        ci = "" if lo is None else f" [{lo:.2f}, {hi:.2f}]"
        lines.append(f"- `{m}` / `{base}`, median step time: {mu:.2f}x{ci}")
    return "\n".join(lines) + "\n"


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--src", help="a tiny Cascade workdir whose sft is finished")
    p.add_argument("--work", help="where the forks go (one per replicate and mode)")
    p.add_argument("--stage", default="if_rl", help="the RL stage of the source run's config")
    p.add_argument("--replicates", type=int, default=3)
    p.add_argument("--steps", type=int, default=30)
    p.add_argument("--modes", default="on_policy,lag1_icepop")
    p.add_argument("--out", help="output prefix: <out>.json, <out>.md")
    p.add_argument("--child", help=argparse.SUPPRESS)
    a = p.parse_args(argv)
    if a.child:
        return child(json.loads(a.child))
    if not (a.src and a.work and a.out):
        p.error("--src, --work and --out are required")
    modes = a.modes.split(",")
    if modes[0] != "on_policy" or any(not m.startswith("lag1_") for m in modes[1:]):
        raise SystemExit(f"--modes={a.modes}: on_policy first, then lag1_<correction> modes")
    reps = [f"{a.stage}_r{r}" for r in range(a.replicates)]
    runs = {}
    for r in reps:
        for m in modes:
            dst = os.path.join(a.work, f"{m}_{r}")
            run_one(a.src, dst, stage=a.stage, name=r, steps=a.steps, mode=m)
            runs[f"{m}/{r}"] = read_run(dst, r)
    table = tabulate(runs, reps, modes, a.work)
    table.update(stage=a.stage, steps=a.steps, src=os.path.basename(os.path.normpath(a.src)))
    with open(a.out + ".json", "w") as f:
        json.dump(table, f, indent=2)
    with open(a.out + ".md", "w") as f:
        f.write(markdown(table))
    print(markdown(table))


if __name__ == "__main__":
    main()
