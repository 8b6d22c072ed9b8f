"""The paper's full pipeline config: hyperparameters from the reference, sharded states built
abstractly for every stage, and a clear failure when data or reward models are missing."""

import jax
import pytest
from flax import nnx

from configs.nemotron_cascade2 import get_config
from nemocascade.jobs.cascade import Cascade
from nemocascade.jobs.stages import parse_stage
from nemocascade.jobs.validate import StageValidationError
from nemocascade.model import ModelConfig, NemotronH
from nemocascade.sharding import MESH_AXES, MeshConfig
from nemocascade.train.optim import OptimConfig, freeze_router, make_optimizer
from nemocascade.train.state import bytes_per_device, create_train_state

GiB = 1 << 30
NUM_DEVICES = 64  # e.g. a v5p-128 slice (64 chips) or 8 hosts x 8 H200


# C2 Tables 7-10 and §4 (shared/reference/cascade2_algorithms.md): stage -> (steps, prompts,
# samples, max response (swe_rl: per turn), lr, temperature, top-p, kl, overlong filtering,
# dynamic filtering)
PAPER_RL = {
    "if_rl": (180, 128, 16, 49_152, 3e-6, 1.0, 1.0, 0.0, False, True),
    "multi_domain_rl": (70, 128, 16, 49_152, 3e-6, 1.0, 1.0, 0.0, True, False),
    "rlhf_teacher": (25, 128, 16, 16_384, 3e-6, 1.0, 1.0, 0.03, True, False),
    "rlhf": (25, 128, 16, 16_384, 3e-6, 1.0, 1.0, 0.03, True, False),
    "long_context_rl": (30, 128, 16, 16_384, 3e-6, 1.0, 1.0, 0.0, True, False),
    "code_rl": (22, 128, 16, 118_784, 3e-6, 1.0, 0.95, 0.0, True, False),
    "swe_rl": (50, 16, 64, 16_384, 3e-6, 0.8, 1.0, 0.0, False, True),
}


def test_paper_hyperparameters():
    c = get_config()
    assert c.stage_order.split(",") == [
        "sft",
        "if_rl",
        "multi_domain_rl",
        "rlhf_teacher",
        "mopd",
        "rlhf",
        "long_context_rl",
        "code_rl",
        "swe_rl",
    ]
    stages = {n: parse_stage(n, c.stages[n]) for n in c.stage_order.split(",")}
    for name, want in PAPER_RL.items():
        s = stages[name]
        got = (
            s.steps,
            s.prompts_per_step,
            s.samples_per_prompt,
            s.max_new_tokens,
            s.optim.lr,
            s.temperature,
            s.top_p,
            s.loss.kl_coef,
            s.loss.overlong_filtering,
            s.loss.dynamic_filtering,
        )
        assert got == want, name
        # strictly on-policy GRPO, group mean/std advantages, token-level loss, Adam beta2 0.95
        assert s.loss.importance_correction == "none" and s.loss.token_level, name
        assert s.loss.advantage_estimator == "group_mean_std" and s.thinking, name
        assert (s.optim.b1, s.optim.b2, s.optim.weight_decay) == (0.9, 0.95, 0.0), name
    assert stages["multi_domain_rl"].domain_weights == {
        "mcqa": 0.55,
        "workplace": 0.30,
        "structured_output": 0.15,
    }
    # SWE RL (Table 10): multi-turn episodes in the swe environment, 256K context, <= 200 turns,
    # lr 3e-6 after 10 warmup steps decaying to 0; the other stages are single-turn
    swe = stages["swe_rl"]
    assert (swe.env.name, swe.env.max_episode_tokens, swe.env.max_turns) == ("swe", 262_144, 200)
    assert (swe.optim.warmup_steps, swe.optim.min_lr) == (10, 0.0)
    assert all(not stages[n].env.name for n in PAPER_RL if n != "swe_rl")
    assert stages["rlhf"].reward == "genrm" and stages["long_context_rl"].reward == "llm_judge"
    # MOPD (Table 8 and §4.4): 128 x 4, lr 2e-6 after a 30-step warmup, band [0.5, 2.0];
    # teachers: math = SFT, rlhf = RLHF trained from SFT (a side branch), others: best so far
    m = stages["mopd"]
    assert (m.steps, m.prompts_per_step, m.samples_per_prompt, m.max_new_tokens) == (
        52,
        128,
        4,
        98_304,
    )
    assert (m.optim.lr, m.optim.warmup_steps, m.loss.is_low, m.loss.is_high) == (2e-6, 30, 0.5, 2.0)
    assert m.teachers == {"math": "sft", "rlhf": "rlhf_teacher"}
    assert stages["rlhf_teacher"].start_from == "sft" and not stages["rlhf"].start_from
    assert {k: m.domain_weights[k] for k in ("math", "instruction", "workplace")} == {
        "math": 1853,
        "instruction": 1854,
        "workplace": 610,
    }
    # SFT (Table 7): 256K packed rows, batch 64, AdamW (0.9, 0.98), wd 0.1, 5e-5 -> 5e-6 cosine
    # over a 40K-step horizon, 200 warmup steps, stopped at 33K
    sft = stages["sft"]
    assert (sft.seq_len, sft.batch_size, sft.steps) == (262_144, 64, 33_000)
    o = sft.optim
    assert (o.lr, o.min_lr, o.warmup_steps, o.decay_steps) == (5e-5, 5e-6, 200, 40_000)
    assert (o.b1, o.b2, o.weight_decay) == (0.9, 0.98, 0.1) and sft.loss_chunk_size > 0


