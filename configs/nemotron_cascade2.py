"""Nemotron-Cascade 2 post-training of Nemotron-3-Nano-30B-A3B, as in the paper (arXiv 2603.19220).

    python -m nemocascade.launch --config=configs/nemotron_cascade2.py --workdir=gs://.../cascade2 \
        --config.model_path=/ckpt/NVIDIA-Nemotron-3-Nano-30B-A3B-Base-BF16 \
        --config.tokenizer.path=/ckpt/.../tokenizer.json --config.data.paths.math.rl=...

Stage order (C2 Fig. 2): SFT -> IF-RL -> multi-domain RL -> MOPD -> RLHF -> long-context RL ->
code RL (SWE RL is out of scope: it needs agentic environments). Hyperparameters from
shared/reference/cascade2_algorithms.md (C2 Tables 7-10, §4): GRPO strictly on-policy (one update
per batch), group mean/std advantages, token-level loss, no KL except RLHF (0.03), 128 prompts x 16
rollouts, lr 3e-6, temperature 1.0; MOPD 128 x 4, lr 2e-6 with a 30-step warmup from 2e-7, ICE-POP
band [0.5, 2.0]; code RL top-p 0.95, 118K responses.

The data, the released weights and the reward models (GenRM for RLHF, an LLM judge for long-context
RL) are not in this repository: every path is a config field, and a stage whose inputs are missing
fails at its start with a message naming the field. Each stage lists the data and reward it needs.
A test parses this file and builds the sharded train state abstractly (no weights, no data).
"""

import dataclasses

from ml_collections import ConfigDict

from nemocascade.model import ModelConfig


def _optim(
    lr: float,
    warmup: int,
    *,
    min_lr: float | None = None,
    b2: float = 0.999,
    wd: float = 0.0,
    warmup_from: float = 0.0,
):
    del warmup_from  # linear warmup starts at 0 in optim.py; 2e-7 vs 0 is immaterial at step 1
    return dict(
        lr=lr,
        min_lr=lr if min_lr is None else min_lr,
        warmup_steps=warmup,
        decay_steps=0,
        b1=0.9,
        b2=b2,
        eps=1e-8,
        weight_decay=wd,
        clip_norm=1.0,
        grad_accum_steps=1,
    )


def _grpo(
    domains: str,
    steps: int,
    max_new: int,
    *,
    top_p: float = 1.0,
    dynamic: bool = False,
    overlong_filter: bool = False,
    kl: float = 0.0,
    reward: str = "verifier",
):
    return dict(
        type="grpo",
        domains=domains,
        steps=steps,
        prompts_per_step=128,
        samples_per_prompt=16,
        max_new_tokens=max_new,
        temperature=1.0,
        top_p=top_p,
        thinking=True,
        max_gen_batches=4,
        checkpoint_every=5,
        eval_every=0,
        domain_weights={},
        reward=reward,
        reward_model_path="",
        moe_bias_rate=1e-3,
        freeze_router=True,
        loss=dict(
            eps_low=0.2,
            eps_high=0.28,
            kl_coef=kl,
            advantage_estimator="group_mean_std",
            dynamic_filtering=dynamic,
            overlong_filtering=overlong_filter,
        ),
        optim=_optim(3e-6, warmup=0),
    )


def get_config(arg: str = "") -> ConfigDict:
    del arg
    c = ConfigDict()
    c.job = "cascade"
    c.seed = 0
    c.progress = True
    c.num_workers = 64
    c.export_hf = True
    c.model_path = ""  # released Nemotron-3-Nano-30B-A3B-Base (safetensors dir); "" = random init
    # fp32 master weights, bf16 compute; router, SSM recurrence and losses stay fp32
    c.model = dataclasses.asdict(
        ModelConfig.nano_30b_a3b(
            param_dtype="float32", compute_dtype="bfloat16", moe_backend="ragged_dot", remat="block"
        )
    )
    c.mesh = dict(data=1, fsdp=-1, expert=8, tensor=1)
    c.tokenizer = dict(path="", vocab_size=131072, split_digits=False)
    domains = (
        "math",
        "science",
        "chat",
        "instruction",
        "agent",
        "code",
        "rlhf",
        "long_context",
        "mcqa",
        "workplace",
        "structured_output",
    )
    c.data = dict(
        source="jsonl",
        train_per_domain=0,
        eval_per_domain=0,
        paths={d: dict(sft="", rl="", eval="") for d in domains},
    )
    c.eval = dict(n_samples=4, temperature=1.0, top_p=1.0, max_new_tokens=131072, thinking=True)
    c.stage_order = "sft,if_rl,multi_domain_rl,mopd,rlhf,long_context_rl,code_rl"
    c.stages = dict(
        # C2 §3, Table 7: one SFT stage, 256K-token packed rows, global batch 64, 33K steps.
        sft=dict(
            type="sft",
            domains="math,science,chat,instruction,agent,code",
            steps=33_000,
            seq_len=262_144,
            batch_size=64,
            thinking=True,
            optim=_optim(5e-5, warmup=200, min_lr=5e-6, b2=0.98, wd=0.1),
        ),
        # C2 §4.2: IF-RL, thinking mode, dynamic filtering, truncated responses get reward 0.
        if_rl=_grpo("instruction", 180, 49_152, dynamic=True),
        # C2 §4.3: 55% STEM MCQA, 30% agentic tool calling, 15% structured output;
        # overlong filtering.
        multi_domain_rl=dict(
            _grpo("mcqa,workplace,structured_output", 70, 49_152, overlong_filter=True),
            domain_weights=dict(mcqa=0.55, workplace=0.30, structured_output=0.15),
        ),
        # C2 §4.4: MOPD, teachers = best checkpoint per domain so far.
        mopd=dict(
            type="mopd",
            domains="math,instruction,workplace,mcqa,structured_output",
            steps=52,
            prompts_per_step=128,
            samples_per_prompt=4,
            max_new_tokens=98_304,
            temperature=1.0,
            top_p=1.0,
            thinking=True,
            checkpoint_every=5,
            eval_every=0,
            moe_bias_rate=1e-3,
            freeze_router=True,
            domain_weights=dict(
                math=1853, instruction=1854, workplace=610, mcqa=927, structured_output=927
            ),
            loss=dict(is_low=0.5, is_high=2.0, objective="sampled_token"),
            optim=_optim(2e-6, warmup=30),
        ),
        # C2 §4.5: RLHF with a GenRM (Qwen3-235B-A22B-Thinking-2507), KL 0.03, thinking only.
        rlhf=_grpo("rlhf", 25, 16_384, kl=0.03, overlong_filter=True, reward="genrm"),
        # C2 §4.6: long-context RL judged by Qwen3-235B-A22B-Instruct-2507.
        long_context_rl=_grpo("long_context", 30, 49_152, overlong_filter=True, reward="llm_judge"),
        # C2 §4.7: code RL, 3.5K hard problems, strict binary unit-test reward, top-p 0.95.
        code_rl=_grpo("code", 22, 118_784, top_p=0.95, overlong_filter=True),
    )
    return c
