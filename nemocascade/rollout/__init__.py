"""Rollout engine: cached prefill + `lax.while_loop` decode with temperature / top-k / top-p."""

from nemocascade.rollout.engine import (
    GenerateResult,
    bucket,
    compiled_program_counts,
    generate,
    precompile,
)
from nemocascade.rollout.sampling import (
    SamplingMode,
    sample_step,
    sampling_logits,
    top_k_mask,
    top_p_mask,
)

__all__ = [
    "GenerateResult",
    "SamplingMode",
    "bucket",
    "compiled_program_counts",
    "generate",
    "precompile",
    "sample_step",
    "sampling_logits",
    "top_k_mask",
    "top_p_mask",
]
