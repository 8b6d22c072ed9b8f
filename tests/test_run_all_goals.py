"""benchmarks/run_all.py marks every headline key against the issues' goals."""

import pytest


@pytest.fixture(scope="module")
def run_all(load_benchmark):
    return load_benchmark("run_all")


def test_goals_table_marks_met_missed_and_unknown(run_all):
    res = {
        "train_mfu": 0.25,  # >= 0.55: missed
        "compile_s_nano_52_layers": 22.8,  # <= 60: met
        "transformers_separate_process": True,
        "moe_best_vs_equal_flop_dense": 1.65,  # no goal
        "continuous_batching_speedup": None,  # its benchmark failed: nothing to judge
        "details": {},
        "errors": {},
    }
    goals, table = run_all.goals_table(res)
    assert set(goals) == {k for k in res if k not in ("details", "errors")}
    assert [goals[k]["met"] for k in goals] == [False, True, True, None, None]
    assert goals["train_mfu"]["goal"] == ">= 0.55"
    assert "| `train_mfu` | 0.25 | >= 0.55 (issue 19) | **no** |" in table
    assert "| `moe_best_vs_equal_flop_dense` | 1.65 | - | - |" in table


def test_every_goal_names_a_headline_key(run_all):
    keys = {k for heads in run_all.HEADLINES.values() for k in heads}
    assert set(run_all.GOALS) <= keys | {"transformers_separate_process"}
