"""Context parallelism (`model/context_parallel.py`): the whole NemotronH with its sequences
sharded over the mesh's `context` axis gives the logits and gradients of one device (fp32, 1e-5),
for context 2, 4 and 8, combined with data and expert parallelism, with packed rows whose
segments cross the slice borders, and through the layer scan with remat."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from nemocascade import sharding
from nemocascade.model import context_parallel as cp
from nemocascade.model.attention import (
    attention_weights_mask,
    context_parallel_attention,
    gqa_attention,
)
from nemocascade.model.config import ModelConfig
from nemocascade.model.mamba2 import causal_conv
from nemocascade.model.nemotron_h import NemotronH

TOL = dict(rtol=1e-5, atol=1e-5)
B, T = 2, 64


def _segments(packed: bool) -> np.ndarray:
    """[B, T] segment ids: one document per row, or packed documents of lengths that cross
    every slice border of 2, 4 and 8 slices, then padding (0)."""
    if not packed:
        return np.ones((B, T), np.int32)
    seg = np.zeros((B, T), np.int32)
    for row, lengths in enumerate(([5, 20, 3, 17, 11], [31, 2, 9, 14])):
        pos = 0
        for s, n in enumerate(lengths, start=1):
            seg[row, pos : pos + n] = s
            pos += n
    return seg


def _run(cfg, mesh, ids, seg, r):
    model = NemotronH(cfg, rngs=nnx.Rngs(0), mesh=mesh)
    graphdef, params, rest = nnx.split(model, nnx.Param, ...)

    def loss(p, ids, seg):
        logits = nnx.merge(graphdef, p, rest)(ids, seg)
        return jnp.mean(logits * r), logits

    if mesh is not None:
        spec = NamedSharding(mesh, sharding.logical_to_spec(("batch", "seq"), mesh=mesh))
        ids, seg = jax.device_put(ids, spec), jax.device_put(seg, spec)
        params = jax.device_put(params, sharding.state_shardings(params, mesh))
    (_, logits), g = jax.jit(jax.value_and_grad(loss, has_aux=True))(params, ids, seg)
    return np.asarray(logits), g


def _check(cfg, mesh_cfgs, packed):
    """Every mesh of `mesh_cfgs` against one device (computed once)."""
    ids = jax.random.randint(jax.random.key(0), (B, T), 0, cfg.vocab_size)
    r = jax.random.normal(jax.random.key(1), (B, T, cfg.vocab_size))
    seg = jnp.asarray(_segments(packed))
    logits_ref, g_ref = _run(cfg, None, ids, seg, r)
    for mesh_cfg in mesh_cfgs:
        logits, g = _run(cfg, sharding.make_mesh(mesh_cfg), ids, seg, r)
        np.testing.assert_allclose(logits, logits_ref, **TOL, err_msg=str(mesh_cfg))
        for (path, a), b in zip(
            jax.tree_util.tree_leaves_with_path(g), jax.tree.leaves(g_ref), strict=True
        ):
            np.testing.assert_allclose(
                a, b, **TOL, err_msg=f"{mesh_cfg} {jax.tree_util.keystr(path)}"
            )


@pytest.mark.parametrize("packed", [False, True], ids=["one_doc", "packed"])
def test_model_with_context_axis_matches_one_device(packed):
    """Context 2, 4 and 8: Mamba-2 (conv halo, SSD state carried across slices), attention
    (blockwise with its query offset) and the MoE on the local slices; chunk 8 so each slice
    holds several chunks."""
    cfg = ModelConfig.tiny(
        pattern="M*EM",
        attention_impl="blockwise",
        attention_block_q=8,
        attention_block_k=8,
        moe_backend="sorted",
        n_group=1,
    )
    _check(cfg, [dict(data=min(B, 8 // c), context=c) for c in (2, 4, 8)], packed)


def test_context_with_expert_parallel_scan_and_naive_attention():
    """context 4 x expert 2 (the MoE exchanges each device's own (row, slice) tokens), the
    layers as a scanned body with block remat, the naive attention path."""
    cfg = ModelConfig.tiny(
        pattern="MEM*E" * 2,
        attention_impl="naive",
        moe_backend="sorted",
        n_group=1,
        scan_layers=True,
        remat="block",
    )
    _check(cfg, [dict(data=1, expert=2, context=4)], packed=True)


def test_halo_and_state_fold_pieces():
    """The conv halo gives each slice the previous slice's last inputs (segment -1 on the first
    device), so the sliced conv equals the whole one; the attention pieces equal the naive
    single-device attention."""
    mesh = sharding.make_mesh(dict(data=1, context=4))
    x = jax.random.normal(jax.random.key(0), (B, T, 6))
    w = jax.random.normal(jax.random.key(1), (4, 6))
    b = jax.random.normal(jax.random.key(2), (6,))
    seg = jnp.asarray(_segments(True))
    spec = P(None, "context")

    def local(x, seg):
        prev, prev_seg = cp.halo(x, seg, 3)
        return causal_conv(x, w, b, seg, prev, prev_seg)

    out = jax.shard_map(local, mesh=mesh, in_specs=(spec, spec), out_specs=spec)(x, seg)
    np.testing.assert_allclose(out, causal_conv(x, w, b, seg), **TOL)

    q = jax.random.normal(jax.random.key(3), (B, T, 4, 8))
    k = jax.random.normal(jax.random.key(4), (B, T, 2, 8))
    v = jax.random.normal(jax.random.key(5), (B, T, 2, 8))
    pos = jnp.arange(T)
    ref = gqa_attention(q, k, v, attention_weights_mask(seg, seg, pos, pos))
    for impl in ("naive", "blockwise"):
        o = context_parallel_attention(q, k, v, seg, mesh, impl=impl, block_q=8, block_k=8)
        np.testing.assert_allclose(o, ref, **TOL, err_msg=impl)


def test_lengths_that_do_not_split_are_refused():
    cfg = ModelConfig.tiny(pattern="M", n_group=1)
    mesh = sharding.make_mesh(dict(data=1, context=8))
    model = NemotronH(cfg, rngs=nnx.Rngs(0), mesh=mesh)
    with pytest.raises(ValueError, match="sequence length 12 must split into 8 slices"):
        model(jnp.zeros((1, 12), jnp.int32))
    assert sharding.MeshConfig(data=2, context=4).shape(8) == (2, 1, 1, 4, 1)
