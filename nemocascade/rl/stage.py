"""One RL stage of the Cascade: GRPO against verifiers, or MOPD from per-domain teachers.

`RLStage` is the stage's batch source for the one train loop (`train.loop.train_loop`) and
builds its pure step. Each step (strictly on-policy, one update per rollout batch, as in
Cascade 2; `rollout_lag=1` samples each batch one update ahead instead, see `rl.ahead`):
  1. draw `prompts_per_step` prompts of the stage's domains (deterministic in seed and step);
  2. sample `samples_per_prompt` responses each from the current policy;
  3. GRPO: verifier rewards -> group-normalised advantages; dynamic filtering drops groups whose
     rewards are all equal and samples more prompts until the batch is full (at most
     `max_gen_batches` rounds); MOPD: each row's domain teacher scores the sampled tokens
     (`loss.objective="reverse_kl"`: the teachers run inside the step, full-vocabulary KL);
  4. one optimizer update (`train.grpo` / `train.distill` steps, jitted once per stage).
A GRPO stage with an environment (`env.name`, e.g. the paper's SWE RL) samples whole multi-turn
episodes instead of single responses in steps 2-3 (`rl.agentic`); the step is the same.
The loop checkpoints every `checkpoint_every` steps (and on SIGTERM), logs the rollout metrics
(rewards per domain, response lengths, truncation, timings) with the step's, and evaluates every
`eval_every` steps when given an `eval_fn`.
"""

from __future__ import annotations

import functools
import logging
import os
from collections.abc import Callable, Mapping
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from nemocascade import rewards as rw
from nemocascade.rl import agentic, batching
from nemocascade.rl import rollouts as ro
from nemocascade.rl.ahead import SampleAhead
from nemocascade.rl.config import RLStageConfig
from nemocascade.sharding import device_batch
from nemocascade.train import distill, grpo
from nemocascade.train.loop import LoopConfig, LoopResult, train_loop
from nemocascade.train.optim import freeze_router, lr_schedule, make_optimizer
from nemocascade.train.state import TrainState

log = logging.getLogger(__name__)
SEQ_MULTIPLE = 16  # the train step's sequence length is a multiple of this
Weights = tuple[nnx.State, nnx.State]  # (params, model_state): what rollouts are sampled from


class RewardErrors(RuntimeError):
    """Too many responses of a step could not be scored (grader failures, not wrong answers)."""


