"""Multi-turn episodes with tool calls (`rl.episodes`, `rl.trajectory`) on the tiny model.

A scripted environment answers every assistant turn with tool results until its script ends the
episode. Checked: the trajectory is the chat template's rendering of the conversation (exactly,
for canonical turn tokens; structurally for sampled ones), the loss mask covers exactly the
model's sampled tokens, continuing a cached episode equals a fresh forward over the whole
conversation (fp32, 1e-5), a seed reproduces an episode in any slot and on sharded slots, and the
unchanged GRPO step trains on the model's tokens only.
"""

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from nemocascade.data import train_bpe
from nemocascade.data.chat import render_chat, render_prompt, render_text
from nemocascade.data.tools import ToolSpec
from nemocascade.model import ModelConfig, NemotronH
from nemocascade.rl import episodes as epi
from nemocascade.rl import trajectory as tj
from nemocascade.rl import turns as tr
from nemocascade.sharding import make_mesh, state_shardings
from nemocascade.train import grpo, optim
from nemocascade.train.state import create_train_state

ATOL = 1e-5  # fp32 logits / log-probs, cached vs uncached (as tests/generate), fixed up front
TOOL = ToolSpec("lookup", "Looks a word up.", {"q": {"type": "string"}}, ("q",))
CALL = "<tool_call>\n<function=lookup>\n<parameter=q>\ncat\n</parameter>\n</function>\n</tool_call>"


@dataclasses.dataclass(frozen=True)
class Limits:
    max_turns: int = 3


@dataclasses.dataclass
class ToolTurn:
    messages: list
    done: bool
    reason: str = ""
    calls: int = 0
    errors: int = 0


class ScriptedEnv:
    """Answers `record["turns"] - 1` turns with `record["calls"]` tool results each (of
    `record["size"]` characters), then ends the episode as "submitted"; reward = turns seen."""

    def __init__(self, record, limits=None, sandbox=None):
        del limits, sandbox
        self.record, self.seen, self.closed = record, [], False

    @property
    def tools(self):
        return [TOOL]

    def initial_messages(self):
        return [{"role": "user", "content": self.record["question"]}]

    def step(self, assistant_text):
        self.seen.append(assistant_text)
        if len(self.seen) >= self.record["turns"]:
            return ToolTurn([], True, "submitted")
        n, size = self.record.get("calls", 1), self.record.get("size", 0)
        msgs = [
            {"role": "tool", "content": f"result {len(self.seen)}.{j}" + "x" * size}
            for j in range(n)
        ]
        return ToolTurn(msgs, False, calls=n, errors=len(self.seen) % 2)

    def reward(self):
        return float(len(self.seen)), {"turns": len(self.seen)}

    def close(self):
        self.closed = True


RECORDS = [
    {"question": "What is a cat?", "turns": 3, "calls": 1},
    {"question": "Look up dog.", "turns": 1},
    {"question": "And a bird?", "turns": 2, "calls": 2},
    {"question": "Keep going.", "turns": 9},  # cut at max_turns
    {"question": "Big output.", "turns": 3, "size": 4000},  # the tool output does not fit
    {"question": "Two.", "turns": 2, "calls": 1},
]
# max_piece 16: prompts and continuations run in pieces of 16, 8, 4, 2, 1 (5 compiled programs)
KW = dict(
    limits=Limits(),
    max_new_tokens=12,
    max_episode_tokens=384,
    temperature=1.0,
    seed=3,
    slots=4,
    max_piece=16,
)


@pytest.fixture(scope="module")
def tok(tmp_path_factory):
    sys = render_text([{"role": "user", "content": "q"}], tools=[TOOL])
    texts = [sys, CALL, "<tool_response>\nresult 1.0\n</tool_response>"] * 4
    texts += ["The answer is a cat. I should look it up. What is a dog and a bird?"] * 4
    return train_bpe(texts, 600, tmp_path_factory.mktemp("tok") / "tokenizer.json")


@pytest.fixture(scope="module")
def model(tok):
    # Mamba + attention: the two cached block kinds (an MoE block has no cache, only compile time)
    cfg = ModelConfig.tiny(pattern="M*", vocab_size=tok.vocab_size, chunk_size=8)
    return NemotronH(cfg, rngs=nnx.Rngs(0))


@pytest.fixture(scope="module")
def run(model, tok):
    graphdef, state = nnx.split(model)
    envs = [ScriptedEnv(r) for r in RECORDS]
    timings = {}
    trajs = epi.run_episodes(graphdef, state, tok, envs, timings=timings, **KW)
    print("episode loop:", timings)
    return envs, trajs