def test_every_stage_state_builds_sharded_abstractly(capsys):
    c = get_config()
    cfg = ModelConfig.from_mapping(c.model)
    cfg = cfg.replace(vocab_size=max(cfg.vocab_size, c.tokenizer.vocab_size))
    mesh = jax.sharding.AbstractMesh(MeshConfig(**c.mesh.to_dict()).shape(NUM_DEVICES), MESH_AXES)
    lines = []
    for name in c.stage_order.split(","):
        s = c.stages[name]
        tx = make_optimizer(OptimConfig.from_mapping(s.optim.to_dict()), int(s.steps))
        if s.type != "sft" and s.get("freeze_router", False):
            tx = freeze_router(tx)
        state = jax.eval_shape(
            lambda tx=tx: create_train_state(
                NemotronH(cfg, rngs=nnx.Rngs(0)), tx, jax.random.PRNGKey(0)
            )[1]
        )
        per_device = bytes_per_device(state, mesh)
        total = sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(state))
        assert total / NUM_DEVICES <= per_device < 16 * GiB, name
        lines.append(f"{name}: {per_device / GiB:.2f} GiB/device")
    with capsys.disabled():
        print("\nnemotron_cascade2 train state on 64 devices: " + "; ".join(lines))


def test_missing_inputs_fail_with_the_field_named(tmp_path):
    c = get_config()
    with pytest.raises(ValueError, match="tokenizer.path"):
        Cascade(c, str(tmp_path))
    from nemocascade.data import synthetic as tasks
    from nemocascade.data import train_bpe

    train_bpe(tasks.all_texts(20), 300, str(tmp_path / "tok.json"))
    c.tokenizer.path = str(tmp_path / "tok.json")
    with pytest.raises(StageValidationError) as e:
        Cascade(c, str(tmp_path / "run"))
    msg = str(e.value)  # every missing input at once, each with its stage and field
    for stage, domain, kind in (("sft", "math", "sft"), ("if_rl", "instruction", "rl")):
        assert f"stages.{stage}.domains: data.paths.{domain}.{kind} is not set" in msg
    assert "data.paths.long_context.eval is not set" in msg
    assert "stages.rlhf.reward_model_path is not set" in msg
    assert not (tmp_path / "run").exists()
