"""Model invariants: causality by gradient, packing, full-size shapes and counts, config I/O,
remat."""

import json
import subprocess
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from nemocascade.model import ModelConfig, NemotronH
from nemocascade.tools.params import count_params

REF_CONFIG = (
    Path(__file__).resolve().parents[3]
    / "shared"
    / "reference"
    / "nemotron3_nano_30b_a3b.config.json"
)


def _model(cfg=None, seed=0):
    return NemotronH(cfg or ModelConfig.tiny(), rngs=nnx.Rngs(seed))


def test_causal_by_gradient():
    """d loss(t) / d embedding(s) == 0 for every s > t, through every block type."""
    model = _model(ModelConfig.tiny(chunk_size=4))
    t, d = 11, model.cfg.hidden_size
    graphdef, state = nnx.split(model)

    def out_at(x_emb, pos):
        m = nnx.merge(graphdef, state)
        seg = jnp.ones((1, t), jnp.int32)
        x = x_emb
        for block in m.layers:
            x, _, _ = block(x, seg)
        return jnp.sum(m.norm_f(x)[0, pos])

    x0 = jax.random.normal(jax.random.key(0), (1, t, d))
    grad_fn = jax.jit(jax.grad(out_at), static_argnums=1)
    for pos in (0, 4, 7, t - 1):
        g = grad_fn(x0, pos)
        norms = np.asarray(jnp.abs(g[0]).sum(-1))
        assert np.all(norms[pos + 1 :] == 0.0), (pos, norms)
        assert np.all(norms[: pos + 1] > 0.0), (pos, norms)


def test_packed_segments_equal_separate_documents():
    cfg = ModelConfig.tiny(chunk_size=4)
    model = _model(cfg)
    rng = np.random.default_rng(0)
    a, b = rng.integers(0, cfg.vocab_size, 7), rng.integers(0, cfg.vocab_size, 10)
    packed = np.concatenate([a, b, [0, 0, 0]])[None]
    seg = np.array([[1] * 7 + [2] * 10 + [0] * 3])
    graphdef, state = nnx.split(model)
    fwd = jax.jit(lambda st, ids, sg: nnx.merge(graphdef, st)(ids, segment_ids=sg))
    out = np.asarray(fwd(state, packed, seg))
    alone_a = np.asarray(fwd(state, a[None], np.ones((1, 7), np.int32)))
    alone_b = np.asarray(fwd(state, b[None], np.ones((1, 10), np.int32)))
    np.testing.assert_allclose(out[0, :7], alone_a[0], atol=1e-5, rtol=0)
    np.testing.assert_allclose(out[0, 7:17], alone_b[0], atol=1e-5, rtol=0)


def test_full_size_eval_shape_and_counts():
    cfg = (
        ModelConfig.from_json_file(REF_CONFIG)
        if REF_CONFIG.exists()
        else ModelConfig.nano_30b_a3b()
    )
    abstract = nnx.eval_shape(lambda: NemotronH(cfg, rngs=nnx.Rngs(0)))
    ids = jax.ShapeDtypeStruct((1, 16), jnp.int32)
    graphdef, state = nnx.split(abstract)
    out = jax.eval_shape(lambda s, x: nnx.merge(graphdef, s)(x), state, ids)
    assert out.shape == (1, 16, 131072) and out.dtype == jnp.float32
    counts = count_params(cfg)
    assert counts["total_params"] == 31_577_940_288  # paper: 31.6B
    assert counts["active_params"] == 3_227_754_816  # paper: 3.2B (lm_head, no embedding)
    assert counts["active_params_with_embeddings"] == 3_580_076_352
    assert counts["per_block_type"]["moe"]["active_per_layer"] == 80_169_728
    assert counts["per_block_type"]["mamba"]["params_per_layer"] == 38_744_896
    assert counts["per_block_type"]["attention"]["params_per_layer"] == 23_399_040


def test_params_cli_prints_json():
    out = subprocess.run(
        [sys.executable, "-m", "nemocascade.tools.params", "--model=small"],
        capture_output=True,
        text=True,
        check=True,
    )
    report = json.loads(out.stdout)
    assert report["total_params"] > report["active_params"] > 0


def test_config_reads_both_block_spellings():
    hf = ModelConfig.tiny().to_hf_config()
    by_pattern = {k: v for k, v in hf.items() if k != "layers_block_type"}
    by_list = {k: v for k, v in hf.items() if k != "hybrid_override_pattern"}
    legacy = dict(by_list, layers_block_type=["mamba", "attention", "moe", "mamba", "mlp", "moe"])
    for d in (by_pattern, by_list, legacy):
        assert ModelConfig.from_hf_config(d) == ModelConfig.tiny()
    with pytest.raises(ValueError, match="hybrid_override_pattern"):
        ModelConfig.from_hf_config(
            {k: v for k, v in by_pattern.items() if k != "hybrid_override_pattern"}
        )
    with pytest.raises(ValueError, match="unknown letters"):
        ModelConfig.tiny(pattern="MX*")


@pytest.mark.parametrize("policy", ["block", "matmuls"])
def test_remat_matches_no_remat(policy):
    cfg = ModelConfig.tiny()
    ids = jnp.asarray(np.random.default_rng(0).integers(0, cfg.vocab_size, (2, 9)))

    def grads(c):
        model = _model(c)
        graphdef, params, rest = nnx.split(model, nnx.Param, ...)

        def loss(p):
            return jnp.mean(nnx.merge(graphdef, p, rest)(ids) ** 2)

        return jax.jit(jax.value_and_grad(loss))(params)

    (l0, g0), (l1, g1) = grads(cfg), grads(cfg.replace(remat=policy))
    assert abs(float(l0) - float(l1)) <= 1e-6
    for a, b in zip(jax.tree.leaves(g0), jax.tree.leaves(g1), strict=True):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=1e-6, rtol=1e-5)


def test_bf16_compute_runs_finite():
    cfg = ModelConfig.tiny(param_dtype="bfloat16", compute_dtype="bfloat16")
    model = _model(cfg)
    assert model.layers[2].mixer.router_DE[...].dtype == jnp.float32  # router stays fp32
    assert model.layers[0].mixer.A_log_H[...].dtype == jnp.float32
    graphdef, state = nnx.split(model)
    out = jax.jit(lambda st, x: nnx.merge(graphdef, st)(x))(state, jnp.ones((1, 12), jnp.int32))
    assert out.dtype == jnp.float32 and bool(jnp.all(jnp.isfinite(out)))
