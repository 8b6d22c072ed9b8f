"""A cascade's reward-model stage: Bradley-Terry training on a domain's preference pairs, the
held-out pair accuracy, and the exported model an RLHF stage loads (`stage:<name>`)."""

from __future__ import annotations

import os

from nemocascade.data.preferences import pair_batch, preference_dataset, tokenize_pairs
from nemocascade.jobs.stages import RewardModelStageConfig
from nemocascade.model.reward_head import export_reward_model
from nemocascade.train.loop import LoopConfig, LoopResult
from nemocascade.train.reward_model import (
    PairEvalSet,
    final_reward_model,
    reward_model_graphdef,
    reward_weights_from_policy,
    run_reward_model_stage,
)

EXPORT_DIR = "reward_model"  # <stage dir>/reward_model: what `stage:<name>` resolves to


def run_reward_stage(
    *,
    name: str,
    cfg: RewardModelStageConfig,
    stage_dir: str,
    pairs: list[dict],
    tokenizer,
    model_cfg,
    policy_graphdef,
    params,
    model_state,
    mesh,
    seed: int,
    progress: bool,
) -> tuple[LoopResult, dict[str, float]]:
    """Trains and exports the reward model; returns the loop's result and the held-out pair
    metrics of the final model (eval_accuracy, eval_margin, ...)."""
    if len(pairs) <= cfg.eval_pairs:
        raise ValueError(
            f"stages.{name}.eval_pairs={cfg.eval_pairs} leaves no training pairs of {len(pairs)}"
        )
    train, held_out = pairs[: -cfg.eval_pairs], pairs[-cfg.eval_pairs :]
    kw = dict(seq_len=cfg.seq_len, thinking=cfg.thinking, strip_reasoning=cfg.strip_reasoning)
    tok_train, _ = tokenize_pairs(train, tokenizer, source=f"stages.{name} pairs", **kw)
    tok_eval, _ = tokenize_pairs(held_out, tokenizer, source=f"stages.{name} eval pairs", **kw)
    batches = preference_dataset(
        tok_train,
        batch_size=cfg.batch_size,
        seq_len=cfg.seq_len,
        pad_id=tokenizer.pad_id,
        seed=seed,
    )
    eval_batches = [
        pair_batch(
            tok_eval[i : i + cfg.batch_size],
            seq_len=cfg.seq_len,
            num_pairs=cfg.batch_size,
            pad_id=tokenizer.pad_id,
        )
        for i in range(0, len(tok_eval), cfg.batch_size)
    ]
    graphdef = reward_model_graphdef(model_cfg, mesh)
    loop = LoopConfig(
        steps=cfg.steps,
        checkpoint_every=min(cfg.checkpoint_every, cfg.steps),
        keep_checkpoints=1,
        best_metric="",
        eval_every=min(cfg.checkpoint_every, cfg.steps),
        progress=progress,
        async_checkpoint=False,
    )
    result = run_reward_model_stage(
        workdir=stage_dir,
        mesh=mesh,
        model_cfg=model_cfg,
        graphdef=graphdef,
        weights=reward_weights_from_policy(policy_graphdef, params, model_state, seed=seed),
        train_batches=iter(batches),
        eval_batches=eval_batches,
        optim=cfg.optim,
        loop=loop,
        seed=seed,
        name=name,
    )
    if result.preempted:
        return result, {}
    model = final_reward_model(stage_dir, model_cfg, mesh)
    metrics = PairEvalSet(eval_batches, graphdef, mesh).evaluate(model)
    export_reward_model(
        model,
        os.path.join(stage_dir, EXPORT_DIR),
        tokenizer=tokenizer,
        metadata={"stage": name, **metrics},
    )
    return result, metrics