# ----------------------------------------------------------------------------- bookkeeping
@pytest.mark.parametrize("thinking", [False, True])
def test_canonical_turns_render_exactly_as_the_template(tok, thinking):
    """Turns whose tokens are the tokenizer's encoding of canonical text: the trajectory's ids
    and loss mask equal `render_chat(conversation, train_history=True)`'s except for the one
    token the template writes after the final `<|im_end|>` (a "\\n", mask 0), where the
    trajectory stops. The generation prefix (`<|im_start|>assistant\\n<think></think>` or
    `<think>\\n`) is mask 0 in both: the template trains from the first token after it."""
    prefix = tj.generation_prefix_body(thinking)
    reasoning = "I should look it up.\n</think>\n" if thinking else ""
    turns = [reasoning + "Let me look.\n\n" + CALL, reasoning + CALL, reasoning + "A cat."]
    results = [["result 1.0"], ["result 2.0", "result 2.1"]]
    messages = [{"role": "user", "content": "What is a cat?"}]
    b = tj.TrajectoryBuilder(render_prompt(tok, messages, thinking=thinking, tools=[TOOL]))
    for i, text in enumerate(turns):
        gen = tok.encode(text) + [tok.im_end_id]
        b.add_model(gen, [0.0] * len(gen), [0.0] * len(gen))
        messages.append({"role": "assistant", "content": prefix + text})
        if i < len(results):
            b.add_template(tj.continuation_ids(tok, results[i], thinking=thinking, closed=True))
            messages += [{"role": "tool", "content": c} for c in results[i]]
    ids, mask, _, _ = b.arrays()
    want_ids, want_mask = render_chat(tok, messages, thinking=thinking, tools=[TOOL])
    assert want_ids[len(ids) :] == tok.encode("\n") and want_mask[len(ids) :] == [0]
    np.testing.assert_array_equal(ids, want_ids[: len(ids)])
    np.testing.assert_array_equal(mask, want_mask[: len(ids)])


def test_cut_turn_is_closed_by_the_template(tok):
    text = tj.continuation_text(["r"], thinking=False, closed=False)
    assert text.startswith("<|im_end|>\n<|im_start|>user\n<tool_response>\nr\n")
    assert text.endswith("<|im_start|>assistant\n<think></think>")


# ----------------------------------------------------------------------------- episodes
def _spans(mask):
    """[(start, end)] of the runs of 1 in `mask`."""
    edges = np.flatnonzero(np.diff(np.concatenate([[0], mask, [0]])))
    return list(zip(edges[::2], edges[1::2], strict=True))


def test_episodes_finish_reasons_rewards_and_layout(run, tok):
    """Every episode: its finish reason and reward; its ids are the prompt, then per turn the
    sampled tokens (mask 1) and the template's continuation for that turn's tool results (mask
    0); the environment saw each turn's decoded text; every environment is closed."""
    envs, trajs = run
    reasons = [t.finish_reason for t in trajs]
    done = "submitted"
    assert reasons == [done, done, done, "max_turns", "max_tokens", done]
    assert [t.reward for t in trajs] == [3.0, 1.0, 2.0, 0.0, 0.0, 2.0]
    assert [t.turns for t in trajs] == [3, 1, 2, 3, 1, 2]
    assert [t.tool_calls for t in trajs] == [2, 0, 2, 3, 1, 1]
    assert [t.tool_errors for t in trajs] == [1, 0, 1, 2, 1, 1]
    assert all(e.closed for e in envs)
    prefix = tj.generation_prefix_body(False)
    closed_turns = cut_turns = 0
    for env, t in zip(envs, trajs, strict=True):
        prompt = render_prompt(tok, env.initial_messages(), thinking=False, tools=[TOOL])
        assert t.ids[: t.prompt_len].tolist() == prompt and t.loss_mask[: t.prompt_len].sum() == 0
        spans = _spans(t.loss_mask)
        assert len(spans) == t.turns and t.ids.shape[0] <= KW["max_episode_tokens"]
        tools = [m for m in t.messages if m["role"] == "tool"]
        for k, (a, b) in enumerate(spans):
            gen = t.ids[a:b].tolist()
            closed = gen[-1] == tok.im_end_id
            closed_turns, cut_turns = closed_turns + closed, cut_turns + (not closed)
            assert b - a <= KW["max_new_tokens"] and np.all(t.logprobs[a:b] < 0)
            assert env.seen[k] == prefix + tok.decode(gen[:-1] if closed else gen)
            end = spans[k + 1][0] if k + 1 < len(spans) else t.tokens
            if k + 1 < len(spans):
                n = env.record.get("calls", 1)
                contents = [m["content"] for m in tools[k * n : (k + 1) * n]]
                cont = tj.continuation_ids(tok, contents, thinking=False, closed=closed)
                assert t.ids[b:end].tolist() == cont
            else:
                assert end == b  # the trajectory ends with the model's last token
        assert np.all(t.logprobs[t.loss_mask == 0] == 0)
    assert cut_turns > 0  # per-turn budget cuts (closed turns need a sampled eos: see below)
    print(f"turns closed by the model's <|im_end|>: {closed_turns}, cut: {cut_turns}")


