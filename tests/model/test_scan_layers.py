"""`scan_layers=True` (repeated block units as `lax.scan` bodies over stacked parameters, a unit
position that only some copies have under `lax.cond`) gives the numbers of the unrolled model
(fp32, 1e-5): same initial parameters and Hugging Face tensors, logits / gradients / MoE
statistics with and without remat and with packed rows, the cached prefill + decode path, the MoE
bias update on stacked biases, checkpoint I/O across the two layouts, parameter counts and
shardings."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from jax.sharding import AbstractMesh
from jax.sharding import PartitionSpec as P

from nemocascade.model import ModelConfig, NemotronH, load_hf_checkpoint, save_hf_checkpoint
from nemocascade.model import moe_balance as bal
from nemocascade.model.hf_io import iter_hf_tensors
from nemocascade.model.layer_scan import Segment, layer_segments
from nemocascade.model.moe_balance import ExpertBias
from nemocascade.sharding import MESH_AXES, MeshConfig, state_specs
from nemocascade.tools.params import count_params
from nemocascade.train.state import bytes_per_device

TOL = {"atol": 1e-5, "rtol": 0}  # fp32, fixed up front
# ME*E x2 (two MoE layers per unit: their bias rows interleave), ME x2, then "-" unrolled
PATTERN = "ME*EME*EMEME-"
# M*E x4 with the attention in copies 2 and 4 (one scan, the attention under lax.cond), "-"
GAPPED = "MEM*EMEM*E-"


def _cfg(pattern=PATTERN, **kw):
    return ModelConfig.tiny(
        **{"pattern": pattern, "chunk_size": 4, "moe_aux_loss_coef": 1e-2, **kw}
    )


def _pair(cfg, seed=0):
    """(unrolled, scanned) models built from the same seed."""
    return (
        NemotronH(cfg, rngs=nnx.Rngs(seed)),
        NemotronH(cfg.replace(scan_layers=True), rngs=nnx.Rngs(seed)),
    )


def _hf(model) -> dict[str, np.ndarray]:
    return dict(iter_hf_tensors(model))


def _assert_same_tensors(a: dict, b: dict, **tol):
    assert list(a) == list(b)
    for k in a:
        np.testing.assert_allclose(a[k], b[k], **(tol or {"atol": 0, "rtol": 0}), err_msg=k)


def test_layer_segments_rule():
    nano = ModelConfig.nano_30b_a3b().pattern
    assert nano.replace("M*E", "A").replace("ME", "B") == "BBA" * 5 + "BBBABBBB"
    present = tuple(c == "A" for c in "BBA" * 5 + "BBBABBBB")  # 23 copies, 6 with attention
    assert layer_segments(nano) == (Segment(0, "M*E", 23, 1, present),)  # 3 block bodies
    assert layer_segments(GAPPED) == (
        Segment(0, "M*E", 4, 1, (False, True, False, True)),
        Segment(10, "-", 1),
    )
    assert layer_segments("MM*MM*-")[0] == Segment(0, "M*", 4, 1, (False, True, False, True))
    assert layer_segments(PATTERN) == (
        Segment(0, "ME*E", 2),
        Segment(8, "ME", 2),
        Segment(12, "-", 1),
    )
    assert layer_segments("EEEE") == (Segment(0, "E", 4),)
    assert layer_segments("MEMEMEME") == (Segment(0, "ME", 4),)  # shortest unit among equals
    assert layer_segments("M*EM-E") == (Segment(0, "M*EM-E", 1),)  # nothing repeats
    assert layer_segments("E*EE*E")[0] == Segment(0, "*E", 4, 0, (False, True, False, True))
    assert [s.optional for s in layer_segments("MEMMEM")] == [None]  # an MoE is never optional
    for p in (
        nano,
        PATTERN,
        GAPPED,
        "M",
        "MM*MM*-",
        "ME*MEME*ME-",
        "E*EE*EEE*",
        "-*M-M*",
        "MEMMEM",
    ):
        segs = layer_segments(p)
        assert "".join(s.letters for s in segs) == p
        assert [s.start for s in segs] == list(np.cumsum([0] + [s.num_layers for s in segs[:-1]]))
        for s in segs:
            assert s.optional is None or s.unit[s.optional] != "E"
            assert [layer for layer, _, _ in s.layers()] == list(
                range(s.start, s.start + s.num_layers)
            )


def test_same_initial_parameters_and_hf_tensors():
    m0, m1 = _pair(_cfg())
    assert not hasattr(m1, "layers") and len(m1.segments) == 3
    up = m1.segments[0].blocks[1].mixer.up_EDF
    assert up.get_value().shape[0] == 2 and up.get_metadata()["axes"][0] == "layers"
    assert m1.segments[0].blocks[1].mixer.bias_E.get_metadata()["layer_ids"] == (1, 5)
    assert m1.segments[2].blocks[0].norm.weight.get_value().ndim == 1  # one repeat: unstacked
    _assert_same_tensors(_hf(m0), _hf(m1))
    g0, g1 = _pair(_cfg(GAPPED))
    attn, moe = g1.segments[0].blocks[1].mixer, g1.segments[0].blocks[2].mixer
    assert attn.q_DNH.get_value().shape[0] == 2  # the attention of copies 2 and 4
    assert moe.bias_E.get_metadata()["layer_ids"] == (1, 4, 6, 9)
    _assert_same_tensors(_hf(g0), _hf(g1))


def _run(model, ids, seg, r_BTV):
    """(logits, aux, gradients as a model) of mean(logits * r) + aux_loss, jitted."""
    graphdef, params, rest = nnx.split(model, nnx.Param, ...)

    def loss(p):
        logits, aux = nnx.merge(graphdef, p, rest)(ids, segment_ids=seg, return_aux=True)
        return jnp.mean(logits * r_BTV) + aux["aux_loss"], (logits, aux)

    (_, (logits, aux)), g = jax.jit(jax.value_and_grad(loss, has_aux=True))(params)
    return logits, aux, nnx.merge(graphdef, g, rest)


@pytest.mark.parametrize(
    "pattern,remat", [(PATTERN, "none"), (PATTERN, "block"), (GAPPED, "none"), (GAPPED, "block")]
)
def test_logits_gradients_and_moe_stats_match_unrolled(pattern, remat):
    cfg = _cfg(pattern, remat=remat)
    rng = np.random.default_rng(0)
    ids = jnp.asarray(rng.integers(0, cfg.vocab_size, (2, 12)))
    seg = jnp.asarray([[1] * 5 + [2] * 4 + [0] * 3, [1] * 12])  # packed row with padding
    r = jnp.asarray(rng.normal(size=(2, 12, cfg.vocab_size)), jnp.float32)
    m0, m1 = _pair(cfg)
    l0, a0, g0 = _run(m0, ids, seg, r)
    l1, a1, g1 = _run(m1, ids, seg, r)
    err = {"logits": float(jnp.max(jnp.abs(l0 - l1)))}
    np.testing.assert_allclose(l1, l0, **TOL)
    assert a0["expert_counts"].shape == (pattern.count("E"), cfg.n_routed_experts)
    np.testing.assert_array_equal(a1["expert_counts"], a0["expert_counts"])
    np.testing.assert_allclose(a1["aux_loss"], a0["aux_loss"], **TOL)
    err["aux_loss"] = abs(float(a0["aux_loss"]) - float(a1["aux_loss"]))
    h0, h1 = _hf(g0), _hf(g1)
    err["grads"] = max(float(np.max(np.abs(h0[k] - h1[k]))) for k in h0)
    print(f"scan vs unrolled, {pattern} remat={remat}: max abs errors {err}")
    _assert_same_tensors(h0, h1, **TOL)


@pytest.mark.parametrize("pattern", [PATTERN, GAPPED])
def test_cached_prefill_and_decode_match_unrolled(pattern):
    cfg = _cfg(pattern)
    rng = np.random.default_rng(1)
    prompt = jnp.asarray(rng.integers(1, cfg.vocab_size, (2, 7)))
    seg = jnp.asarray([[0, 0, 1, 1, 1, 1, 1], [1] * 7])  # left padding, as the rollout engine
    outs = []
    for model in _pair(cfg):
        graphdef, state = nnx.split(model)

        @jax.jit
        def step(st, ids, sg, cache, graphdef=graphdef):
            return nnx.merge(graphdef, st)(ids, segment_ids=sg, cache=cache)

        logits, cache = step(state, prompt, seg, model.init_cache(2, 12))
        steps = [logits[:, -1]]
        for _ in range(4):
            tok = jnp.argmax(steps[-1], axis=-1)[:, None]
            logits, cache = step(state, tok, jnp.ones((2, 1), jnp.int32), cache)
            steps.append(logits[:, -1])
        outs.append((jnp.stack(steps), cache))
    (s0, c0), (s1, c1) = outs
    print(f"cached prefill + decode: max abs logit error {float(jnp.max(jnp.abs(s0 - s1))):.2e}")
    np.testing.assert_allclose(s1, s0, **TOL)
    assert jax.tree.structure(c0) == jax.tree.structure(c1)  # a per-layer list in both
    for a, b in zip(jax.tree.leaves(c0), jax.tree.leaves(c1), strict=True):
        np.testing.assert_allclose(b, a, **TOL)


@pytest.mark.parametrize("pattern", [PATTERN, GAPPED])
def test_update_model_biases_on_stacked_biases_in_layer_order(pattern):
    cfg = _cfg(pattern)
    m0, m1 = _pair(cfg)
    n_moe, e = pattern.count("E"), cfg.n_routed_experts
    # layer l: expert l % E is hot, expert (l + 3) % E cold: every row is different
    rows = jnp.arange(n_moe)
    counts = jnp.full((n_moe, e), 5.0).at[rows, rows % e].set(20.0).at[rows, (rows + 3) % e].set(0)
    for model in (m0, m1):
        _, _, rest = nnx.split(model, nnx.Param, ...)
        new = jax.jit(lambda st, c: bal.update_model_biases(st, c, 0.25))(rest, counts)
        nnx.update(model, new)
    h0, h1 = _hf(m0), _hf(m1)
    keys = [k for k in h0 if k.endswith("e_score_correction_bias")]
    assert len(keys) == n_moe
    for i, k in enumerate(keys):  # keys are in layer order
        want = np.full(e, 0.25)
        want[i % e], want[(i + 3) % e] = -0.25, 0.25
        np.testing.assert_array_equal(h0[k], want, err_msg=k)
        np.testing.assert_array_equal(h1[k], want, err_msg=k)
    with pytest.raises(ValueError, match="ExpertBias rows"):
        bal.update_model_biases(nnx.split(m1, nnx.Param, ...)[2], counts[:-1])


class _Stacked(nnx.Module):
    """Without `layer_ids`: a stacked [R, E] bias takes R consecutive rows in path order."""

    def __init__(self, e):
        self.layers = nnx.List(
            [
                nnx.Dict(bias_E=ExpertBias(jnp.zeros((3, e)))),
                nnx.Dict(bias_E=ExpertBias(jnp.zeros((e,)))),
            ]
        )


def test_update_model_biases_stacked_without_layer_ids():
    e = 4
    model = _Stacked(e)
    counts = jnp.zeros((4, e)).at[jnp.arange(4), jnp.arange(4)].set(10.0)
    _, rest = nnx.split(model, ExpertBias)
    nnx.update(model, bal.update_model_biases(rest, counts, rate=1.0))
    want = np.ones((4, e)) - 2 * np.eye(4)
    np.testing.assert_array_equal(model.layers[0]["bias_E"][...], want[:3])
    np.testing.assert_array_equal(model.layers[1]["bias_E"][...], want[3])


@functools.partial(jax.jit, static_argnums=0)
def _forward(graphdef, state, ids):
    return nnx.merge(graphdef, state)(ids)


def _logits(model, ids):
    return _forward(*nnx.split(model), ids)


@pytest.mark.parametrize("pattern", [PATTERN, GAPPED])
def test_hf_checkpoint_between_layouts(tmp_path, pattern):
    cfg = _cfg(pattern, moe_aux_loss_coef=0.0)  # not a config.json field
    ids = jnp.asarray(np.random.default_rng(2).integers(0, cfg.vocab_size, (2, 9)))
    scanned = NemotronH(cfg.replace(scan_layers=True), rngs=nnx.Rngs(3))
    unrolled = NemotronH(cfg, rngs=nnx.Rngs(4))
    save_hf_checkpoint(scanned, tmp_path / "scanned", max_shard_bytes=100_000)
    save_hf_checkpoint(unrolled, tmp_path / "unrolled")
    into_unrolled = load_hf_checkpoint(tmp_path / "scanned")
    into_scanned = load_hf_checkpoint(tmp_path / "unrolled", scan_layers=True)
    assert not into_unrolled.cfg.scan_layers and into_scanned.cfg.scan_layers
    _assert_same_tensors(_hf(into_unrolled), _hf(scanned))
    _assert_same_tensors(_hf(into_scanned), _hf(unrolled))
    np.testing.assert_allclose(_logits(into_unrolled, ids), _logits(scanned, ids), **TOL)
    np.testing.assert_allclose(_logits(into_scanned, ids), _logits(unrolled, ids), **TOL)


@pytest.mark.parametrize("pattern", [PATTERN, GAPPED])
def test_transformers_checkpoint_into_scanned_model(tmp_path, pattern):
    """The transformers parity of test_hf_parity (same tolerance) for a scanned model."""
    from tests.model.hf_reference import hf_logits, hf_model
    from tests.model.test_hf_parity import ATOL

    cfg = ModelConfig.tiny(pattern=pattern, chunk_size=4, dt_floor_like_hf=True)
    ref = hf_model(cfg, seed=1)
    ref.save_pretrained(tmp_path)
    ours = load_hf_checkpoint(tmp_path, dt_floor_like_hf=True, scan_layers=True)
    ids = np.random.default_rng(0).integers(0, cfg.vocab_size, (2, 11))
    diff = np.max(np.abs(np.asarray(ours(ids)) - hf_logits(ref, ids)))
    print(f"scanned vs transformers: max |logit diff| = {diff:.2e}")
    assert diff <= ATOL


def test_param_counts_shardings_and_bytes_per_device():
    for cfg in (_cfg(), _cfg(GAPPED), ModelConfig.small(), ModelConfig.nano_30b_a3b()):
        assert count_params(cfg.replace(scan_layers=True)) == count_params(cfg)
    m0, m1 = _pair(_cfg())
    mesh = AbstractMesh(MeshConfig(data=1, fsdp=2, expert=4).shape(8), MESH_AXES)
    specs = state_specs(nnx.state(m1), mesh=mesh)
    assert specs["segments"][0]["blocks"][1]["mixer"]["up_EDF"] == P(None, "expert", "fsdp", None)
    assert specs["segments"][2]["blocks"][0]["norm"]["weight"] == P("fsdp")
    for what in (nnx.Param, ExpertBias):
        assert bytes_per_device(nnx.state(m1, what), mesh) == bytes_per_device(
            nnx.state(m0, what), mesh
        )
