"""Routing replay (R3) on the tiny cascade's math RL stage with bf16 compute: the sampler/trainer
mismatch with and without replaying the sampler's experts, over seeds.

    python experiments/tiny_cascade/routing_replay.py --runs=runs --seeds=0,1 --steps=6

`--runs` holds one finished main-job run per seed (`<runs>/seed<k>`, as `seeds.py` makes them).
For each seed and arm (`routing_replay` off / on) the run is forked after IF-RL
(`fork_run.fork`) and math RL trains `--steps` steps from it with `model.compute_dtype=bfloat16`
(bf16 activations and matmul inputs, fp32 parameters and accumulation: the accelerator
setting; the tiny cascade itself runs fp32), the arms of a seed drawing the same prompts and
sampling seeds. Per arm, over the steps of every seed: the mean |log pi_train - log pi_sampler|
over response tokens, its max, the fraction of tokens with the ratio outside [0.5, 2], the
fraction of (position, MoE layer) pairs whose replayed experts differ from the trainer's own
choice (`route_change_frac`, R3 arm only) and the mean reward; a seed's value is its mean over
steps, the table shows the mean over seeds with a 95% t-interval. Writes
experiments/tiny_cascade/routing_replay.json and routing_replay.md (the table).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from experiments.tiny_cascade.fork_run import fork  # noqa: E402
from nemocascade.train.metrics import read_metrics  # noqa: E402

HERE = Path(__file__).resolve().parent
ROOT = HERE.parents[1]
# two-sided 95% quantiles of Student's t by degrees of freedom (1-9); 1.96 beyond
T975 = {1: 12.706, 2: 4.303, 3: 3.182, 4: 2.776, 5: 2.571, 6: 2.447, 7: 2.365, 8: 2.306, 9: 2.262}
KEYS = ("logp_gap_mean", "logp_gap_max", "logp_off_band_frac", "route_change_frac", "reward_mean")


def run_arm(src: str, work: str, seed: int, steps: int, replay: bool) -> list[dict]:
    """math RL for `steps` steps from `src`'s IF-RL weights in bf16 compute; its metrics rows."""
    fork(src, work, after="if_rl")
    cmd = [
        sys.executable,
        "-m",
        "nemocascade.launch",
        "--config=configs/tiny_cascade.py",
        f"--workdir={work}",
        f"--config.seed={seed}",
        "--config.stage_order=sft,if_rl,math_rl",
        f"--config.stages.math_rl.steps={steps}",
        f"--config.stages.math_rl.checkpoint_every={steps}",
        f"--config.stages.math_rl.routing_replay={replay}",
        "--config.model.compute_dtype=bfloat16",
        "--config.eval.n_samples=1",
        "--config.progress=False",
    ]
    subprocess.run(cmd, cwd=ROOT, check=True)
    return read_metrics(os.path.join(work, "stages", "math_rl"))


def ci95(values) -> list[float]:
    v = np.asarray(values, float)
    if len(v) < 2:
        return [float(v.mean())] * 2
    half = T975.get(len(v) - 1, 1.96) * v.std(ddof=1) / np.sqrt(len(v))
    return [float(v.mean() - half), float(v.mean() + half)]


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--runs", required=True, help="directory of seed<k> main-job runs")
    p.add_argument("--seeds", default="0,1")
    p.add_argument("--steps", type=int, default=6)
    a = p.parse_args(argv)
    seeds = [int(s) for s in a.seeds.split(",")]
    rows = {False: {}, True: {}}
    with tempfile.TemporaryDirectory(prefix="r3_") as tmp:
        for seed in seeds:
            for replay in (False, True):
                work = os.path.join(tmp, f"seed{seed}_{'r3' if replay else 'fresh'}")
                metrics = run_arm(os.path.join(a.runs, f"seed{seed}"), work, seed, a.steps, replay)
                rows[replay][seed] = {
                    k: [float(m[k]) for m in metrics if k in m] for k in KEYS if k in metrics[0]
                }
                print(seed, replay, {k: np.mean(v) for k, v in rows[replay][seed].items()})
    table = {}
    for replay, per_seed in rows.items():
        arm = "r3" if replay else "fresh"
        keys = sorted(set().union(*(set(v) for v in per_seed.values())))
        table[arm] = {
            k: {
                "mean": float(np.mean([np.mean(per_seed[s][k]) for s in seeds])),
                "ci95": ci95([np.mean(per_seed[s][k]) for s in seeds]),
                "per_seed": {str(s): float(np.mean(per_seed[s][k])) for s in seeds},
            }
            for k in keys
        }
    out = {"seeds": seeds, "steps": a.steps, "compute_dtype": "bfloat16", "arms": table}
    (HERE / "routing_replay.json").write_text(json.dumps(out, indent=2) + "\n")
    lines = [
        f"math RL from IF-RL, {a.steps} steps, bf16 compute, seeds {seeds}: mean over seeds of "
        "each seed's mean over steps [95% t-interval]",
        "",
        "| metric | fresh routing | routing replay (R3) |",
        "|---|---|---|",
    ]
    for k in KEYS:
        cells = []
        for arm in ("fresh", "r3"):
            v = table[arm].get(k)
            cells.append("-" if v is None else f"{v['mean']:.3g} [{v['ci95'][0]:.3g}, "
                         f"{v['ci95'][1]:.3g}]")  # fmt: skip
        lines.append(f"| {k} | {cells[0]} | {cells[1]} |")
    (HERE / "routing_replay.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