@functools.partial(jax.jit, static_argnames="graphdef")
def _hidden(state, ids, *, graphdef):
    return nnx.merge(graphdef, state).hidden_states(ids)[0]


def test_closed_turns_by_eos(run, model, tok):
    """Turns that end with the model's own `<|im_end|>` (made likely: its lm_head column gets
    the mean final hidden state's direction, ~+4 on its logit) continue without a template
    `<|im_end|>`, and the environment sees the text before it."""
    _, trajs = run
    graphdef, state = nnx.split(model)
    h = _hidden(state, jnp.asarray(trajs[0].ids[None]), graphdef=graphdef)[0]
    u = jnp.mean(h, axis=0)
    w = state["lm_head_DV"][...]
    state["lm_head_DV"] = state["lm_head_DV"].replace(
        w.at[:, tok.im_end_id].add(4.0 * u / jnp.sum(u * u))
    )
    envs = [ScriptedEnv(r) for r in RECORDS]
    trajs = epi.run_episodes(graphdef, state, tok, envs, **KW)
    closed = 0
    for env, t in zip(envs, trajs, strict=True):
        for k, (a, b) in enumerate(_spans(t.loss_mask)):
            if t.ids[b - 1] == tok.im_end_id:
                closed += 1
                assert env.seen[k] == "<think></think>" + tok.decode(t.ids[a : b - 1])
                if b < t.tokens:
                    assert t.ids[b] != tok.im_end_id  # no second <|im_end|> from the template
    print(f"turns closed by the model's <|im_end|>: {closed}")
    assert closed > 0


def test_seed_reproduces_episodes_in_any_slot(run, model, tok):
    """The episodes in reverse order (each keeps its key, `episode_ids`) enter other slots
    beside other episodes at other times: same tokens."""
    _, trajs = run
    graphdef, state = nnx.split(model)
    order = list(reversed(range(len(RECORDS))))
    again = epi.run_episodes(
        graphdef, state, tok, [ScriptedEnv(RECORDS[i]) for i in order], episode_ids=order, **KW
    )
    for i, b in zip(order, again, strict=True):
        a = trajs[i]
        np.testing.assert_array_equal(a.ids, b.ids)
        np.testing.assert_array_equal(a.loss_mask, b.loss_mask)
        np.testing.assert_allclose(a.logprobs, b.logprobs, atol=ATOL)


class BrokenEnv(ScriptedEnv):
    def step(self, assistant_text):
        if self.seen:
            raise RuntimeError("tool server down")
        return super().step(assistant_text)


def test_factory_and_a_broken_environment(run, model, tok):
    """Environments built from records by `make_env` when their episode starts; one whose
    `step` raises ends as "env_error" (reward 0, closed) and the others are unaffected."""
    _, trajs = run
    graphdef, state = nnx.split(model)
    built = []

    def make_env(record):
        env = (BrokenEnv if record.get("broken") else ScriptedEnv)(record)
        built.append(env)
        return env

    recs = [RECORDS[0], dict(RECORDS[2], broken=True)]
    got = epi.run_episodes(graphdef, state, tok, recs, make_env=make_env, **KW)
    assert [t.record for t in got] == recs and all(e.closed for e in built)
    np.testing.assert_array_equal(got[0].ids, trajs[0].ids)
    bad = got[1]
    assert bad.finish_reason == "env_error" and bad.reward == 0.0 and bad.turns == 2
    assert "tool server down" in bad.reward_info["error"]


@functools.partial(jax.jit, static_argnames="graphdef")
def _full_logits(state, ids, *, graphdef):
    logits = nnx.merge(graphdef, state)(ids)
    return logits, jax.nn.log_softmax(logits, axis=-1)


