"""Every stage validated before anything trains: each problem named with its stage and field,
all of them at once, within seconds, and nothing written."""

import os

import pytest

from configs.tiny_cascade import get_config
from nemocascade.jobs.cascade import Cascade
from nemocascade.jobs.stages import parse_stage
from nemocascade.jobs.validate import StageValidationError, validate_stages


def _stages(c, order):
    return {n: parse_stage(n, c.stages[n]) for n in order}


def _records(table):
    def records(domain, kind):
        if (domain, kind) not in table:
            raise FileNotFoundError(f"data.paths.{domain}.{kind} is not set")
        return table[domain, kind]

    return records


def _prompt(domain, verifier):
    return {"messages": [{"role": "user", "content": "q"}], "domain": domain, "verifier": verifier}


def test_all_problems_are_listed_with_stage_and_field():
    c = get_config()
    c.stages.math_rl.domains = "math,workplace"  # workplace: no verifier registered
    c.stages.math_rl.prompts_per_step = 3  # 3 x 8 rows do not split over 16 batch shards
    c.stages.code_rl.start_from = "mopd"  # runs later than... no: mopd runs before code_rl
    c.stages.if_rl.start_from = "code_rl"  # runs after if_rl: invalid
    c.stages.mopd.teachers = {"math": "nonexistent_stage"}
    order = ["sft", "if_rl", "math_rl", "mopd", "code_rl"]
    math = _prompt("math", {"type": "math", "answer": "2"})
    table = {
        ("instruction", "sft"): [{}],
        ("math", "sft"): [{}],
        ("code", "sft"): [{}],
        ("instruction", "rl"): [_prompt("instruction", {"type": "instruction"})],
        ("math", "rl"): [math],
        ("workplace", "rl"): [_prompt("workplace", None)],
        ("code", "rl"): [_prompt("code", {"type": "code", "tests": "assert 1"})],
        ("instruction", "eval"): [_prompt("instruction", {"type": "instruction"})],
        ("math", "eval"): [math],
        ("code", "eval"): [_prompt("code", {"type": "code", "tests": "assert 1"})],
    }
    with pytest.raises(StageValidationError) as e:
        validate_stages(
            order,
            _stages(c, order),
            eval_domains=["code", "instruction", "math", "workplace"],
            records=_records(table),
            batch_shards=16,
        )
    msg = str(e.value)
    assert "nothing was trained" in msg
    assert "stages.if_rl.start_from='code_rl'" in msg
    assert "stages.mopd.teachers.math='nonexistent_stage'" in msg
    assert "no verifier is registered for 'workplace'" in msg and "stages.math_rl" in msg
    assert "stages.math_rl: prompts_per_step x samples_per_prompt = 24 rows" in msg
    assert "data.paths.workplace.eval" in msg  # held-out data missing for an evaluated domain
    assert "code_rl.start_from" not in msg  # mopd does run before code_rl: valid
    assert isinstance(e.value, ValueError) and isinstance(e.value, KeyError)


def test_reward_models_and_mopd_need_inputs():
    c = get_config()
    c.stages.code_rl.reward = "genrm"
    c.stages.if_rl.reward = "nope"
    c.stages.if_rl.reward_model_path = "stage:mopd"  # not a reward_model stage
    order = ["mopd", "code_rl", "if_rl"]
    code = _prompt("code", {"type": "code", "tests": "assert 1"})
    table = {(d, k): [code] for d in ("instruction", "math", "code") for k in ("rl", "eval")}
    table["instruction", "rl"] = [_prompt("instruction", {"type": "instruction"})]
    with pytest.raises(StageValidationError) as e:
        validate_stages(
            order,
            _stages(c, order),
            eval_domains=["code"],
            records=_records(table),
            batch_shards=1,
        )
    msg = str(e.value)
    assert "stages.mopd: an MOPD stage needs an earlier stage" in msg
    assert "stages.code_rl.reward_model_path is not set" in msg
    assert "stages.code_rl.reward=" not in msg  # genrm is a registered reward kind
    assert "stages.if_rl.reward='nope': not a reward kind" in msg
    assert "stages.if_rl.reward_model_path='stage:mopd': not a reward_model stage" in msg


def test_cascade_validates_before_writing_anything(tmp_path):
    c = get_config("fast")
    c.stages.math_rl.domains = "math,nope"
    work = tmp_path / "run"
    with pytest.raises(StageValidationError, match="no domain 'nope'"):
        Cascade(c, str(work))
    assert not os.path.exists(work)  # no tokenizer trained, no directory made


def test_main_job_without_bubblewrap_stops_in_seconds_naming_it(tmp_path, monkeypatch):
    """The README's main command on a machine without bwrap: the code domain cannot be scored,
    so the job stops before training, saying how to install it (or opt into the weak sandbox)."""
    monkeypatch.setenv("PATH", str(tmp_path))  # no bwrap anywhere on PATH
    monkeypatch.delenv("NEMOCASCADE_ALLOW_WEAK_SANDBOX", raising=False)
    work = tmp_path / "run"
    with pytest.raises(StageValidationError) as e:
        Cascade(get_config(), str(work))
    msg = str(e.value)
    assert "code verifiers (['code'])" in msg and "apt-get install bubblewrap" in msg
    assert "NEMOCASCADE_ALLOW_WEAK_SANDBOX" in msg
    assert not work.exists()
