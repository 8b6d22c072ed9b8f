"""Optimizer: decay mask, schedule, decoupled weight decay, clipping, config validation."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

from nemocascade.model import ModelConfig, NemotronH
from nemocascade.train import optim
from nemocascade.train.state import split_model


def _paths(tree):
    """{"a/b/c": leaf} with Variables as leaves."""
    flat = jax.tree_util.tree_flatten_with_path(
        tree, is_leaf=lambda x: isinstance(x, nnx.Variable)
    )[0]
    return {"/".join(str(getattr(k, "key", k)) for k in path): v for path, v in flat}


def test_decay_mask_on_tiny_model():
    model = nnx.eval_shape(lambda: NemotronH(ModelConfig.tiny(), rngs=nnx.Rngs(0)))
    _, params, model_state = split_model(model)
    mask = _paths(optim.decay_mask(params))
    shapes = {p: v.get_value().shape for p, v in _paths(params).items()}
    assert set(mask) == set(shapes)
    for path, decay in mask.items():
        low = path.lower()
        if "norm" in low or "bias" in low or len(shapes[path]) < 2:
            assert not decay, path
        else:
            assert decay, path
    assert any(mask.values()) and not all(mask.values())
    # the MoE correction bias is model state, never seen by the optimizer
    assert any("bias" in p.lower() for p in _paths(model_state))


def test_schedule_warmup_cosine_floor():
    cfg = optim.OptimConfig(lr=1.0, min_lr=0.1, warmup_steps=10)
    f = optim.lr_schedule(cfg, total_steps=110)
    np.testing.assert_allclose(float(f(0)), 0.1, rtol=1e-6)
    np.testing.assert_allclose(float(f(9)), 1.0, rtol=1e-6)
    np.testing.assert_allclose(float(f(10)), 1.0, rtol=1e-6)
    np.testing.assert_allclose(float(f(60)), 0.55, rtol=1e-6)  # half way down the cosine
    np.testing.assert_allclose(float(f(110)), 0.1, rtol=1e-6)
    np.testing.assert_allclose(float(f(500)), 0.1, rtol=1e-6)
    values = np.array([float(f(s)) for s in range(10, 111)])
    assert np.all(np.diff(values) <= 1e-7)
    g = optim.lr_schedule(
        optim.OptimConfig(lr=1.0, min_lr=0.1, warmup_steps=10, decay_steps=210), total_steps=110
    )
    np.testing.assert_allclose(float(g(110)), 0.55, rtol=1e-6)


def test_weight_decay_only_where_masked_and_paper_defaults():
    cfg = optim.OptimConfig(lr=0.1, min_lr=0.1, warmup_steps=0, weight_decay=0.5)
    assert (optim.OptimConfig().b1, optim.OptimConfig().b2, optim.OptimConfig().weight_decay) == (
        0.9,
        0.98,
        0.1,
    )
    params = nnx.State(
        {
            "w": nnx.Param(jnp.ones((2, 2))),
            "norm": nnx.Param(jnp.ones((2, 2))),
            "b": nnx.Param(jnp.ones((2,))),
        }
    )
    tx = optim.make_optimizer(cfg, 10)
    zeros = jax.tree.map(jnp.zeros_like, params)
    updates, _ = tx.update(zeros, tx.init(params), params)
    upd = {p: v.get_value() for p, v in _paths(updates).items()}
    np.testing.assert_allclose(np.asarray(upd["w"]), -0.1 * 0.5 * np.ones((2, 2)), rtol=1e-6)
    np.testing.assert_array_equal(np.asarray(upd["norm"]), 0.0)
    np.testing.assert_array_equal(np.asarray(upd["b"]), 0.0)


def test_clipping_by_global_norm():
    cfg = optim.OptimConfig(lr=0.1, min_lr=0.1, warmup_steps=0, weight_decay=0.0, clip_norm=1.0)
    noclip = optim.OptimConfig(lr=0.1, min_lr=0.1, warmup_steps=0, weight_decay=0.0, clip_norm=0.0)
    params = {"w": jnp.zeros((3, 4))}
    grads = {"w": jnp.arange(12.0).reshape(3, 4)}
    norm = float(optax.tree.norm(grads))
    a = optim.make_optimizer(cfg, 10)
    b = optim.make_optimizer(noclip, 10)
    # two steps: the second moment estimate keeps the gradient scale, so clipping shows
    sa, sb = a.init(params), b.init(params)
    for _ in range(2):
        ua, sa = a.update(grads, sa, params)
        ub, sb = b.update(jax.tree.map(lambda g: g / norm, grads), sb, params)
        np.testing.assert_allclose(np.asarray(ua["w"]), np.asarray(ub["w"]), rtol=1e-5)


def test_config_validation():
    with pytest.raises(KeyError, match="warmup_step"):
        optim.OptimConfig.from_mapping({"lr": 1e-3, "warmup_step": 3})
    with pytest.raises(ValueError, match="min_lr"):
        optim.OptimConfig(lr=1e-3, min_lr=1e-2)
