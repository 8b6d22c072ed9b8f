"""Bradley-Terry reward model: the loss and its gradient by hand, last-token selection under
padding, the step learning a token rule, microbatching, and the stage in the one train loop with
its checkpoint, export and refusal of a mismatching checkpoint."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from nemocascade.data import preferences as pf
from nemocascade.model import ModelConfig
from nemocascade.model.reward_head import (
    RewardModel,
    RewardModelMismatchError,
    export_reward_model,
    load_reward_model,
    split_reward_model,
)
from nemocascade.sharding import MeshConfig, make_mesh
from nemocascade.train import reward_model as rm
from nemocascade.train.loop import LoopConfig
from nemocascade.train.optim import OptimConfig, lr_schedule, make_optimizer
from nemocascade.train.state import TrainState
from nemocascade.train.steps import accumulate

CFG = ModelConfig.tiny(pattern="M*E")
GOOD, BAD, END = 7, 9, 4  # the rule of the toy pairs: chosen says GOOD before END, rejected BAD


def _sigmoid(x):
    return 1.0 / (1.0 + np.exp(-x))


def test_bt_loss_and_gradient_by_hand():
    rc = jnp.array([2.0, -1.0, 0.5, 3.0])
    rr = jnp.array([1.0, 0.5, 0.5, -2.0])
    d = np.asarray(rc - rr)
    want = np.mean(np.log1p(np.exp(-d)))
    np.testing.assert_allclose(rm.bradley_terry_loss(rc, rr), want, rtol=1e-6)
    g_c, g_r = jax.grad(rm.bradley_terry_loss, argnums=(0, 1))(rc, rr)
    np.testing.assert_allclose(g_c, -_sigmoid(-d) / 4, rtol=1e-6)
    np.testing.assert_allclose(g_r, _sigmoid(-d) / 4, rtol=1e-6)
    # the masked sums ignore a padding pair (its rewards are anything)
    s = rm.pair_sums(jnp.append(rc, 100.0), jnp.append(rr, -100.0), jnp.array([1, 1, 1, 1, 0.0]))
    np.testing.assert_allclose(s["loss_sum"] / s["pairs"], want, rtol=1e-6)
    assert float(s["correct"]) == 2.0  # d = 1, -1.5, 0, 5: a tie is not correct
    np.testing.assert_allclose(s["margin_sum"], d.sum(), rtol=1e-6)


_rewards = nnx.jit(lambda m, ids, last: m(ids, last))  # one program per shape for every model


@pytest.fixture(scope="module")
def model():
    return RewardModel(CFG, rngs=nnx.Rngs(0))


def test_last_token_selection_ignores_padding(model):
    rng = np.random.default_rng(0)
    seqs = [rng.integers(1, CFG.vocab_size, n).tolist() for n in (5, 11, 1)]
    short = pf.sequence_batch(seqs, seq_len=12, num_rows=3, pad_id=0)
    long = pf.sequence_batch(seqs, seq_len=24, num_rows=3, pad_id=0)
    long["input_ids"][:, 12:] = rng.integers(1, CFG.vocab_size, (3, 12))  # junk after the end
    long["input_ids"][0, 5:12] = 99
    r_short = _rewards(model, jnp.asarray(short["input_ids"]), jnp.asarray(short["last"]))
    r_long = _rewards(model, jnp.asarray(long["input_ids"]), jnp.asarray(long["last"]))
    np.testing.assert_allclose(r_short, r_long, rtol=1e-5, atol=1e-6)
    assert short["last"].tolist() == [4, 10, 0]
    # the reward is the head on the last real token's final hidden state
    h, _ = model.backbone.hidden_states(jnp.asarray([seqs[1]]))
    np.testing.assert_allclose(r_short[1], h[0, -1] @ model.head_D[...], rtol=1e-5)


def _toy_pairs(n: int, seed: int) -> list[dict]:
    """Pairs that differ only in one token before END: GOOD (chosen) vs BAD (rejected)."""
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(n):
        body = rng.integers(10, CFG.vocab_size, rng.integers(3, 9)).tolist()
        out.append({"chosen": body + [GOOD, END], "rejected": body + [BAD, END]})
    return out


def _batch(pairs, seq_len=12):
    return pf.pair_batch(pairs, seq_len=seq_len, num_pairs=len(pairs), pad_id=0)


def _setup(model, lr=3e-3, steps=20):
    optim = OptimConfig(lr=lr, min_lr=lr, warmup_steps=0, weight_decay=0.0)
    tx = make_optimizer(optim, steps)
    graphdef, params, rest = split_reward_model(model)
    return graphdef, tx, optim, rm.initial_state(params, rest, tx, 0)


def test_lm_head_is_not_trained(model):
    _, params, rest = split_reward_model(model)
    names = {"/".join(map(str, p)) for p, _ in nnx.to_flat_state(params)}
    assert "head_D" in names and not any("lm_head" in n for n in names)
    assert any("lm_head_DV" in "/".join(map(str, p)) for p, _ in nnx.to_flat_state(rest))


def test_step_lowers_loss_and_raises_accuracy(model):
    graphdef, tx, optim, state = _setup(model)
    step = jax.jit(
        functools.partial(
            rm.reward_model_step, graphdef=graphdef, tx=tx, lr_fn=lr_schedule(optim, 20)
        )
    )
    batches = [{k: jnp.asarray(v) for k, v in _batch(_toy_pairs(8, s)).items()} for s in range(3)]
    held_out = _batch(_toy_pairs(16, 99))
    evaluate = rm.PairEvalSet([held_out], graphdef)
    before = evaluate(state)
    history = []
    for i in range(12):
        state, metrics = step(state, batches[i % 3])
        history.append(jax.device_get(metrics))
    after = evaluate(state)
    assert history[-1]["loss"] < 0.5 * history[0]["loss"], [h["loss"] for h in history]
    assert after["eval_loss"] < before["eval_loss"]
    assert after["eval_accuracy"] == 1.0 and after["eval_margin"] > before["eval_margin"]
    assert all(int(h["skipped"]) == 0 for h in history)
    for k in ("accuracy", "margin", "reward_chosen", "reward_rejected", "grad_norm", "lr"):
        assert k in history[-1]


def test_microbatches_sum_to_the_full_batch(model):
    graphdef, params, rest = split_reward_model(model)
    batch = {k: jnp.asarray(v) for k, v in _batch(_toy_pairs(6, 5), 12).items()}
    batch["pair_mask"] = batch["pair_mask"].at[5].set(0.0)  # a padding pair in microbatch 2
    denom = jnp.sum(batch["pair_mask"])
    loss_fn = functools.partial(rm.reward_model_loss, graphdef=graphdef, denom=denom)
    out = {
        micro: jax.jit(lambda p, s, b, m=micro: accumulate(loss_fn, p, s, b, m))(
            params, rest, batch
        )
        for micro in (1, 2)
    }
    (l1, s1, g1), (l2, s2, g2) = out[1], out[2]
    np.testing.assert_allclose(l1, l2, rtol=1e-6)
    np.testing.assert_allclose(l1, s1["loss_sum"] / 5, rtol=1e-6)
    for k in ("loss_sum", "correct", "margin_sum", "pairs"):
        np.testing.assert_allclose(s1[k], s2[k], rtol=1e-5, atol=1e-6, err_msg=k)
    assert float(s1["pairs"]) == 5.0
    scale = max(float(jnp.max(jnp.abs(g))) for g in jax.tree.leaves(g1))
    for a, b in zip(jax.tree.leaves(g1), jax.tree.leaves(g2), strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6 * scale)


def test_batch_keys_are_checked(model):
    graphdef, tx, optim, state = _setup(model)
    batch = {k: jnp.asarray(v) for k, v in _batch(_toy_pairs(2, 0)).items()}
    del batch["rejected_last"]
    with pytest.raises(KeyError, match="rejected_last"):
        rm.reward_model_step(state, batch, graphdef=graphdef, tx=tx, lr_fn=lr_schedule(optim, 2))


class _Iter:
    """A checkpointable iterator over fixed batches (the loop's `IteratorSource` needs
    get_state / set_state)."""

    def __init__(self, batches):
        self.batches, self.i = batches, 0

    def __next__(self):
        b = self.batches[self.i % len(self.batches)]
        self.i += 1
        return b

    def get_state(self):
        return {"i": self.i}

    def set_state(self, state):
        self.i = state["i"]


def test_stage_checkpoint_export_and_mismatch(tmp_path, model):
    mesh = make_mesh(MeshConfig(data=1), jax.devices()[:1])
    graphdef, params, rest = split_reward_model(model)
    train = [_batch(_toy_pairs(8, s)) for s in range(2)]
    held_out = [_batch(_toy_pairs(8, 7))]
    result = rm.run_reward_model_stage(
        workdir=str(tmp_path / "rm"),
        mesh=mesh,
        model_cfg=CFG,
        graphdef=graphdef,
        weights=jax.tree.map(jnp.copy, (params, rest)),  # the loop donates its state
        train_batches=_Iter(train),
        eval_batches=held_out,
        optim=OptimConfig(lr=3e-3, min_lr=3e-3, warmup_steps=0, weight_decay=0.0),
        loop=LoopConfig(steps=3, checkpoint_every=3, best_metric="", progress=False),
        seed=0,
    )
    assert isinstance(result.state, TrainState) and int(result.state.step) == 3
    assert {"eval_accuracy", "eval_margin", "eval_loss"} <= set(result.record)

    # the loop's orbax checkpoint holds the head: the restored model scores like the final state
    restored = rm.final_reward_model(str(tmp_path / "rm"), CFG)
    batch = held_out[0]
    ids = jnp.asarray(batch["chosen_ids"])
    last = jnp.asarray(batch["chosen_last"])
    final = nnx.merge(graphdef, result.state.params, result.state.model_state)
    r_final = np.asarray(_rewards(final, ids, last))
    np.testing.assert_array_equal(np.asarray(_rewards(restored, ids, last)), r_final)
    assert not np.allclose(r_final, np.asarray(_rewards(model, ids, last)))  # it did train

    # export: backbone in HF layout + head file + metadata; loading gives the same rewards
    out = export_reward_model(restored, tmp_path / "export", metadata={"eval_accuracy": 1.0})
    assert (out / "backbone" / "config.json").exists()
    assert (out / "backbone" / "model.safetensors").exists()
    assert (out / "reward_head.safetensors").exists() and (out / "reward_model.json").exists()
    loaded = load_reward_model(out, expect_config=CFG)
    r_loaded = np.asarray(_rewards(loaded, ids, last))
    np.testing.assert_allclose(r_loaded, r_final, rtol=1e-6, atol=1e-6)

    # a policy of another vocabulary or architecture is refused, naming the keys
    with pytest.raises(RewardModelMismatchError) as e:
        load_reward_model(out, expect_config=CFG.replace(vocab_size=512, hidden_size=32))
    assert "vocab_size: checkpoint 256, expected 512" in str(e.value)
    assert "hidden_size: checkpoint 64, expected 32" in str(e.value)
    with pytest.raises(RewardModelMismatchError, match="pad_token_id") as e:
        load_reward_model(
            out, expect_config=CFG.replace(pad_token_id=3, pattern="M*"), check="vocab"
        )
    assert "pattern" not in str(e.value)  # vocabulary only
    # runtime choices are not a mismatch
    load_reward_model(out, expect_config=CFG.replace(remat="block", moe_backend="ragged_dot"))


def test_reward_weights_from_policy_keep_the_backbone():
    from nemocascade.model import NemotronH
    from nemocascade.train.state import split_model

    cfg = ModelConfig.tiny(pattern="*")
    policy_graphdef, params, rest = split_model(NemotronH(cfg, rngs=nnx.Rngs(1)))
    rm_params, rm_rest = rm.reward_weights_from_policy(policy_graphdef, params, rest, seed=2)
    assert rm_params["head_D"].get_value().shape == (cfg.hidden_size,)
    np.testing.assert_array_equal(
        rm_params["backbone"]["embed_VD"].get_value(), params["embed_VD"].get_value()
    )
    # the policy's lm_head is kept (not trained) for the export
    np.testing.assert_array_equal(
        rm_rest["backbone"]["lm_head_DV"].get_value(), params["lm_head_DV"].get_value()
    )
    merged = nnx.merge(rm.reward_model_graphdef(cfg), rm_params, rm_rest)
    assert isinstance(merged, RewardModel)
