"""Shared fixtures of the RL tests."""

import pytest


@pytest.fixture
def grpo_stage_section() -> dict:
    """The smallest valid `stages.<name>` mapping of a GRPO stage (defaults elsewhere)."""
    return dict(
        type="grpo",
        domains=("swe",),
        steps=1,
        prompts_per_step=1,
        samples_per_prompt=2,
        max_new_tokens=8,
        temperature=1.0,
        top_p=1.0,
        thinking=False,
        loss={},
        optim={},
    )
