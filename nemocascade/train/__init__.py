"""Training machinery. Submodules (imported on demand, none here, so that light users such as
the launcher do not pull in the model):

    state       TrainState pytree, create_train_state, merge_model
    optim       AdamW + decay mask, warmup/cosine schedule, clipping, gradient accumulation
    sft         token-level SFT loss and the pure train step
    loop        the sharded train loop (resume, one-step-late metrics, NaN skips, SIGTERM)
    checkpoint  orbax checkpoints (async, last N + best, corrupt ones skipped)
    metrics     metrics.jsonl + TensorBoard, process 0 only
    jobs        registry of launchable jobs (`register_job`); sft_job registers "sft"
"""