def test_continuation_equals_full_recompute(run, model, tok):
    """(1) The log-prob of every sampled token (temperature 1: the model's log-softmax), whether
    decoded or the first of a turn after a continuation prefill, equals a fresh forward over the
    whole conversation; (2) the logits after feeding a whole turn + tool continuation onto a
    cached episode equal the fresh forward's at that position."""
    _, trajs = run
    graphdef, state = nnx.split(model)
    length = KW["max_episode_tokens"]
    ids = np.zeros((len(trajs), length), np.int32)  # right padding: causal, unseen
    for i, t in enumerate(trajs):
        ids[i, : t.tokens] = t.ids
    full, logp = jax.device_get(_full_logits(state, jnp.asarray(ids), graphdef=graphdef))
    worst = 0.0
    for i, t in enumerate(trajs):
        pos = np.flatnonzero(t.loss_mask)
        want = logp[i, pos - 1, t.ids[pos]]
        worst = max(worst, float(np.max(np.abs(t.logprobs_untempered[pos] - want))))
        np.testing.assert_allclose(t.logprobs[pos], t.logprobs_untempered[pos], atol=ATOL)
    print(f"max |episode log-prob - full forward| = {worst:.2e}")
    assert worst <= ATOL

    i = 0  # 3 turns: feed the prompt, then each turn + its continuation, onto slot 1
    t = trajs[i]
    st = tr.empty_state(graphdef, state, slots=KW["slots"], length=length, mesh=None)
    starts = [a for a, _ in _spans(t.loss_mask)]
    cuts = [0, *starts]
    for a, b in zip(cuts[:-1], cuts[1:], strict=True):
        logits, st = tr.feed((graphdef, state), st, 1, t.ids[a:b].tolist(), KW["max_piece"])
        diff = float(np.max(np.abs(np.asarray(logits)[0, -1] - full[i, b - 1])))
        print(f"fed {b - a} tokens at {a}: max |logits - full forward| = {diff:.2e}")
        assert diff <= ATOL


def test_feed_as_several_rows_is_one_row(model):
    """A slot fed as several identical rows (what an expert-parallel MoE needs: its tokens split
    over the batch shards) leaves the same logits and the same cache as one row, up to the
    rounding of a batched matmul (measured 3e-8)."""
    graphdef, state = nnx.split(model)
    got = []
    for rows in (1, 4):
        st = tr.empty_state(graphdef, state, slots=4, length=32, mesh=None)
        logits, st = tr.feed((graphdef, state), st, 1, [5, 6, 7, 8, 9], rows=rows)
        got.append(jax.device_get((logits, st.cache)))
    assert got[0][0].shape == got[1][0].shape
    for a, b in zip(jax.tree.leaves(got[0]), jax.tree.leaves(got[1]), strict=True):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=0, atol=1e-6)


