"""Shared fixtures: one random Hugging Face NemotronH and the same weights in our model.

All generate tests use this one model (one graphdef), so they share compiled programs.
`time_step_min=1e-6`: transformers floors dt at `time_step_min` in its chunked prefill but not in
its single-token decode; with dt_bias in [-4, 0] softplus(dt) stays far above 1e-6, so the floor
never acts and both libraries compute the same SSM in prefill and decode.
"""

import pytest

from nemocascade.model import ModelConfig, load_hf_checkpoint
from tests.model.hf_reference import hf_model

CFG = ModelConfig.tiny(dt_floor_like_hf=True, time_step_min=1e-6, chunk_size=8)


@pytest.fixture(scope="session")
def models(tmp_path_factory):
    """(transformers model, our model) with identical weights (all block types: M * E -)."""
    ref = hf_model(CFG, seed=7)
    path = tmp_path_factory.mktemp("hf_tiny")
    ref.save_pretrained(path)
    return ref, load_hf_checkpoint(path)


# Ragged prompts: lengths 3, 11 and 21 (prompt bucket 32, several SSD chunks, left padding).
PROMPTS = [
    [5, 17, 33],
    [9, 8, 7, 6, 5, 4, 3, 250, 1, 77, 12],
    [(13 * i + 3) % 256 for i in range(21)],
]
