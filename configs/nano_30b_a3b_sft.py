"""Cascade-2 SFT of Nemotron-3-Nano-30B-A3B (paper Table 7), for a 64-accelerator slice.

    python -m nemocascade.launch --config=configs/nano_30b_a3b_sft.py --workdir=DIR \\
        --config.data.path=sft.jsonl --config.data.tokenizer=tokenizer.json --distributed

Recipe (shared/reference/cascade2_algorithms.md, "SFT"): samples packed into rows of up to
256K tokens, global batch 64 rows, AdamW beta1 0.9 / beta2 0.98, weight decay 0.1, lr 5e-5 -> 5e-6
cosine with 200 warmup steps, max 40,000 steps (the cosine horizon); the paper's best model came
after 33,000 steps (about 1.5 epochs), which is where this run stops. Master weights and Adam
moments are fp32, compute is bf16, every block is rematerialised.

Mesh: 64 devices = fsdp 8 x expert 8 (one 256K-token row per device). `tests/test_configs.py`
builds the sharded train state abstractly on that mesh and reports the bytes per device.
"""

import dataclasses

from ml_collections import ConfigDict

from nemocascade.model import ModelConfig

NUM_DEVICES = 64  # the slice the mesh below is laid out for


def get_config(arg: str = "") -> ConfigDict:
    """No variants: `arg` must be empty."""
    if arg:
        raise ValueError(f"nano_30b_a3b_sft takes no arg, got {arg!r}")
    c = ConfigDict()
    c.job = "sft"
    c.seed = 0
    c.model = dataclasses.asdict(
        ModelConfig.nano_30b_a3b(
            param_dtype="float32", compute_dtype="bfloat16", remat="block", moe_backend="ragged_dot"
        )
    )
    c.data = dict(
        source="jsonl",
        path="",
        num_records=0,
        eval_records=0,
        tokenizer="",
        vocab_size=0,
        seq_len=262144,
        global_batch=64,
        thinking=True,
        non_thinking_fraction=0.0,
        overlong="split",
        shard_by="process",
    )
    c.optim = dict(
        lr=5e-5,
        min_lr=5e-6,
        warmup_steps=200,
        decay_steps=40000,
        b1=0.9,
        b2=0.98,
        eps=1e-8,
        weight_decay=0.1,
        clip_norm=1.0,
        grad_accum_steps=1,
        moe_bias_rate=1e-3,
    )
    c.train = dict(
        steps=33000,
        checkpoint_every=500,
        keep_checkpoints=3,
        best_metric="loss",
        best_mode="min",
        eval_every=0,
        max_consecutive_skips=10,
        progress=True,
        async_checkpoint=True,
    )
    c.mesh = dict(data=1, fsdp=8, expert=8, tensor=1)
    c.loss_chunk_size = 4096  # never hold [256K, 131K] fp32 logits
    c.export_hf = True
    return c
