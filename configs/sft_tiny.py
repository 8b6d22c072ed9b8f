"""SFT of the tiny NemotronH on generated arithmetic chats, on CPU in under two minutes.

    python -m nemocascade.launch --config=configs/sft_tiny.py --workdir=/tmp/sft_tiny

Expected (measured): `metrics.jsonl` with 150 steps; the training loss falls from ln(512) = 6.2
to about 1.55 and `eval_loss` (64 held-out problems) ends near 1.7; about 35 s of CPU time
(two minutes of wall time on a busy 2-core machine). `:fast` trains 30 steps (the tests run it).
`--sweep` runs `get_sweep` (three learning rates) into DIR/<variant>/.
"""

import dataclasses

from ml_collections import ConfigDict

from nemocascade.model import ModelConfig


def get_config(arg: str = "") -> ConfigDict:
    """`arg`: "" (default) or "fast" (fewer steps, for tests)."""
    if arg not in ("", "fast"):
        raise ValueError(f"sft_tiny: unknown arg {arg!r}; use '' or 'fast'")
    fast = arg == "fast"
    steps = 30 if fast else 150
    c = ConfigDict()
    c.job = "sft"
    c.seed = 0
    c.model = dataclasses.asdict(ModelConfig.tiny(vocab_size=512))
    c.data = dict(
        source="arithmetic",
        path="",
        num_records=600,
        eval_records=64,
        tokenizer="",
        vocab_size=512,
        seq_len=128,
        global_batch=8,
        thinking=True,
        non_thinking_fraction=0.0,
        overlong="truncate",
        shard_by="process",
    )
    c.optim = dict(
        lr=3e-3,
        min_lr=3e-4,
        warmup_steps=10,
        decay_steps=0,
        b1=0.9,
        b2=0.98,
        eps=1e-8,
        weight_decay=0.1,
        clip_norm=1.0,
        grad_accum_steps=1,
        moe_bias_rate=1e-3,
    )
    c.train = dict(
        steps=steps,
        checkpoint_every=steps // 3,
        keep_checkpoints=2,
        best_metric="eval_loss",
        best_mode="min",
        eval_every=0,
        max_consecutive_skips=10,
        progress=True,
        async_checkpoint=True,
    )
    c.mesh = dict(data=-1, fsdp=1, expert=1, tensor=1)
    c.loss_chunk_size = 0  # full logits
    c.export_hf = False
    return c


def get_sweep(arg: str = "") -> list[dict]:
    """Three peak learning rates (each variant keeps min_lr = lr / 10)."""
    del arg
    return [{"optim.lr": lr, "optim.min_lr": lr / 10} for lr in (1e-3, 3e-3, 1e-2)]