class RLStage:
    """Runs one GRPO or MOPD stage (see the module docstring) as a `train.loop.BatchSource`."""

    process_local = False  # every process samples the same whole batch

    def __init__(
        self,
        *,
        name: str,
        cfg: RLStageConfig,
        graphdef: nnx.GraphDef,
        tokenizer,
        pools: Mapping[str, list[dict]],
        seed: int,
        teachers: Mapping[str, distill.Teacher] | None = None,
        reward_cache: rw.RewardCache | None = None,
        reward_model=None,
        num_workers: int = 2,
        mesh=None,
    ):
        if cfg.type == "mopd":
            missing = sorted(set(pools) - set(teachers or {}))
            if missing:
                raise ValueError(f"stage {name}: no teacher for domains {missing}")
        self.name, self.cfg = name, cfg
        self.graphdef, self.tokenizer = graphdef, tokenizer
        self.pools, self.seed, self.teachers = pools, seed, dict(teachers or {})
        self.reward_cache = reward_cache or rw.RewardCache()
        if (cfg.type == "grpo" and cfg.reward != "verifier") != (reward_model is not None):
            raise ValueError(
                f"stage {name}: reward={cfg.reward!r} "
                + ("needs a reward model" if reward_model is None else "takes no reward model")
            )
        self.reward_model = reward_model  # a `rewards.reward_models` scorer, or None
        self.num_workers, self.mesh = num_workers, mesh
        self.rows = cfg.rows
        if cfg.rollout_lag and jax.process_count() > 1:
            raise ValueError(
                f"stages.{name}.rollout_lag={cfg.rollout_lag}: the one-step-ahead sampler is a "
                f"thread of the one process; this run has {jax.process_count()} processes, whose "
                "threads could order their collectives differently (use rollout_lag=0)"
            )
        self._ahead: SampleAhead | None = None  # set by `run` when rollout_lag=1
        # One sequence length for the whole stage (longest prompt + max_new_tokens - 1 inputs,
        # rounded up to a multiple of 16, not a power of two: up to 1.9x less work per step), so
        # the train step compiles once. An episode is at most `env.max_episode_tokens` long.
        if cfg.env.name:
            problems = cfg.env.problems(f"stages.{name}.env")
            prompt = max(
                agentic.longest_prompt(tokenizer, pool, cfg.env, cfg.thinking)
                for pool in pools.values()
            )
            if prompt + cfg.max_new_tokens > cfg.env.max_episode_tokens:
                problems.append(
                    f"stages.{name}.env.max_episode_tokens={cfg.env.max_episode_tokens}: the "
                    f"longest opening prompt has {prompt} tokens, no room for a turn of "
                    f"max_new_tokens={cfg.max_new_tokens}"
                )
            if problems:
                raise ValueError("; ".join(problems))
            longest_inputs = cfg.env.max_episode_tokens - 1
        else:
            longest = max(
                len(p)
                for pool in pools.values()
                for p in ro.render_prompts(tokenizer, pool, thinking=cfg.thinking)
            )
            longest_inputs = longest + cfg.max_new_tokens - 1
        self.seq_len = -(-longest_inputs // SEQ_MULTIPLE) * SEQ_MULTIPLE
        self.tx = make_optimizer(cfg.optim, cfg.steps)
        if cfg.freeze_router:  # as in Nemotron-3 RL: router frozen, the bias still moves
            self.tx = freeze_router(self.tx)
        self.step_fn = self._build_step()

    # ------------------------------------------------------------------ the step
    def _build_step(self) -> Callable:
        """The pure step `(state, batch, *step_args) -> (state, metrics)` (see `_step_args`)."""
        common = dict(
            graphdef=self.graphdef,
            tx=self.tx,
            lr_fn=lr_schedule(self.cfg.optim, self.cfg.steps),
            moe_bias_rate=self.cfg.moe_bias_rate,
            cfg=self.cfg.loss,
        )
        if self.cfg.type == "grpo":
            return functools.partial(
                grpo.grpo_train_step, temperature=self.cfg.temperature, **common
            )
        if self.cfg.loss.objective != "reverse_kl":
            return functools.partial(distill.distill_train_step, **common)
        # the full-vocabulary KL needs the teachers inside the step: each distinct teacher once
        # (a tuple of traced states), each domain's rows routed by batch["teacher_index"]
        self._teacher_groups = distill.teacher_groups(self.teachers)
        self._teacher_of = {d: k for k, (_, doms) in enumerate(self._teacher_groups) for d in doms}
        step = functools.partial(
            distill.distill_train_step,
            teacher_graphdef=tuple(t.graphdef for t, _ in self._teacher_groups),
            **common,
        )

        def step_fn(state, batch, teacher_state):
            return step(state, batch, teacher_state=teacher_state)

        return step_fn

    def _step_args(self, params: nnx.State, model_state: nnx.State) -> tuple:
        """Traced inputs of every step besides the state and the batch: the reference policy
        (the stage's starting weights) when GRPO has a KL penalty; the MOPD teachers' weights
        for the reverse-KL objective."""
        if self.cfg.type == "grpo":
            if self.cfg.loss.kl_coef <= 0:
                return ()
            # a copy: the loop donates the state's buffers, which would free the reference's
            return (jax.tree.map(jnp.copy, (params, model_state)),)
        if self.cfg.loss.objective == "reverse_kl":
            return (tuple(t.state for t, _ in self._teacher_groups),)
        return ()

    def initial_state(self, params: nnx.State, model_state: nnx.State) -> TrainState:
        """The stage's starting TrainState: the given weights, a fresh optimizer state."""
        return TrainState(
            step=jnp.zeros((), jnp.int32),
            params=params,
            model_state=model_state,
            opt_state=self.tx.init(params),
            rng=jax.random.PRNGKey(self.seed),
        )

    def run(
        self,
        params: nnx.State,
        model_state: nnx.State,
        *,
        stage_dir: str,
        eval_fn: Callable[[TrainState], Mapping[str, float]] | None = None,
        progress: bool = True,
    ) -> LoopResult:
        """Trains from the stage's starting weights in `stage_dir` (resuming from its
        checkpoints); `eval_fn(state) -> {name: score}` runs every `eval_every` steps."""
        loop_cfg = LoopConfig(
            steps=self.cfg.steps,
            checkpoint_every=self.cfg.checkpoint_every,
            keep_checkpoints=1,
            best_metric="",
            eval_every=self.cfg.eval_every,
            max_consecutive_skips=self.cfg.max_consecutive_skips,
            progress=progress,
            async_checkpoint=False,
        )
        if self.cfg.rollout_lag:
            self._ahead = SampleAhead(self._make_batch, last_step=self.cfg.steps, name=self.name)
            if eval_fn is not None:  # the evaluation shares the reward cache: one at a time
                eval_fn = _after(self._ahead.settle, eval_fn)
        try:
            return train_loop(
                config=loop_cfg,
                workdir=os.fspath(stage_dir),
                mesh=self.mesh,
                init=self.initial_state(params, model_state),
                step_fn=self.step_fn,
                source=self,
                eval_fn=eval_fn if self.cfg.eval_every else None,
                eval_on_checkpoint=False,
                step_args=self._step_args(params, model_state),
                progress_keys=("reward_mean", "loss"),
                name=self.name,
            )
        finally:
            if self._ahead is not None:
                self._ahead.close()
                self._ahead = None

    # ------------------------------------------------------------------ the batch source
    def get_state(self) -> dict:
        return {}  # prompt draws and sampling seeds are functions of (seed, stage, step)

    def set_state(self, state: dict) -> None:
        del state

    def _draw(self, step: int, round_: int) -> list[dict]:
        return batching.draw_prompts(
            self.pools,
            self.cfg.prompts_per_step,
            batching.prompt_rng(self.seed, self.name, step, round_),
            self.cfg.domain_weights,
        )

    def _sample(self, weights: Weights, records: list[dict], seed: int) -> ro.Rollouts:
        c = self.cfg
        return ro.sample(
            self.graphdef,
            nnx.merge_state(*weights),
            self.tokenizer,
            records,
            n=c.samples_per_prompt,
            max_new_tokens=c.max_new_tokens,
            temperature=c.temperature,
            top_p=c.top_p,
            seed=seed,
            thinking=c.thinking,
            reward_cache=self.reward_cache,
            num_workers=self.num_workers,
            mesh=self.mesh,
            scorer=self.reward_model,
            slots=c.rollout_slots,
            prefill_chunk=c.rollout_prefill_chunk,
            record_routes=c.routing_replay,
        )

    def _episodes(self, weights: Weights, step: int, round_: int) -> list:
        """One round of an agentic stage: `samples_per_prompt` episodes of each drawn record."""
        c = self.cfg
        return agentic.sample_episodes(
            self.graphdef,
            nnx.merge_state(*weights),
            self.tokenizer,
            self._draw(step, round_),
            env=c.env,
            n=c.samples_per_prompt,
            max_new_tokens=c.max_new_tokens,
            temperature=c.temperature,
            top_p=c.top_p,
            seed=batching.stable_seed(self.seed, self.name, step, round_),
            thinking=c.thinking,
            slots=c.rollout_slots,
            mesh=self.mesh,
            record_routes=c.routing_replay,
        )

    def next_batch(self, state: TrainState, step: int) -> tuple[dict | None, dict[str, Any]]:
        weights = (state.params, state.model_state)
        if self._ahead is None:  # strictly on-policy: sampled from the weights being trained
            return self._make_batch(weights, step)
        return self._ahead.next(weights, step)  # rollout_lag=1: sampled one update ahead

    def _make_batch(self, weights: Weights, step: int) -> tuple[dict | None, dict[str, Any]]:
        """Step `step`'s batch and rollout record, sampled and scored from `weights`."""
        if self.cfg.env.name:  # agentic GRPO: multi-turn episodes (`rl.agentic`)
            batch, record = agentic.episode_batch(
                lambda r: self._episodes(weights, step, r),
                rows=self.rows,
                group_size=self.cfg.samples_per_prompt,
                rounds=self.cfg.max_gen_batches if self.cfg.loss.dynamic_filtering else 1,
                cfg=self.cfg.loss,
                seq_len=self.seq_len,
                pad_id=self.tokenizer.pad_id,
            )
        elif self.cfg.type == "grpo":
            n = self.cfg.samples_per_prompt
            parts, rolls, metrics = batching.collect_groups(
                lambda r: self._sample(
                    weights,
                    self._draw(step, r),
                    batching.stable_seed(self.seed, self.name, step, r),
                ),
                rows=self.rows,
                group_size=n,
                rounds=self.cfg.max_gen_batches if self.cfg.loss.dynamic_filtering else 1,
                cfg=self.cfg.loss,
            )
            batch = self._assemble(parts)
            record = {**_rollout_metrics(rolls), **metrics}
        else:
            seed = batching.stable_seed(self.seed, self.name, step)
            roll = self._sample(weights, self._draw(step, 0), seed)
            rolls, metrics = [roll], {}
            batch = self._assemble([batching.Part(roll, np.arange(len(roll.records)), None)])
            self._add_teacher_inputs(batch, roll.domains)
            record = {**_rollout_metrics(rolls), **metrics}
        if record["reward_error_frac"] > self.cfg.max_reward_error_frac:
            kinds = {
                k.split("/", 1)[1]: int(v)
                for k, v in record.items()
                if k.startswith("reward_errors/") and v
            }
            raise RewardErrors(
                f"stage {self.name} step {step}: the graders (or environments) failed on "
                f"{record['reward_error_frac']:.0%} of the responses (more than "
                f"stages.{self.name}.max_reward_error_frac={self.cfg.max_reward_error_frac}); "
                f"errors by kind: {kinds}. For sandbox errors see "
                "`nemocascade.rewards.sandbox.sandbox_status()`; nothing of this step was "
                "trained on, and the stage resumes from its last checkpoint when rerun."
            )
        return batch, record

    def _assemble(self, parts) -> dict | None:
        return batching.assemble(
            parts, rows=self.rows, seq_len=self.seq_len, pad_id=self.tokenizer.pad_id
        )

    def _add_teacher_inputs(self, batch: dict, row_domains: list[str]) -> None:
        """MOPD: each row's teacher (reverse KL: its index, the step runs the teachers) or the
        teachers' log-probs of the sampled tokens (sampled-token objective)."""
        domains = row_domains + [row_domains[0]] * (self.rows - len(row_domains))
        if self.cfg.loss.objective == "reverse_kl":
            batch["teacher_index"] = np.asarray([self._teacher_of[d] for d in domains], np.int32)
            return
        lp = distill.mopd_teacher_logprobs(
            device_batch(batch, self.mesh, process_local=False),
            self.teachers,
            domains_B=np.asarray(domains),
        )
        batch["teacher_logprobs"] = np.asarray(lp)


def _after(first: Callable[[], None], fn: Callable) -> Callable:
    def wrapped(*args, **kwargs):
        first()
        return fn(*args, **kwargs)

    return wrapped


def _rollout_metrics(rolls: list[ro.Rollouts]) -> dict[str, float]:
    """Per-step rollout statistics: reward over the rows with a verdict (overall and per
    domain), grader errors (fraction, and counts by kind), response length, truncation, and
    generation / reward wall times."""
    rewards = np.concatenate([r.rewards for r in rolls])
    errors = np.concatenate([np.asarray(r.errors, bool) for r in rolls])
    domains = np.asarray([d for r in rolls for d in r.domains])
    ok = ~errors
    out = {
        "reward_mean": float(rewards[ok].mean()) if ok.any() else 0.0,
        "reward_error_frac": float(errors.mean()),
        "response_len": float(np.mean(np.concatenate([r.response_lengths() for r in rolls]))),
        "truncated_frac": float(1.0 - np.mean(np.concatenate([r.finished for r in rolls]))),
        "rollout_s": sum(
            r.timings.get("prefill_s", 0) + r.timings.get("decode_s", 0) for r in rolls
        ),
        "reward_s": sum(r.timings.get("reward_s", 0) for r in rolls),
    }
    for d, v in ro.domain_means(rewards[ok], list(domains[ok])).items():
        out[f"reward/{d}"] = v
    truth = [r.reward_metrics.get("ground_truth") for r in rolls]
    if all(t is not None for t in truth):  # a learned reward: the verifiers' view beside it
        truth = np.concatenate(truth)
        known = ~np.isnan(truth)
        if known.any():
            out["ground_truth_mean"] = float(truth[known].mean())
            for d, v in ro.domain_means(truth[known], list(domains[known])).items():
                out[f"ground_truth/{d}"] = v
        for k in {k for r in rolls for k in r.reward_metrics if k.startswith("rm/")}:
            vals = [
                r.reward_metrics[k]
                for r in rolls
                if isinstance(r.reward_metrics.get(k), int | float)
            ]
            if vals:
                out[k] = float(np.mean(vals))
    for r in rolls:  # grader error counts by kind (timeouts, sandbox errors, ...)
        for k, v in r.reward_metrics.items():
            if k.startswith("rewards/errors/kind/") and isinstance(v, int | float):
                key = "reward_errors/" + k.rsplit("/", 1)[1]
                out[key] = out.get(key, 0) + v
    return out
