"""Launchable jobs: the registry (`register_job`, `get_job`), the `sft` job and the `cascade` job
(ordered stages, per-domain evaluation, teacher registry, resume, report).

    registry    name -> fn(config, workdir) -> final metrics
    sft         the one SFT stage builder and the `sft` job
    stages      the stage kinds of a cascade and their typed configs
    evaluation  held-out evaluation per domain (also the cascade's per-stage evaluation)
    cascade     the `cascade` job
    report      summary -> report.md and scores.png
"""

from nemocascade.jobs.registry import get_identity, get_job, get_preflight, register_job

__all__ = ["get_identity", "get_job", "get_preflight", "register_job"]
