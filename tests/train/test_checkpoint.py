"""Checkpointer: round trip, keep last N + best, corrupt and incomplete checkpoints skipped."""

import logging
import os

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

from nemocascade.train.checkpoint import Checkpointer
from nemocascade.train.state import TrainState


def _state(seed: int) -> TrainState:
    rng = np.random.default_rng(seed)
    params = nnx.State(
        {
            "w": nnx.Param(
                jnp.asarray(rng.normal(size=(4, 3)), jnp.float32), axes=("embed", "mlp")
            ),
            "b": nnx.Param(jnp.zeros((3,))),
        }
    )
    tx = optax.adamw(1e-3)
    return TrainState(
        step=jnp.asarray(seed, jnp.int32),
        params=params,
        model_state=nnx.State({"bias": nnx.Variable(jnp.ones((2,)))}),
        opt_state=tx.init(params),
        rng=jax.random.PRNGKey(seed),
    )


def _abstract(state):
    return jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), state)


def _equal(a, b):
    la, lb = jax.tree.leaves(a), jax.tree.leaves(b)
    return len(la) == len(lb) and all(
        np.array_equal(np.asarray(x), np.asarray(y)) for x, y in zip(la, lb, strict=True)
    )


def test_roundtrip_keeps_last_n_and_best(tmp_path):
    ckpt = Checkpointer(tmp_path / "ck", keep_last=2, best_metric="loss", best_mode="min")
    losses = {1: 5.0, 2: 1.0, 3: 4.0, 4: 3.0, 5: 2.0}
    for step, loss in losses.items():
        ckpt.save(
            step, _state(step), {"next": step}, metrics={"loss": loss}, extra={"note": f"s{step}"}
        )
    ckpt.wait()
    assert ckpt.all_steps() == [2, 4, 5]  # last two, plus the best loss (step 2)
    step, state, data_state, extra = ckpt.restore_latest(_abstract(_state(0)))
    assert (step, data_state, extra) == (5, {"next": 5}, {"note": "s5"})
    assert _equal(state, _state(5))
    assert isinstance(state.params["w"], nnx.Param)
    ckpt.close()
    with pytest.raises(KeyError, match="best_metric 'loss'"):
        Checkpointer(tmp_path / "ck2", best_metric="loss").save(1, _state(1), {}, metrics={})


def test_corrupt_latest_falls_back_and_incomplete_is_ignored(tmp_path, caplog):
    ckpt = Checkpointer(tmp_path / "ck", keep_last=5, best_metric="")
    for step in (1, 2):
        ckpt.save(step, _state(step), {"next": step})
    ckpt.close()
    # corrupt every file of the latest checkpoint's array store
    state_dir = tmp_path / "ck" / "2" / "state"
    corrupted = 0
    for root, _, files in os.walk(state_dir):
        for name in files:
            with open(os.path.join(root, name), "r+b") as f:
                size = f.seek(0, 2)
                f.seek(0)
                f.write(b"\x00garbage" * max(1, size // 8))
                corrupted += 1
    assert corrupted
    # an interrupted save leaves only a temporary directory, which is never listed
    (tmp_path / "ck" / "3.orbax-checkpoint-tmp-1234").mkdir()
    ckpt = Checkpointer(tmp_path / "ck", keep_last=5, best_metric="")
    assert 3 not in ckpt.all_steps()
    with caplog.at_level(logging.WARNING):
        step, state, data_state, _ = ckpt.restore_latest(_abstract(_state(0)))
    assert step == 1 and data_state == {"next": 1} and _equal(state, _state(1))
    assert any("unreadable" in r.getMessage() and "/2" in r.getMessage() for r in caplog.records)
    ckpt.close()


def test_empty_directory_restores_nothing(tmp_path):
    ckpt = Checkpointer(tmp_path / "ck")
    assert ckpt.restore_latest(_abstract(_state(0))) is None
    ckpt.close()


def test_read_only_restores_and_touches_nothing(tmp_path):
    ckpt = Checkpointer(tmp_path / "ck", keep_last=5)
    ckpt.save(1, _state(1), {"next": 1})
    ckpt.close()
    in_progress = tmp_path / "ck" / "2.orbax-checkpoint-tmp-1"  # a save under way elsewhere
    in_progress.mkdir()
    before = sorted(os.listdir(tmp_path / "ck"))
    ro = Checkpointer(tmp_path / "ck", read_only=True)
    assert ro.all_steps() == [1]
    fields = ro.restore_fields(1, {"params": _abstract(_state(0)).params})
    assert _equal(fields["params"], _state(1).params)
    with pytest.raises(RuntimeError, match="read-only"):
        ro.save(2, _state(2), {})
    ro.close()
    assert sorted(os.listdir(tmp_path / "ck")) == before
    missing = Checkpointer(tmp_path / "none", read_only=True)
    assert missing.all_steps() == [] and not (tmp_path / "none").exists()
    missing.close()
