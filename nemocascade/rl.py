"""One RL stage of the Cascade: GRPO against verifiers, or MOPD from per-domain teachers.

Each step (strictly on-policy, one update per rollout batch, as in Cascade 2):
  1. draw `prompts_per_step` prompts of the stage's domains (deterministic in seed and step);
  2. sample `samples_per_prompt` responses each from the current policy;
  3. GRPO: verifier rewards -> group-normalised advantages; dynamic filtering drops groups whose
     rewards are all equal and samples more prompts until the batch is full (at most
     `max_gen_batches` rounds); MOPD: each row's domain teacher scores the sampled tokens
     (`loss.objective="reverse_kl"`: the teachers run inside the step, full-vocabulary KL);
  4. one optimizer update (`train.grpo` / `train.distill` steps, jitted once per stage).
Checkpoints every `checkpoint_every` steps (and on SIGTERM, which then raises `Preempted`) make
the stage resumable; metrics go to `<stage dir>/metrics.jsonl` (+ TensorBoard) with the
per-domain reward means.
"""

from __future__ import annotations

import functools
import logging
import os
import random
import time
import zlib
from collections.abc import Callable, Mapping
from typing import Any

import jax
import numpy as np
from flax import nnx

from nemocascade import rollouts as ro
from nemocascade.data.chat import render_prompt
from nemocascade.sharding import batch_sharding
from nemocascade.train import distill, grpo
from nemocascade.train.checkpoint import Checkpointer
from nemocascade.train.loop import StopFlag, full_shardings
from nemocascade.train.metrics import MetricsWriter
from nemocascade.train.state import TrainState

log = logging.getLogger(__name__)
SEQ_MULTIPLE = 16  # the train step's sequence length is a multiple of this


def _prompt_rng(seed: int, stage: str, step: int, round_: int) -> random.Random:
    return random.Random(f"{seed}/{stage}/{step}/{round_}")


def draw_prompts(
    pools: Mapping[str, list[dict]],
    count: int,
    rng: random.Random,
    weights: Mapping[str, float] | None = None,
) -> list[dict]:
    """`count` prompt records, domains mixed by `weights` (default uniform), without replacement
    within a domain for this draw."""
    domains = sorted(pools)
    w = np.array([float((weights or {}).get(d, 1.0)) for d in domains])
    per = np.floor(count * w / w.sum()).astype(int)
    for i in range(count - per.sum()):
        per[i % len(domains)] += 1
    out = []
    for d, k in zip(domains, per, strict=True):
        out.extend(rng.sample(pools[d], min(int(k), len(pools[d]))))
    rng.shuffle(out)
    return out


class Preempted(RuntimeError):
    """A stage stopped on SIGTERM after saving a checkpoint; running the job again resumes it."""


def _seed(*parts) -> int:
    """A stable 31-bit seed from `parts` (Python's hash() of strings varies between processes)."""
    return zlib.crc32("/".join(map(str, parts)).encode()) & 0x7FFFFFFF


