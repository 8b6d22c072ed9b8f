"""benchmarks/train_profile.py: a train step's thunk times labelled by model part, kind of work
and pass, from a real profile of the compiled step."""

import jax
import jax.numpy as jnp
import pytest


@pytest.fixture(scope="module")
def profile(load_benchmark):
    return load_benchmark("train_profile")


def test_kinds_of_compiled_instructions(profile):
    def f(a, b, i):
        return jnp.sort(a, axis=0), jnp.tanh(a @ b), jnp.exp(a) * 2.0, a[i], a.sum(0)

    a = jnp.ones((64, 64))
    text = jax.jit(f).lower(a, a, jnp.arange(8)).compile().as_text()
    hlo = profile.parse_hlo(text)
    kinds = {profile.kind_of(hlo, n) for n in hlo["instrs"]}
    assert {"matmul", "sort", "elementwise", "gather/scatter", "reduction"} <= kinds
    # no model source frame: every instruction of this function is "other"
    assert {profile.part_of(hlo, n) for n in hlo["instrs"]} == {"other"}
    assert profile.pass_of("jit(f)/transpose(jvp(x))/dot_general") == "backward"
    assert profile.pass_of("jit(f)/jvp(x)/mul") == "forward"
    assert profile.pass_of("jit(f)/add") == "update"


def test_tiny_step_profile_covers_every_part_and_pass(profile):
    res = profile.profile("tiny", batch=2, seq=32, steps=1)
    assert res["unmatched_thunk_s"] == 0.0  # every traced thunk is an instruction of the step
    for part in ("mamba2", "moe", "attention", "loss", "optimizer", "block"):
        assert res["by_part_s"].get(part, 0.0) > 0.0, part
    assert set(res["by_pass_s"]) == {"forward", "backward", "update"}
    assert res["by_kind_s"]["matmul"] > 0.0 and res["by_kind_s"].get("sort", 0.0) > 0.0
    total = res["thunk_s_per_step"]
    for key in ("by_part_s", "by_kind_s", "by_pass_s", "by_part_kind_s"):
        assert sum(res[key].values()) == pytest.approx(total)
    assert 0.0 < res["mfu"] < 1.0 and 0.0 < res["matmul_time_fraction"] < 1.0
