"""experiments/tiny_cascade/fork_run.py: a run cut after a stage, registry rebuilt."""

import importlib.util
import json
import pathlib

import pytest

_PATH = pathlib.Path(__file__).parents[2] / "experiments" / "tiny_cascade" / "fork_run.py"


def _fork_module():
    spec = importlib.util.spec_from_file_location("fork_run", _PATH)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_fork_keeps_stages_up_to_after_and_rebuilds_teachers(tmp_path):
    src = tmp_path / "src"
    stages = [
        {"name": "sft", "type": "sft", "domains": ["a", "b"], "eval": {"a": 10, "b": 50}},
        {"name": "a_rl", "type": "grpo", "domains": ["a"], "eval": {"a": 30, "b": 40}},
        {"name": "b_rl", "type": "grpo", "domains": ["b"], "eval": {"a": 20, "b": 60}},
    ]
    for st in stages:
        (src / "stages" / st["name"] / "checkpoints").mkdir(parents=True)
        (src / "stages" / st["name"] / "checkpoints" / "w").write_text(st["name"])
    (src / "tokenizer.json").write_text("{}")
    (src / "summary.json").write_text(
        json.dumps(
            {"stages": stages, "teachers": {"a": "a_rl", "b": "b_rl"}, "best": {"a": 30, "b": 60}}
        )
    )
    mod = _fork_module()
    out = mod.fork(str(src), str(tmp_path / "dst"), "a_rl")
    assert [s["name"] for s in out["stages"]] == ["sft", "a_rl"]
    assert out["teachers"] == {"a": "a_rl", "b": "sft"} and out["best"] == {"a": 30, "b": 50}
    assert (tmp_path / "dst" / "stages" / "a_rl" / "checkpoints" / "w").read_text() == "a_rl"
    assert not (tmp_path / "dst" / "stages" / "b_rl").exists()
    assert json.loads((tmp_path / "dst" / "summary.json").read_text()) == out
    with pytest.raises(SystemExit, match="no finished stage 'mopd'"):
        mod.fork(str(src), str(tmp_path / "dst2"), "mopd")
    with pytest.raises(SystemExit, match="exists"):
        mod.fork(str(src), str(tmp_path / "dst"), "sft")