# ----------------------------------------------------------------------------- training
def test_grpo_step_trains_on_model_tokens_only(run, model):
    """The unchanged GRPO step on a trajectory batch: the ratio is exactly 1 on-policy (no clip,
    the loss is REINFORCE's over the model's tokens), the sampler's log-probs sit on the right
    targets (gap to the trainer's < 1e-5), and perturbing the targets and sampler log-probs of
    every masked position (prompt, tool outputs, template) leaves the update bit for bit
    unchanged: masked tokens contribute nothing to the gradient (they are context only)."""
    _, trajs = run
    cfg = grpo.GRPOConfig(logprob_chunk=64, compute_entropy=False, overlong_filtering=True)
    batch, prep = tj.trajectories_to_batch(trajs, group_size=2, cfg=cfg, num_rows=8)
    n = trajs[0].tokens - 1
    assert batch["input_ids"].shape[0] == 8 and batch["input_ids"].shape[1] % 16 == 0
    assert prep["sample_weight"][3] == 0  # cut at max_turns: out of the loss, in the baseline
    np.testing.assert_array_equal(batch["loss_mask"][0, :n], trajs[0].loss_mask[1:])
    np.testing.assert_array_equal(batch["targets"][0, :n], trajs[0].ids[1:])
    tx = optim.make_optimizer(optim.OptimConfig(lr=1e-3, min_lr=1e-4, warmup_steps=1), 10)
    graphdef, state = create_train_state(model, tx, jax.random.PRNGKey(0))
    step = jax.jit(functools.partial(grpo.grpo_train_step, graphdef=graphdef, tx=tx, cfg=cfg))
    assert "old_logprobs" not in batch  # pi_old = the trainer's own forward: ratio exactly 1
    new, m = step(state, {k: jnp.asarray(v) for k, v in batch.items()})
    m = jax.device_get(m)
    mask, adv = batch["loss_mask"], batch["advantages"]
    print(f"trajectory batch: logp_gap_max = {m['logp_gap_max']:.2e}, tokens = {m['tokens']}")
    assert m["clip_fraction"] == 0 and m["skipped"] == 0 and m["logp_gap_max"] < ATOL
    assert m["tokens"] == mask.sum() and m["grad_norm"] > 0
    # ratio 1: the loss is REINFORCE's, -sum(A * mask) / sum(mask) over the model's tokens
    np.testing.assert_allclose(m["loss"], -np.sum(adv[:, None] * mask) / mask.sum(), rtol=1e-5)

    rng = np.random.default_rng(0)
    masked = mask == 0
    bad = dict(batch)
    bad["targets"] = np.where(masked, rng.integers(0, 300, masked.shape), batch["targets"])
    bad["sampler_logprobs"] = np.where(masked, -7.0, batch["sampler_logprobs"])
    new_bad, m_bad = step(state, {k: jnp.asarray(v) for k, v in bad.items()})
    assert float(m_bad["grad_norm"]) == float(m["grad_norm"])
    for a, b in zip(jax.tree.leaves(new.params), jax.tree.leaves(new_bad.params), strict=True):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def test_sharded_slots_same_episodes(run, model, tok):
    """Slots over 4 batch shards (data 2 x expert 2; tensor 2 splits contractions), parameters
    in their training shardings: the same episodes (log-probs to test_sharded's tolerance)."""
    _, trajs = run
    mesh = make_mesh({"data": 2, "expert": 2, "tensor": 2})
    graphdef, state = nnx.split(model)
    sharded = jax.device_put(state, state_shardings(state, mesh))
    envs = [ScriptedEnv(r) for r in RECORDS]
    got = epi.run_episodes(graphdef, sharded, tok, envs, mesh=mesh, **KW)
    for a, b in zip(trajs, got, strict=True):
        assert a.finish_reason == b.finish_reason
        np.testing.assert_array_equal(a.ids, b.ids)
        np.testing.assert_allclose(a.logprobs, b.logprobs, atol=1e-4)  # measured ~5e-7


# ----------------------------------------------------------------------------- routing replay
def test_episodes_record_the_routes_of_every_position(tok):
    """With `record_routes`, a trajectory keeps the experts of every position but its last (the
    prompt and tool continuations from `feed`, the sampled tokens as the decode loop fed them
    back), equal to a fresh forward's over the whole conversation up to fp32 near-ties (at most
    1% of (position, layer) pairs: a position off by one would miss most), and the GRPO batch
    carries them to the same positions (-1 on padding)."""
    cfg = ModelConfig.tiny(
        pattern="M*E", vocab_size=tok.vocab_size, chunk_size=8, n_routed_experts=8,
        num_experts_per_tok=2, n_group=1,
    )  # fmt: skip
    graphdef, state = nnx.split(NemotronH(cfg, rngs=nnx.Rngs(0)))
    envs = [ScriptedEnv(r) for r in RECORDS[:4]]
    trajs = epi.run_episodes(graphdef, state, tok, envs, record_routes=True, **KW)
    ids = np.zeros((len(trajs), KW["max_episode_tokens"]), np.int32)
    for i, t in enumerate(trajs):
        assert t.routes.shape == (t.tokens - 1, 1, 2) and t.routes.min() >= 0
        ids[i, : t.tokens] = t.ids
    fresh = jax.jit(lambda s, x: nnx.merge(graphdef, s)(x, return_aux=True)[1]["routes"])(
        state, jnp.asarray(ids)
    )
    fresh = np.sort(np.asarray(fresh)[0], -1)  # [B, T, K] of the one MoE layer
    worst = max(
        float(np.mean(np.any(np.sort(t.routes[:, 0], -1) != fresh[i, : t.tokens - 1], -1)))
        for i, t in enumerate(trajs)
    )
    assert worst <= 0.01, worst
    batch, _ = tj.trajectories_to_batch(
        trajs, group_size=2, cfg=grpo.GRPOConfig(), seq_len=KW["max_episode_tokens"]
    )
    for i, t in enumerate(trajs):
        np.testing.assert_array_equal(batch["routes"][i, : t.tokens - 1], t.routes)
        assert np.all(batch["routes"][i, t.tokens - 1 :] == -1)
