"""experiments/tiny_cascade/seeds.py: the main job's targets checked per seed, mean and spread."""

import importlib.util
import json
import pathlib

import pytest

_PATH = pathlib.Path(__file__).parents[2] / "experiments" / "tiny_cascade" / "seeds.py"


def _module():
    spec = importlib.util.spec_from_file_location("seeds", _PATH)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def _summary(sft, if_rl, mopd, rlhf_chat):
    """sft/if_rl/mopd: (instruction, math); an rm side stage, then rlhf on chat."""
    ev = lambda i, m, c=40.0: {"instruction": i, "math": m, "chat": c}  # noqa: E731
    lift = if_rl[0] - sft[0]  # the paired interval if_rl recorded against sft
    return {
        "stages": [
            {"name": "sft", "type": "sft", "domains": ["instruction", "math", "chat"],
             "start_from": "", "eval": ev(*sft), "steps_done": 700,
             "eval_ci95": {"math": [10.0, 20.0]}},
            {"name": "if_rl", "type": "grpo", "domains": ["instruction"], "start_from": "sft",
             "eval": ev(*if_rl),
             "paired_ci95": {"sft": {"instruction": [lift, lift - 2.5, lift + 2.5]}}},
            {"name": "mopd", "type": "mopd", "domains": ["instruction", "math"],
             "start_from": "if_rl", "eval": ev(*mopd)},
            {"name": "rm", "type": "reward_model", "domains": ["chat"], "start_from": "mopd",
             "eval": {}},
            {"name": "rlhf", "type": "grpo", "domains": ["chat"], "start_from": "mopd",
             "eval": ev(*mopd, rlhf_chat)},
        ]
    }  # fmt: skip


def test_targets_per_seed_and_spread(tmp_path):
    seeds = _module()
    good = _summary((50.0, 15.0), (62.0, 10.0), (60.0, 13.0), 55.0)
    s = seeds.check_targets(good)
    assert s["if_rl"]["domains"]["instruction"] == {"value": 12.0, "ok": True, "ci95": [9.5, 14.5]}
    # MOPD: instruction 2 below its best teacher (if_rl 62), math 2 below (sft 15): both within 3
    assert s["mopd"]["domains"]["math"]["best_teacher"] == 15.0 and s["mopd"]["ok"]
    assert s["mopd"]["domains"]["math"]["teacher"] == "sft"
    assert s["mopd"]["domains"]["instruction"]["ci95"] is None  # this run recorded no pairs
    assert s["rlhf"]["domains"]["chat"]["value"] == 15.0 and "rm" not in s

    bad = _summary((50.0, 15.0), (59.0, 10.0), (55.0, 15.0), 55.0)  # +9 lift, -4 MOPD gap
    b = seeds.check_targets(bad)
    assert not b["if_rl"]["ok"] and not b["mopd"]["ok"] and b["rlhf"]["ok"]

    dirs = []
    for i, summ in enumerate((good, good, bad)):
        d = tmp_path / f"seed{i}"
        d.mkdir()
        (d / "summary.json").write_text(json.dumps(summ))
        dirs.append(str(d))
    out = tmp_path / "table"
    assert seeds.main([*dirs, f"--out={out}"]) == 1  # one seed misses: exit status 1
    result = json.loads((tmp_path / "table.json").read_text())
    assert not result["all_ok"]
    agg = result["targets_over_seeds"]["if_rl"]["instruction"]
    assert agg["mean"] == pytest.approx(11.0) and agg["sd"] == pytest.approx(1.73, abs=0.01)
    lo, hi = agg["ci95"]  # t(2) = 4.303: 11 +- 4.303 * 1.732 / sqrt(3)
    assert lo == pytest.approx(11 - 4.303, abs=0.01) and hi == pytest.approx(11 + 4.303, abs=0.01)
    md = (tmp_path / "table.md").read_text()
    assert (
        "+9.0 [+6.5, +11.5] FAIL" in md
        and "+12.0 [+9.5, +14.5] PASS" in md
        and "math 15.0 [10.0, 20.0]" in md
    )
    assert seeds.main([dirs[0], dirs[1], f"--out={out}"]) == 0

    (tmp_path / "seed0" / "summary.json").write_text("{")
    with pytest.raises(SystemExit, match="summary.json:1:2"):
        seeds.load_run(dirs[0])
