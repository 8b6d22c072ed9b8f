"""The params tool's per-device memory plan on the full-size config (abstract shapes only)."""

import json

import numpy as np
import pytest

from nemocascade.model import ModelConfig
from nemocascade.tools import params as params_tool
from nemocascade.tools.params import activation_estimate, memory_plan, parse_mesh

NANO = ModelConfig.nano_30b_a3b()


def _expert_bytes(cfg: ModelConfig) -> int:
    itemsize = 2 if cfg.param_dtype == "bfloat16" else 4
    n_moe = cfg.block_types.count("moe")
    return n_moe * cfg.n_routed_experts * 2 * cfg.hidden_size * cfg.moe_intermediate_size * itemsize


def _replicated_bytes(cfg: ModelConfig) -> int:
    """Mamba params with no fsdp/expert axis (tensor-only or unnamed axes): conv weight and bias,
    the gated-norm weight (param dtype), A_log, D, dt_bias (fp32)."""
    itemsize = 2 if cfg.param_dtype == "bfloat16" else 4
    per_layer = (
        (cfg.conv_kernel + 1) * cfg.conv_dim + cfg.mamba_inner
    ) * itemsize + 3 * cfg.mamba_num_heads * 4
    return cfg.block_types.count("mamba") * per_layer


def test_fsdp_only_splits_every_parameter():
    plan = memory_plan(NANO, parse_mesh("fsdp=8"), batch=8, seq=128)
    per = plan["per_device_bytes"]
    total, rep = plan["params_total_bytes"], _replicated_bytes(NANO)
    np.testing.assert_allclose(total, 31_577_940_288 * 2, rtol=1e-3)  # bf16 (router fp32)
    np.testing.assert_allclose(per["params"], rep + (total - rep) / 8, rtol=1e-6)
    assert per["grads"] == per["params"]
    np.testing.assert_allclose(per["optimizer"], 2 * per["params"], rtol=1e-3)  # AdamW mu, nu


def test_expert_and_fsdp_axes():
    plan = memory_plan(NANO, parse_mesh("fsdp=16,expert=8"), batch=128, seq=128)
    total, experts, rep = plan["params_total_bytes"], _expert_bytes(NANO), _replicated_bytes(NANO)
    # experts over expert x fsdp, Mamba's small tensors replicated, the rest over fsdp
    want = experts / 128 + rep + (total - experts - rep) / 16
    np.testing.assert_allclose(plan["per_device_bytes"]["params"], want, rtol=1e-6)
    assert plan["devices"] == 128 and plan["tokens_per_device"] == 128


def test_fits_flips_with_hbm_size():
    kw = {"batch": 16, "seq": 1024, "remat": "block"}
    need = memory_plan(NANO, parse_mesh("expert=8"), **kw)["per_device_bytes"]["total"]
    assert memory_plan(NANO, parse_mesh("expert=8"), hbm_gb=1.01 * need / 1e9, **kw)["fits"]
    assert not memory_plan(NANO, parse_mesh("expert=8"), hbm_gb=0.99 * need / 1e9, **kw)["fits"]


def test_remat_orders_activation_estimates():
    est = {
        r: activation_estimate(NANO, 4096, 4096, r)["total"] for r in ("none", "matmuls", "block")
    }
    assert est["none"] > est["matmuls"] > est["block"] > 0
    chunked = activation_estimate(NANO, 4096, 4096, "block", loss_chunk=1024)["loss"]
    assert chunked < activation_estimate(NANO, 4096, 4096, "block")["loss"]


def test_context_axis_splits_each_sequence():
    """context=4 holds a quarter of each row's positions (activations and loss), adds the keys
    and values an attention layer gathers over the axis, and splits no parameter."""
    flash = ModelConfig.nano_30b_a3b(attention_impl="blockwise", attention_block_k=512)
    kw = {"batch": 8, "seq": 65536, "remat": "block", "loss_chunk": 2048}
    one = memory_plan(flash, parse_mesh("fsdp=2,expert=4"), **kw)
    four = memory_plan(flash, parse_mesh("fsdp=2,expert=4,context=4"), **kw)
    assert four["tokens_per_device"] * 4 == one["tokens_per_device"] == 65536
    a, b = one["per_device_bytes"], four["per_device_bytes"]
    assert b["params"] == a["params"] and b["optimizer"] == a["optimizer"]
    np.testing.assert_allclose(b["activations_blocks"], a["activations_blocks"] / 4, rtol=1e-9)
    kv = 2 * flash.num_key_value_heads * flash.head_dim * 2  # k and v, bf16
    assert a["context_gather"] == 0 and b["context_gather"] == 2 * 1 * 65536 * kv
    with pytest.raises(ValueError, match="context axis 3"):
        memory_plan(flash, parse_mesh("fsdp=2,expert=4,context=3"), **kw)


def test_bad_input_is_named():
    with pytest.raises(ValueError, match="pipeline=2"):
        parse_mesh("fsdp=2,pipeline=2")
    with pytest.raises(ValueError, match="not divisible"):
        memory_plan(NANO, parse_mesh("fsdp=16"), batch=8, seq=128)


def test_cli_prints_plan(capsys):
    argv = [
        "params",
        "--model=nano_30b_a3b",
        "--mesh=fsdp=16,expert=8",
        "--batch=128",
        "--seq=1024",
        "--remat=block",
        "--hbm_gb=95",
    ]
    try:
        params_tool.FLAGS(argv)
        params_tool.main([])
    finally:
        params_tool.FLAGS.unparse_flags()
    report = json.loads(capsys.readouterr().out)
    assert report["total_params"] == 31_577_940_288
    plan = report["plan"]
    assert plan["hbm_gb"] == 95 and isinstance(plan["fits"], bool)
    assert set(plan["per_device_bytes"]) >= {"params", "grads", "optimizer", "activations", "total"}
