"""The generation (rollout) engine: cached prefill + `lax.while_loop` decode with temperature,
top-k and top-p. `from nemocascade.generate import generate` is the public entry point."""

from nemocascade.generate.engine import (
    GenerateResult,
    bucket,
    compiled_program_counts,
    generate,
    precompile,
)
from nemocascade.generate.sampling import (
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
