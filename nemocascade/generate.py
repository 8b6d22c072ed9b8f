"""`nemocascade.generate.generate`: the public entry point of the rollout engine.

See `nemocascade.rollout.engine` for the design (ragged prefill, bucketing, n samples per prompt,
sharding) and `nemocascade.rollout.sampling` for the sampling transforms.
"""

from nemocascade.rollout import (
    GenerateResult,
    SamplingMode,
    bucket,
    compiled_program_counts,
    generate,
    precompile,
)

__all__ = [
    "GenerateResult",
    "SamplingMode",
    "bucket",
    "compiled_program_counts",
    "generate",
    "precompile",
]
