"""Helpers that build random Hugging Face `NemotronHForCausalLM` reference models (torch, CPU)."""

from __future__ import annotations

import numpy as np
import torch
import transformers

from nemocascade.model import ModelConfig


def hf_model(cfg: ModelConfig, seed: int = 0, scale: float = 0.2):
    """A transformers NemotronH with eager attention/experts and random, non-trivial weights."""
    hf_cfg = transformers.NemotronHConfig(
        **{
            k: v
            for k, v in cfg.to_hf_config().items()
            if k
            not in ("architectures", "model_type", "hybrid_override_pattern", "num_hidden_layers")
        }
    )
    torch.manual_seed(seed)
    model = transformers.NemotronHForCausalLM._from_config(
        hf_cfg, attn_implementation="eager", experts_implementation="eager", dtype=torch.float32
    )
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("A_log"):
                p.copy_(torch.log(torch.rand(p.shape, generator=gen) * 8 + 0.5))
            elif name.endswith("dt_bias"):
                p.copy_(torch.rand(p.shape, generator=gen) * 4 - 4)  # softplus in ~[0.02, 0.7]
            elif name.endswith(("norm.weight", "norm_f.weight")):
                p.copy_(1 + 0.1 * torch.randn(p.shape, generator=gen))
            else:
                p.copy_(scale * torch.randn(p.shape, generator=gen))
        for name, b in model.named_buffers():
            if name.endswith("e_score_correction_bias"):
                b.copy_(0.3 * torch.randn(b.shape, generator=gen))
    model.eval()
    return model


def hf_logits(model, ids: np.ndarray) -> np.ndarray:
    with torch.no_grad():
        return model(torch.as_tensor(ids, dtype=torch.long)).logits.float().numpy()
