"""The generation (rollout) engine: cached prefill + `lax.while_loop` decode with temperature,
top-k and top-p, static or with continuous batching (`generate(..., slots=S)`).
`from nemocascade.generate import generate` is the public entry point; `slots` holds the slot-cache
operations (insert, take, per-row-position forward, `extend` for multi-turn continuation)."""

from nemocascade.generate import slots
from nemocascade.generate.continuous import CHUNK_STEPS
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
    "CHUNK_STEPS",
    "GenerateResult",
    "SamplingMode",
    "bucket",
    "compiled_program_counts",
    "generate",
    "precompile",
    "sample_step",
    "sampling_logits",
    "slots",
    "top_k_mask",
    "top_p_mask",
]
