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


def _fake_run(root, stages):
    for st in stages:
        (root / "stages" / st["name"] / "checkpoints").mkdir(parents=True)
    (root / "tokenizer.json").write_text("{}")
    (root / "summary.json").write_text(json.dumps({"stages": stages, "teachers": {}, "best": {}}))


def test_rescore_pairs_rebuilds_the_registry_and_drops_a_mopd_whose_teachers_change(
    tmp_path, monkeypatch
):
    """`--rescore`: kept stages evaluated again (here scripted scores), their per-problem scores
    and paired differences recorded, the registry rebuilt from the new scores; a MOPD stage whose
    teachers would now be other stages is dropped with its directory; with the run's own
    evaluation a score that comes out differently is an error naming the stage."""
    from configs.tiny_cascade import get_config
    from nemocascade.jobs.cascade import Cascade

    c = get_config("fast")
    c.data.train_per_domain, c.data.eval_per_domain = 32, 4
    c.stage_order = "sft,math_rl,mopd"
    c.stages.sft.domains = "math,code"
    c.stages.mopd.domains = "math,code"
    ev = lambda m, k: {"math": m, "code": k}  # noqa: E731
    recorded = [
        {"name": "sft", "type": "sft", "domains": ["math", "code"], "eval": ev(10.0, 50.0)},
        {"name": "math_rl", "type": "grpo", "domains": ["math"], "start_from": "sft",
         "eval": ev(40.0, 45.0)},
        {"name": "mopd", "type": "mopd", "domains": ["math", "code"], "start_from": "math_rl",
         "eval": ev(38.0, 49.0)},
    ]  # fmt: skip
    # the scores evaluated now: math_rl's code rises above sft's, so MOPD's code teacher changes
    now = {"sft": ev(10.0, 50.0), "math_rl": ev(40.0, 55.0), "mopd": ev(38.0, 49.0)}

    def scripted(self, params, model_state, episodes=None, intervals=None, problems=None, **kw):
        for d, v in now[params].items():
            problems[d] = [v / 100] * 4
            intervals[d] = [v, v]
        return dict(now[params])

    monkeypatch.setattr(Cascade, "evaluate", scripted)
    monkeypatch.setattr(Cascade, "_load_final", lambda self, name: (name, None))
    _fake_run(tmp_path / "src", recorded)
    mod = _fork_module()
    dst = tmp_path / "dst"
    mod.fork(str(tmp_path / "src"), str(dst), "mopd")
    c.tokenizer.path = ""
    (dst / "tokenizer.json").unlink()  # the run's own BPE is trained again for this config
    assert mod.rescore(str(dst), c, same_eval=False) == ["sft", "math_rl"]
    out = json.loads((dst / "summary.json").read_text())
    assert [s["name"] for s in out["stages"]] == ["sft", "math_rl"]
    assert out["teachers"] == {"math": "math_rl", "code": "math_rl"}
    assert out["stages"][1]["eval"] == now["math_rl"]
    assert out["stages"][1]["paired_ci95"] == {"sft": {"math": [30.0, 30.0, 30.0],
                                                       "code": [5.0, 5.0, 5.0]}}  # fmt: skip
    assert (
        json.loads((dst / "stages" / "sft" / "eval_problems.json").read_text())["math"] == [0.1] * 4
    )
    assert not (dst / "stages" / "mopd").exists() and (dst / "report.md").exists()

    now["sft"] = ev(12.0, 50.0)  # the run's own evaluation must reproduce the recorded scores
    with pytest.raises(SystemExit, match="sft scores again"):
        mod.rescore(str(dst), c, same_eval=True)
