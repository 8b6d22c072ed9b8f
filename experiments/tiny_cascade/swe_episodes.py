"""What a checkpoint does in held-out `swe` episodes: transcripts and where the paths it names
come from.

    python -m nemocascade.launch --config=configs/tiny_cascade.py:swe --workdir=runs/swe
    python experiments/tiny_cascade/swe_episodes.py runs/swe --stage=sft --episodes=16 --show=2

Loads a stage's checkpoint of a Cascade run (`--step`, default the newest; read-only), plays
`--episodes` held-out `swe` tasks of the run's seed greedily in the `swe` environment with the
run's `swe_rl` limits (the sandbox, as in training), prints the first `--show` transcripts and
counts, over the episodes: successes, finish reasons, and for the first `read_file` /
`write_file` call of each episode whether the package it names is the task's own, another
training task's (recalled, not read from the conversation) or neither, and whether its module
holds the failing helper. `--json` writes the counts.
"""

from __future__ import annotations

import argparse
import collections
import json
import re

from nemocascade.config_files import read_json
from nemocascade.data import synthetic
from nemocascade.data.synthetic.base import prompt_record
from nemocascade.evaluate import load_model
from nemocascade.rl.agentic import sample_episodes
from nemocascade.rl.config import EnvStageConfig

_PATH = re.compile(r"<function=(?:read_file|write_file)>\s*<parameter=path>\s*([^\s<]+)")


def package(record: dict) -> str:
    """The task's package: the top folder of its files that is not `tests`."""
    return next(
        p.split("/")[0]
        for p in record["verifier"]["files"]
        if "/" in p and not p.startswith("tests/")
    )


def first_path(messages: list[dict]) -> str | None:
    """The path of the episode's first read_file / write_file call, if any."""
    for m in messages:
        if m["role"] == "assistant":
            found = _PATH.search(m.get("content") or "")
            if found:
                return found.group(1)
    return None


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("run")
    ap.add_argument("--stage", default="sft")
    ap.add_argument("--step", type=int, default=None)
    ap.add_argument("--episodes", type=int, default=16)
    ap.add_argument("--show", type=int, default=1, help="transcripts to print")
    ap.add_argument("--json", default=None)
    a = ap.parse_args()

    cfg = read_json(f"{a.run}/config.json")
    seed, n_eval = int(cfg["seed"]), int(cfg["data"]["eval_per_domain"])
    stage_cfg = cfg["stages"]["swe_rl"]
    held_out = synthetic.problems("swe", "test", n_eval, seed=seed)[: a.episodes]
    records = [prompt_record(p) for p in held_out]
    train = synthetic.problems("swe", "train", int(cfg["data"]["train_per_domain"]), seed=seed)
    train_pkgs = {package(prompt_record(p)) for p in train}

    lm = load_model(a.run, stage=a.stage, step=a.step)
    trajs = sample_episodes(
        lm.graphdef,
        lm.state,
        lm.tokenizer,
        records,
        env=EnvStageConfig(**stage_cfg["env"]),
        n=1,
        max_new_tokens=int(stage_cfg["max_new_tokens"]),
        temperature=0.0,
        top_p=1.0,
        seed=seed,
        thinking=bool(stage_cfg.get("thinking", False)),
    )
    counts: collections.Counter = collections.Counter()
    for i, (t, r) in enumerate(zip(trajs, records, strict=True)):
        own = package(r)
        path = first_path(t.messages)
        named = path.split("/")[0] if path else None
        counts["episodes"] += 1
        counts["success"] += int(t.reward == 1.0)
        counts[f"finish/{t.finish_reason}"] += 1
        if named is None:
            counts["first_path/none"] += 1
        elif named == own:
            counts["first_path/own_package"] += 1
        elif named in train_pkgs:
            counts["first_path/a_training_package"] += 1
        else:
            counts["first_path/other"] += 1
        if path is not None and path in r["verifier"]["files"]:
            counts["first_path/an_existing_file"] += 1
        if i < a.show:
            print(f"===== episode {i}: package {own}, {t.finish_reason}, reward {t.reward}")
            for m in t.messages[1:]:
                print(f"--- {m['role']}:\n{(m.get('content') or '').strip()}")
    out = {
        "seed": seed,
        "train_tasks": len(train),
        "stage": a.stage,
        "step": lm.info["step"],
        "counts": dict(counts),
    }
    print(json.dumps(out, indent=1))
    if a.json:
        with open(a.json, "w") as f:
            json.dump(out, f, indent=1)


if __name__ == "__main__":
    main()
