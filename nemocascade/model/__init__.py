"""The NemotronH (Nemotron-3-Nano) hybrid Mamba-2 / attention / MoE model in Flax NNX."""

from nemocascade.model.config import ModelConfig
from nemocascade.model.hf_io import CheckpointError, load_hf_checkpoint, save_hf_checkpoint
from nemocascade.model.nemotron_h import NemotronH

__all__ = [
    "CheckpointError",
    "ModelConfig",
    "NemotronH",
    "load_hf_checkpoint",
    "save_hf_checkpoint",
]
