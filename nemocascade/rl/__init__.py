"""What an RL stage does per step: rollouts (sample, score, pack), advantage estimators, batch
assembly, and the stage itself as a batch source for the one train loop.

    rollouts    sample n responses per prompt, score them (verifiers), pack training rows
    advantages  GRPO baselines (group mean/std, leave-one-out) and filtering, in a registry
    batching    prompt draws, the dynamic-filtering refill, fixed-shape batch assembly
    config      RLStageConfig, the typed `stages.<name>` section of a GRPO / MOPD stage, and its
                optional environment (EnvStageConfig: an agentic, multi-turn GRPO stage)
    agentic     an agentic stage's rollouts: episodes per record, kept groups, episode metrics,
                and the held-out evaluation of an agentic domain by episodes
    stage       RLStage: the stage's batch source and step for `train.loop.train_loop`
"""

from nemocascade.rl.config import RLStageConfig
from nemocascade.rl.stage import RLStage

__all__ = ["RLStage", "RLStageConfig"]