class RLStage:
    """Runs one GRPO or MOPD stage from `state` (fresh optimizer state) for `cfg["steps"]` steps.

    cfg keys: type, domains, steps, prompts_per_step, samples_per_prompt, max_new_tokens,
    temperature, top_p, thinking, max_gen_batches (GRPO dynamic-filtering refills),
    checkpoint_every, domain_weights, moe_bias_rate, freeze_router, loss (GRPOConfig or
    DistillConfig fields).
    """

    def __init__(
        self,
        *,
        name: str,
        cfg: Mapping[str, Any],
        stage_dir: str,
        graphdef: nnx.GraphDef,
        tx,
        lr_fn,
        tokenizer,
        pools: Mapping[str, list[dict]],
        seed: int,
        teachers: Mapping[str, distill.Teacher] | None = None,
        reward_cache: ro.RewardCache | None = None,
        num_workers: int = 2,
        progress: bool = True,
        mesh=None,
    ):
        if cfg["type"] not in ("grpo", "mopd"):
            raise ValueError(f"stage {name}: RLStage runs 'grpo' or 'mopd', not {cfg['type']!r}")
        if cfg["type"] == "mopd":
            missing = sorted(set(pools) - set(teachers or {}))
            if missing:
                raise ValueError(f"stage {name}: no teacher for domains {missing}")
        self.name, self.cfg, self.stage_dir = name, cfg, stage_dir
        self.graphdef, self.tokenizer = graphdef, tokenizer
        self.pools, self.seed, self.teachers = pools, seed, dict(teachers or {})
        self.reward_cache = reward_cache or ro.RewardCache()
        self.num_workers, self.progress, self.mesh = num_workers, progress, mesh
        self.rows = int(cfg["prompts_per_step"]) * int(cfg["samples_per_prompt"])
        self._step_kwargs: dict[str, Any] = {}  # traced per-call arguments (reverse-KL teachers)
        # One sequence length for the whole stage (longest prompt + max_new_tokens - 1 inputs,
        # rounded up to a multiple of 16, not a power of two: up to 1.9x less work per step), so
        # the train step compiles once.
        longest = max(
            len(
                render_prompt(
                    tokenizer, r.get("messages") or r.get("prompt"), thinking=bool(cfg["thinking"])
                )
            )
            for pool in pools.values()
            for r in pool
        )
        self.seq_len = -(-(longest + int(cfg["max_new_tokens"]) - 1) // SEQ_MULTIPLE) * SEQ_MULTIPLE
        common = dict(
            graphdef=graphdef,
            tx=tx,
            lr_fn=lr_fn,
            moe_bias_rate=float(cfg.get("moe_bias_rate", 0.0)),
        )
        if cfg["type"] == "grpo":
            self.loss_cfg = grpo.GRPOConfig(**dict(cfg["loss"]))
            step = functools.partial(grpo.grpo_train_step, cfg=self.loss_cfg, **common)
        else:
            self.loss_cfg = distill.DistillConfig.from_mapping(dict(cfg["loss"]))
            if self.loss_cfg.objective == "reverse_kl":
                # the full-vocabulary KL needs the teachers inside the step: each distinct
                # teacher once (a tuple), each domain's rows routed by batch["teacher_index"]
                groups = distill.teacher_groups(self.teachers)
                self._teacher_of = {d: k for k, (_, doms) in enumerate(groups) for d in doms}
                self._step_kwargs = {"teacher_state": tuple(t.state for t, _ in groups)}
                common["teacher_graphdef"] = tuple(t.graphdef for t, _ in groups)
            step = functools.partial(distill.distill_train_step, cfg=self.loss_cfg, **common)
        self._step = jax.jit(step, donate_argnums=0)

    # ------------------------------------------------------------------ rollouts
    def _draw(self, step: int, round_: int) -> list[dict]:
        return draw_prompts(
            self.pools,
            int(self.cfg["prompts_per_step"]),
            _prompt_rng(self.seed, self.name, step, round_),
            self.cfg.get("domain_weights"),
        )

    def _sample(self, state: TrainState, records: list[dict], seed: int) -> ro.Rollouts:
        c = self.cfg
        model_state = nnx.merge_state(state.params, state.model_state)
        return ro.sample(
            self.graphdef,
            model_state,
            self.tokenizer,
            records,
            n=int(c["samples_per_prompt"]),
            max_new_tokens=int(c["max_new_tokens"]),
            temperature=float(c["temperature"]),
            top_p=float(c["top_p"]),
            seed=seed,
            thinking=bool(c["thinking"]),
            reward_cache=self.reward_cache,
            num_workers=self.num_workers,
            mesh=self.mesh,
        )

    def _to_device(self, batch: dict[str, np.ndarray]) -> dict[str, jax.Array]:
        """The batch laid out over the mesh's batch axes (rows must divide evenly)."""
        if self.mesh is None:
            return jax.tree.map(jax.numpy.asarray, batch)
        return {k: jax.device_put(v, batch_sharding(self.mesh, v.ndim)) for k, v in batch.items()}

    def _grpo_batch(self, state: TrainState, step: int):
        """Rollouts until `self.rows` rows of informative groups (dynamic filtering) or the cap."""
        n = int(self.cfg["samples_per_prompt"])
        parts, total, seen, dropped, rolls = [], 0, 0, 0.0, []
        rounds = int(self.cfg["max_gen_batches"]) if self.loss_cfg.dynamic_filtering else 1
        for round_ in range(rounds):
            roll = self._sample(
                state, self._draw(step, round_), seed=_seed(self.seed, self.name, step, round_)
            )
            rolls.append(roll)
            prep = grpo.prepare_advantages(roll.rewards, n, self.loss_cfg, truncated=~roll.finished)
            groups = len(roll.rewards) // n
            seen += groups
            dropped += prep["filtered_fraction"] * groups
            room = (
                (self.rows - total) // n * n
            )  # whole groups only: a cut group biases its baseline
            rows = np.flatnonzero(prep["keep"])[:room]
            if rows.size:
                parts.append((roll, rows, prep))
                total += rows.size
            if self.rows - total < n:
                break
        metrics = {"groups_filtered_frac": dropped / max(seen, 1), "gen_rounds": len(rolls)}
        return parts, rolls, metrics

    def _assemble(self, parts) -> dict[str, np.ndarray] | None:
        """Concatenates rows of several rollout rounds into one batch of exactly `self.rows` rows
        (empty rows, loss_mask 0, pad the rest) and one length bucket."""
        if not parts:
            return None
        arrays: dict[str, list[np.ndarray]] = {}
        for roll, rows, extra in parts:
            b = ro.training_batch(
                roll,
                rows=rows,
                seq_len=self.seq_len,
                pad_id=self.tokenizer.pad_id,
                behaviour="policy" if self.cfg["type"] == "grpo" else "sampled",
            )
            if extra is not None:  # GRPO: advantages, and overlong filtering through the mask
                b["advantages"] = np.asarray(extra["advantages"], np.float32)[rows]
                b["loss_mask"] *= np.asarray(extra["sample_weight"], np.float32)[rows][:, None]
            for k, v in b.items():
                arrays.setdefault(k, []).append(v)
        batch = {k: np.concatenate(v) for k, v in arrays.items()}
        short = self.rows - batch["input_ids"].shape[0]
        if short > 0:
            batch = {
                k: np.concatenate([v, np.zeros((short,) + v.shape[1:], v.dtype)])
                for k, v in batch.items()
            }
        return batch

    # ------------------------------------------------------------------ the loop
    def run(
        self,
        state: TrainState,
        *,
        on_step: Callable[[dict], None] | None = None,
        eval_fn: Callable[[TrainState], Mapping[str, float]] | None = None,
    ) -> TrainState:
        """`eval_fn(state) -> {domain: score}` runs every `cfg["eval_every"]` steps (0: never);
        its scores are logged as `eval/<domain>` with that step's metrics (a held-out learning
        curve within the stage)."""
        c = self.cfg
        eval_every = int(c.get("eval_every", 0) or 0)
        steps = int(c["steps"])
        ckpt = Checkpointer(
            os.path.join(self.stage_dir, "checkpoints"), keep_last=1, async_save=False
        )
        abstract = jax.tree.map(
            lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding), state
        )
        restored = ckpt.restore_latest(abstract)
        start = 0
        if restored is not None:
            start, state, _, _ = restored
            log.info("stage %s: resumed at step %d", self.name, start)
        if self.mesh is not None:  # committed, sharded by the logical table: one compiled step
            state = jax.device_put(state, full_shardings(state, self.mesh))
        writer = MetricsWriter(self.stage_dir, enabled=jax.process_index() == 0, resume_step=start)
        stop = StopFlag()
        stop.install()
        bar = None
        if self.progress and start < steps:
            from tqdm import tqdm

            bar = tqdm(total=steps, initial=start, desc=self.name, dynamic_ncols=True)
        try:
            for step in range(start + 1, steps + 1):
                t0 = time.perf_counter()
                state, record = self._one_step(state, step)
                record["step_s"] = time.perf_counter() - t0
                if eval_fn is not None and eval_every > 0 and step % eval_every == 0:
                    record.update({f"eval/{d}": v for d, v in eval_fn(state).items()})
                record = writer.write(step, record)
                if on_step is not None:
                    on_step(record)
                if bar is not None:
                    bar.update(1)
                    bar.set_postfix(
                        reward=f"{record['reward_mean']:.2f}", s=f"{record['step_s']:.1f}"
                    )
                stopping = stop.check(step)
                if step % int(c["checkpoint_every"]) == 0 or step == steps or stopping:
                    ckpt.save(step, state, {}, extra={"stage": self.name})
                if stopping:
                    raise Preempted(
                        f"stage {self.name}: SIGTERM at step {step}/{steps}; "
                        "checkpoint saved, run the same command again to resume"
                    )
        finally:
            stop.uninstall()
            if bar is not None:
                bar.close()
            writer.close()
            ckpt.close()
        return state

    def _one_step(self, state: TrainState, step: int) -> tuple[TrainState, dict]:
        if self.cfg["type"] == "grpo":
            parts, rolls, extra_metrics = self._grpo_batch(state, step)
            batch = self._assemble(parts)
        else:
            roll = self._sample(state, self._draw(step, 0), seed=_seed(self.seed, self.name, step))
            rolls, extra_metrics = [roll], {}
            batch = self._assemble([(roll, np.arange(len(roll.records)), None)])
            domains = roll.domains + [roll.domains[0]] * (self.rows - len(roll.domains))
            if self.loss_cfg.objective == "reverse_kl":  # the step runs the teachers
                batch["teacher_index"] = np.asarray(
                    [self._teacher_of[d] for d in domains], np.int32
                )
            else:
                batch["teacher_logprobs"] = np.asarray(
                    distill.mopd_teacher_logprobs(
                        self._to_device(batch), self.teachers, domains_B=np.asarray(domains)
                    )
                )
        rewards = np.concatenate([r.rewards for r in rolls])
        domains = [d for r in rolls for d in r.domains]
        record: dict[str, Any] = {
            "reward_mean": float(rewards.mean()),
            "response_len": float(np.mean(np.concatenate([r.response_lengths() for r in rolls]))),
            "truncated_frac": float(1.0 - np.mean(np.concatenate([r.finished for r in rolls]))),
            "rollout_s": sum(
                r.timings.get("prefill_s", 0) + r.timings.get("decode_s", 0) for r in rolls
            ),
            "reward_s": sum(r.timings.get("reward_s", 0) for r in rolls),
            **extra_metrics,
        }
        for d, v in ro.domain_means(rewards, domains).items():
            record[f"reward/{d}"] = v
        if batch is None:  # every group was uninformative and the refill cap was hit
            record.update(loss=0.0, skipped=1)
            return state, record
        t0 = time.perf_counter()
        state, metrics = self._step(state, self._to_device(batch), **self._step_kwargs)
        record.update({k: float(v) for k, v in jax.device_get(metrics).items() if np.ndim(v) == 0})
        record["train_s"] = time.perf_counter() - t0
        return state, record
