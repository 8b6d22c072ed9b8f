"""Forks a Cascade run directory after a finished stage, to study later stages from it.

    python experiments/tiny_cascade/fork_run.py --src=runs/tiny_cascade --dst=runs/study --after=sft
    python -m nemocascade.launch --config=configs/tiny_cascade.py --workdir=runs/study \
        --config.stage_order=sft,math_rl --config.stages.math_rl.steps=60 \
        --config.stages.math_rl.eval_every=20

The fork holds the tokenizer, the final weights of every stage up to `--after` (the MOPD teachers
among them; a reward_model stage's export too) and `summary.json` cut after that stage, with the
best-checkpoint registry rebuilt from the kept stages; the launcher then skips the kept stages
and runs the rest. `--rescore` evaluates the kept stages again with the run's config.json and
any `--override KEY=JSON` (e.g. `eval.n_samples=16`: training does not depend on the evaluation,
so the kept stages are what a run with that config trains, up to the teachers MOPD chooses from
the scores: a MOPD stage whose teachers would change is dropped), saving per-problem scores for
the paired comparisons (`paired_ci95`) of the stages run on the fork. `eval_every` logs the
held-out score of every domain as `eval/<domain>` in the stage's metrics.jsonl.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys

from ml_collections import ConfigDict

from nemocascade.config_files import apply_overrides, read_json
from nemocascade.jobs.cascade import Cascade, record_stage
from nemocascade.jobs.evaluation import PROBLEM_SCORES, paired_deltas
from nemocascade.jobs.report import write_report
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
        scores = os.path.join(src, "stages", st["name"], PROBLEM_SCORES)
        if os.path.exists(scores):  # per-problem held-out scores: the paired comparisons
            shutil.copy(scores, os.path.join(dst, "stages", st["name"]))
        export = os.path.join(src, "stages", st["name"], EXPORT_DIR)
        if os.path.isdir(export):  # a reward_model stage: its export is what stage:<name> reads
            shutil.copytree(export, os.path.join(dst, "stages", st["name"], EXPORT_DIR))
    with open(os.path.join(dst, "summary.json"), "w") as f:
        json.dump(out, f, indent=2)
    return out


def rescore(dst: str, config, *, same_eval: bool) -> list[str]:
    """Evaluates every kept policy stage of the fork `dst` again with `config`'s evaluation (the
    run's own config, or one whose `eval` section changed), records its scores, 95% intervals,
    per-problem scores and paired differences (against its start; MOPD: and its teachers) as a
    run now does, and rebuilds the best-checkpoint registry from the new scores. With the run's
    own evaluation (`same_eval`) the scores must come out as recorded (they are a function of
    the weights and the seed). A kept MOPD stage whose teachers the new scores would change is
    dropped with every later stage (the launcher trains them again). Returns the stages scored."""
    cascade = Cascade(config, dst)
    path = os.path.join(dst, "summary.json")
    with open(path) as f:
        old = json.load(f)
    was = {"stages": [], "teachers": {}, "best": {}}  # the registry as the run had it
    new = {"stages": [], "teachers": {}, "best": {}}
    for st in old["stages"]:
        cfg, stage_dir = cascade.stages.get(st["name"]), os.path.join(dst, "stages", st["name"])
        refs = [st.get("start_from") or ""]
        if getattr(cfg, "type", "") == "mopd":
            chose = [cfg.teachers.get(d) or was["teachers"].get(d) for d in cfg.domains]
            now = [cfg.teachers.get(d) or new["teachers"].get(d) for d in cfg.domains]
            if now != chose:
                print(f"{dst}: {st['name']} had teachers {chose}, now {now}: dropped with "
                      "every later stage", file=sys.stderr)  # fmt: skip
                for later in old["stages"][old["stages"].index(st) :]:
                    shutil.rmtree(os.path.join(dst, "stages", later["name"]), ignore_errors=True)
                break
            refs += now
        record_stage(was, st)
        if st["eval"]:
            problems: dict[str, list[float]] = {}
            intervals: dict[str, list] = {}
            got = cascade.evaluate(
                *cascade._load_final(st["name"]), intervals=intervals, problems=problems
            )
            diff = {d: (v, st["eval"][d]) for d, v in got.items() if abs(v - st["eval"][d]) > 0.01}
            if same_eval and diff:
                raise SystemExit(f"{dst}: {st['name']} scores again as (now, recorded) {diff}")
            st.update(eval=got, eval_ci95=intervals)
            st["paired_ci95"] = paired_deltas(
                problems, stage_dir, {r: os.path.join(dst, "stages", r) for r in refs if r}
            )
        new["stages"].append(st)
        record_stage(new, st)
    with open(path, "w") as f:
        json.dump(new, f, indent=2)
    write_report(new, dst, cascade.domains)
    return [s["name"] for s in new["stages"] if s["eval"]]


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--src", required=True, help="a Cascade workdir with summary.json")
    p.add_argument("--dst", required=True, help="the new workdir (must not exist)")
    p.add_argument("--after", required=True, help="the last stage to keep, e.g. sft")
    p.add_argument(
        "--rescore",
        action="store_true",
        help="evaluate the kept stages again (the run's config.json, with --override)",
    )
    p.add_argument(
        "--override",
        action="append",
        default=[],
        metavar="KEY=JSON",
        help="a config override for --rescore, e.g. eval.n_samples=16 (repeatable)",
    )
    a = p.parse_args(argv)
    out = fork(a.src, a.dst, a.after)
    print(
        f"{a.dst}: kept {[s['name'] for s in out['stages']]}, teachers {out['teachers']}",
        file=sys.stderr,
    )
    if a.rescore:
        run_config = ConfigDict(read_json(os.path.join(a.src, "config.json")))
        pairs = [o.partition("=") for o in a.override]
        config = apply_overrides(run_config, {k: json.loads(v) for k, _, v in pairs})
        same = config.eval.to_dict() == run_config.eval.to_dict()
        scored = rescore(a.dst, config, same_eval=same)
        print(f"{a.dst}: evaluated again {scored}", file=sys.stderr)


if __name__ == "__main__":
    main()
