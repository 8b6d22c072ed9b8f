"""Forks a Cascade run directory after a finished stage, to study later stages from it.

    python experiments/tiny_cascade/fork_run.py --src=runs/tiny_cascade --dst=runs/study --after=sft
    python -m nemocascade.launch --config=configs/tiny_cascade.py --workdir=runs/study \
        --config.stage_order=sft,math_rl --config.stages.math_rl.steps=60 \
        --config.stages.math_rl.eval_every=20

The fork holds the tokenizer, the final weights of every stage up to `--after` (the MOPD teachers
among them; a reward_model stage's export too) and `summary.json` cut after that stage, with the
best-checkpoint registry rebuilt from the kept stages; the launcher then skips the kept stages
and runs the rest. `eval_every` logs the held-out score of every domain as `eval/<domain>` in the
stage's metrics.jsonl.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys

from nemocascade.jobs.cascade import record_stage
from nemocascade.jobs.reward_stage import EXPORT_DIR


def fork(src: str, dst: str, after: str) -> dict:
    with open(os.path.join(src, "summary.json")) as f:
        summary = json.load(f)
    names = [s["name"] for s in summary["stages"]]
    if after not in names:
        raise SystemExit(f"{src}/summary.json: no finished stage {after!r} (finished: {names})")
    if os.path.exists(dst):
        raise SystemExit(f"{dst} exists; pick a new directory (nothing was written)")
    kept = summary["stages"][: names.index(after) + 1]
    out = {"stages": kept, "teachers": {}, "best": {}}
    for st in kept:
        record_stage(out, st)
    os.makedirs(os.path.join(dst, "stages"))
    shutil.copy(os.path.join(src, "tokenizer.json"), dst)
    for st in kept:
        shutil.copytree(  # the last checkpoint of a finished stage is its final weights
            os.path.join(src, "stages", st["name"], "checkpoints"),
            os.path.join(dst, "stages", st["name"], "checkpoints"),
        )
        export = os.path.join(src, "stages", st["name"], EXPORT_DIR)
        if os.path.isdir(export):  # a reward_model stage: its export is what stage:<name> reads
            shutil.copytree(export, os.path.join(dst, "stages", st["name"], EXPORT_DIR))
    with open(os.path.join(dst, "summary.json"), "w") as f:
        json.dump(out, f, indent=2)
    return out


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--src", required=True, help="a Cascade workdir with summary.json")
    p.add_argument("--dst", required=True, help="the new workdir (must not exist)")
    p.add_argument("--after", required=True, help="the last stage to keep, e.g. sft")
    a = p.parse_args(argv)
    out = fork(a.src, a.dst, a.after)
    print(
        f"{a.dst}: kept {[s['name'] for s in out['stages']]}, teachers {out['teachers']}",
        file=sys.stderr,
    )


if __name__ == "__main__":
    main()
