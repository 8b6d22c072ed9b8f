"""benchmarks/decode_profile.py: the bytes a decode step must read, block type by block type."""

import jax
import pytest
from flax import nnx

from nemocascade.model import ModelConfig, NemotronH


@pytest.fixture(scope="module")
def profile(load_benchmark):
    return load_benchmark("decode_profile")


def _bytes(tree) -> int:
    return sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(tree))


def test_bytes_per_step_counts_weights_states_and_touched_experts(profile):
    cfg = ModelConfig.tiny(pattern="M*E", moe_backend="sorted")
    model = NemotronH(cfg, rngs=nnx.Rngs(0))
    blocks = {profile.KIND[b.kind]: b for _, b in model.layer_blocks()}
    e, k = cfg.n_routed_experts, cfg.num_experts_per_tok
    moe = blocks["E"].mixer
    routed = _bytes((moe.up_EDF[...], moe.down_EFD[...]))
    moe_all = _bytes(nnx.state(blocks["E"], nnx.Param))

    one = profile.bytes_per_step(model, 1)
    # one row touches its k experts: every other routed expert is not read
    assert one["E"] == pytest.approx(moe_all - routed + routed * k / e)
    # a large batch touches every expert, never more
    assert profile.bytes_per_step(model, 10_000)["E"] == pytest.approx(moe_all)
    # Mamba: its weights plus its conv and SSM states, read and written, per row
    m_params = _bytes(nnx.state(blocks["M"], nnx.Param))
    two = profile.bytes_per_step(model, 2)
    assert one["M"] > m_params and two["M"] - m_params == pytest.approx(2 * (one["M"] - m_params))
    # attention: its weights plus the KV cache up to the mean position, per row
    a_params = _bytes(nnx.state(blocks["*"], nnx.Param))
    assert two["*"] - a_params == pytest.approx(2 * (one["*"] - a_params))
    head = model.lm_head_weight()
    assert one["head"] >= head.size * head.dtype.itemsize
