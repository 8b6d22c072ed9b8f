"""Parity with Hugging Face transformers' NemotronHForCausalLM (fp32, eager):
max |logit diff| <= 1e-4."""

import numpy as np
import pytest
import torch
import transformers

from nemocascade.model import ModelConfig, load_hf_checkpoint, save_hf_checkpoint
from tests.model.hf_reference import hf_logits, hf_model

ATOL = 1e-4  # fp32 logits, fixed up front

CASES = {
    # every block type, n_group > 1 with topk_group 1, T above and not a multiple of the chunk
    "all_blocks_grouped": (ModelConfig.tiny(dt_floor_like_hf=True), 2, 19),
    # several chunks, topk_group 2 of 4 groups, top-3
    "groups_4_keep_2": (
        ModelConfig.tiny(
            pattern="ME*MEM",
            n_routed_experts=16,
            n_group=4,
            topk_group=2,
            num_experts_per_tok=3,
            chunk_size=4,
            dt_floor_like_hf=True,
        ),
        3,
        13,
    ),
    # GQA 8:1, Mamba with one group, tiny chunk, no MoE renormalisation
    "gqa8_one_group": (
        ModelConfig.tiny(
            pattern="M*-*EM",
            num_attention_heads=8,
            num_key_value_heads=1,
            n_groups=1,
            chunk_size=5,
            n_group=1,
            norm_topk_prob=False,
            dt_floor_like_hf=True,
        ),
        2,
        17,
    ),
}


def _ids(cfg, b, t, seed=0):
    return np.random.default_rng(seed).integers(0, cfg.vocab_size, (b, t))


@pytest.mark.parametrize("name", sorted(CASES))
def test_load_transformers_checkpoint_matches(name, tmp_path):
    cfg, b, t = CASES[name]
    ref = hf_model(cfg, seed=1)
    ref.save_pretrained(tmp_path)
    ours = load_hf_checkpoint(tmp_path, dt_floor_like_hf=True)
    ids = _ids(cfg, b, t)
    diff = np.max(np.abs(np.asarray(ours(ids)) - hf_logits(ref, ids)))
    print(f"{name}: max |logit diff| = {diff:.2e}")
    assert diff <= ATOL


def test_save_roundtrip_through_transformers(tmp_path):
    cfg, b, t = CASES["all_blocks_grouped"]
    ref = hf_model(cfg, seed=2)
    ref.save_pretrained(tmp_path / "hf")
    ours = load_hf_checkpoint(tmp_path / "hf", dt_floor_like_hf=True)
    save_hf_checkpoint(ours, tmp_path / "ours", max_shard_bytes=200_000)  # forces several shards
    assert (tmp_path / "ours" / "model.safetensors.index.json").exists()
    back = transformers.AutoModelForCausalLM.from_pretrained(
        tmp_path / "ours",
        attn_implementation="eager",
        experts_implementation="eager",
        dtype=torch.float32,
    )
    ids = _ids(cfg, b, t, seed=3)
    diff = np.max(np.abs(hf_logits(back, ids) - hf_logits(ref, ids)))
    print(f"roundtrip: max |logit diff| = {diff:.2e}")
    assert diff <= ATOL
    again = load_hf_checkpoint(tmp_path / "ours", dt_floor_like_hf=True)
    assert np.max(np.abs(np.asarray(again(ids)) - np.asarray(ours(ids)))) == 0.0


def test_in_memory_layout_with_stacked_experts(tmp_path):
    """transformers' in-memory names (`model.*`, stacked experts) load too."""
    from safetensors.torch import save_file

    cfg, b, t = CASES["all_blocks_grouped"]
    ref = hf_model(cfg, seed=4)
    state = {k: v.contiguous() for k, v in ref.state_dict().items()}
    assert any(k.startswith("model.") and k.endswith("experts.up_proj") for k in state)
    save_file(state, str(tmp_path / "model.safetensors"))
    (tmp_path / "config.json").write_text(ref.config.to_json_string())
    ours = load_hf_checkpoint(tmp_path, dt_floor_like_hf=True)
    ids = _ids(cfg, b, t, seed=5)
    assert np.max(np.abs(np.asarray(ours(ids)) - hf_logits(ref, ids))) <= ATOL
