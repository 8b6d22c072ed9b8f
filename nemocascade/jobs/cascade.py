"""The Cascade pipeline: ordered stages (SFT, GRPO, MOPD), per-domain evaluation after each stage,
and the registry of the best checkpoint per domain (the MOPD teachers, as in Cascade 2 §4.4).

    python -m nemocascade.launch --config=configs/tiny_cascade.py --workdir=DIR

Config (see configs/tiny_cascade.py for a complete example; every section is typed):
    seed, progress, num_workers, export_hf, model_path, model (ModelConfig; vocab_size is raised
    to the tokenizer's if needed), mesh (MeshConfig),
    tokenizer  {path: "" -> train a BPE on the task texts, vocab_size, split_digits}
    data       {source: "synthetic" | "jsonl", train_per_domain, train_counts: {domain: n},
                eval_per_domain, paths: {domain: {sft, rl, eval}} for jsonl}
    eval       EvalConfig {n_samples, temperature, top_p, max_new_tokens, thinking}
    stage_order  comma-separated stage names, run in this order
    stages.<name>  SFTStageConfig (type sft) or RLStageConfig (type grpo | mopd; a grpo stage
                   with an `env` section is agentic: multi-turn tool episodes, e.g. swe_rl), see
                   `jobs.stages`; an RL stage with eval_every=k evaluates every domain every k
                   steps (`eval/<domain>` in its metrics.jsonl: the held-out learning curve);
                   `start_from: <earlier stage>` makes a side branch (it starts from that
                   stage; the main chain goes on from the last stage without start_from);
                   an MOPD stage's `teachers: {domain: stage or HF checkpoint dir}` overrides
                   the default teacher, the domain's best evaluated checkpoint so far

Every stage is validated before anything trains (`jobs.validate`).

Outputs in DIR: summary.json ({"stages": [{"name", "type", "domains", "eval": {domain: score},
"eval_ci95", "paired_ci95": {reference stage: {domain: [difference, low, high]}} (against its
start; MOPD: and each teacher), "episodes": {domain: episode metrics} for domains evaluated by
episodes}], "teachers": {domain: stage}}), report.md (stages x domains, best per domain marked),
scores.png, and per stage DIR/stages/<name>/ (metrics.jsonl, eval_problems.json, checkpoints/:
the last one holds the stage's final weights). Re-running the command resumes: finished stages
are skipped (their final weights reloaded), an interrupted stage continues from its last
checkpoint.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import time
from collections.abc import Mapping
from typing import Any

from flax import nnx

from nemocascade import rewards as rw
from nemocascade.jobs.cascade_data import (
    CascadeDataConfig,
    DomainRecords,
    TokenizerConfig,
    run_tokenizer,
)
from nemocascade.jobs.evaluation import EvalConfig, episode_envs, evaluate_domains, paired_deltas
from nemocascade.jobs.identity import model_identity, tokenizer_identity
from nemocascade.jobs.preflight import check_disk, state_bytes
from nemocascade.jobs.registry import register_job
from nemocascade.jobs.report import write_report
from nemocascade.jobs.reward_stage import EXPORT_DIR, run_reward_stage
from nemocascade.jobs.sft import PackingConfig, run_sft_stage
from nemocascade.jobs.stages import (
    RewardModelStageConfig,
    SFTStageConfig,
    StageConfig,
    parse_stage,
)
from nemocascade.jobs.validate import check_finished_exports, validate_stages
from nemocascade.model import ModelConfig, NemotronH, load_hf_checkpoint, save_hf_checkpoint
from nemocascade.rl import RLStage, RLStageConfig
from nemocascade.sharding import MeshConfig, batch_shards, make_mesh
from nemocascade.train import distill
from nemocascade.train.checkpoint import Checkpointer, abstract_with_shardings
from nemocascade.train.loop import CHECKPOINT_DIR, LoopConfig, Preempted, full_shardings
from nemocascade.train.state import split_model
from nemocascade.typed_config import from_mapping

log = logging.getLogger(__name__)
STAGE_PREFIX = "stage:"  # reward_model_path="stage:<name>": that reward_model stage's export


def record_stage(summary: dict, entry: Mapping[str, Any]) -> None:
    """Updates the registry of the best checkpoint per domain (`summary["best"]` scores and
    `summary["teachers"]` stage names) with one evaluated stage; ties keep the earlier stage."""
    for d, s in entry["eval"].items():
        if d not in summary["best"] or s > summary["best"][d]:
            summary["best"][d] = s
            summary["teachers"][d] = entry["name"]


@dataclasses.dataclass
class CascadePlan:
    """A cascade config read into typed sections and validated (`jobs.validate`): what runs,
    on which data, on which mesh. Building it reads the data but writes nothing."""

    order: list[str]
    stages: dict[str, StageConfig]
    domains: list[str]
    data: CascadeDataConfig
    eval: EvalConfig
    tokenizer: TokenizerConfig
    mesh: Any
    records: DomainRecords

    @classmethod
    def check(cls, config) -> CascadePlan:
        order = [s.strip() for s in str(config.stage_order).split(",") if s.strip()]
        unknown = [s for s in order if s not in config.stages]
        if unknown:
            raise KeyError(
                f"stage_order names stages {unknown} not in config.stages ({sorted(config.stages)})"
            )
        stages = {name: parse_stage(name, config.stages[name]) for name in order}
        data = from_mapping(CascadeDataConfig, config.data, "data")
        tokenizer = from_mapping(TokenizerConfig, config.tokenizer, "tokenizer")
        if not tokenizer.path and data.source != "synthetic":
            raise ValueError("tokenizer.path is required unless data.source='synthetic'")
        domains = sorted({d for st in stages.values() for d in st.domains})
        unused = sorted(set(data.train_counts) - set(domains))
        if unused:
            raise ValueError(f"data.train_counts names domains no stage trains: {unused}")
        mesh = make_mesh(from_mapping(MeshConfig, config.mesh, "mesh"))
        records = DomainRecords(data, int(config.seed))
        validate_stages(
            order,
            stages,
            eval_domains=domains,
            records=records,
            batch_shards=batch_shards(mesh),
        )
        eval_cfg = from_mapping(EvalConfig, config.eval, "eval")
        return cls(order, stages, domains, data, eval_cfg, tokenizer, mesh, records)


class Cascade:
    """Holds the run's tokenizer, data, model structure and results; `run()` executes the stages."""

    def __init__(self, config, workdir: str):
        self.config, self.workdir = config, os.path.abspath(workdir)
        self.seed = int(config.seed)
        plan = CascadePlan.check(config)  # every stage validated before anything is written
        self.order, self.stages, self.domains = plan.order, plan.stages, plan.domains
        self.data_cfg, self.eval_cfg, self.mesh = plan.data, plan.eval, plan.mesh
        self._records = plan.records
        tokenizer_cfg = plan.tokenizer
        os.makedirs(self.workdir, exist_ok=True)
        self.tokenizer = run_tokenizer(
            tokenizer_cfg, self.data_cfg, self.workdir, self.seed, self.domains
        )
        model_cfg = ModelConfig.from_mapping(config.model)
        self.model_cfg = model_cfg.replace(
            vocab_size=max(model_cfg.vocab_size, self.tokenizer.vocab_size)
        )
        abstract = nnx.eval_shape(
            lambda: NemotronH(self.model_cfg, rngs=nnx.Rngs(self.seed), mesh=self.mesh)
        )
        self.graphdef, abs_params, abs_rest = split_model(abstract)
        weights = {"params": abs_params, "model_state": abs_rest}
        # finished stages' weights are restored straight into their shardings on the mesh
        self.abstract_weights = abstract_with_shardings(weights, full_shardings(weights, self.mesh))
        self.eval_sets = {d: self._records(d, "eval") for d in self.domains}
        # agentic domains (e.g. swe) are evaluated by episodes in their environment
        self.eval_envs = episode_envs(self.order, self.stages, self.eval_sets)
        self.reward_cache = rw.RewardCache()
        self.results_path = os.path.join(self.workdir, "summary.json")

    # ------------------------------------------------------------------ weights
    def _stage_dir(self, name: str) -> str:
        return os.path.join(self.workdir, "stages", name)

    def _load_final(self, name: str):
        """A finished stage's final weights: params and model state of its last checkpoint, read
        through a read-only `Checkpointer` (the stage's directory is never touched)."""
        ckpt = Checkpointer(os.path.join(self._stage_dir(name), CHECKPOINT_DIR), read_only=True)
        try:
            steps = ckpt.all_steps()
            if not steps:
                raise FileNotFoundError(
                    f"stage {name}: no checkpoint in {self._stage_dir(name)}/{CHECKPOINT_DIR} "
                    "(summary.json lists it as finished)"
                )
            out = ckpt.restore_fields(steps[-1], self.abstract_weights)
        finally:
            ckpt.close()
        return out["params"], out["model_state"]

    def _init_weights(self):
        """The starting weights: `model_path` (HF safetensors) if set, else a random init."""
        path = self.config.model_path
        if path:  # built from config.model; every checkpoint tensor is checked against it
            model = load_hf_checkpoint(path, config=self.model_cfg, mesh=self.mesh)
        else:
            model = NemotronH(self.model_cfg, rngs=nnx.Rngs(self.seed), mesh=self.mesh)
        _, params, rest = split_model(model)
        return params, rest

    def evaluate(
        self,
        params,
        model_state,
        episodes: dict | None = None,
        domains=None,
        intervals=None,
        n_samples: int = 0,
        problems=None,
    ) -> dict[str, float]:
        """Held-out score (percent) of every domain, or of `domains` (`jobs.evaluation`), from
        `n_samples` per prompt (0: the eval section's); the episode metrics of the agentic
        domains go to `episodes`, the 95% intervals of the verifier-graded ones to `intervals`,
        when given."""
        eval_sets = self.eval_sets
        if domains is not None:
            eval_sets = {d: eval_sets[d] for d in domains}
        return evaluate_domains(
            self.graphdef,
            nnx.merge_state(params, model_state),
            self.tokenizer,
            eval_sets,
            dataclasses.replace(self.eval_cfg, n_samples=n_samples or self.eval_cfg.n_samples),
            seed=self.seed,
            reward_cache=self.reward_cache,
            num_workers=int(self.config.num_workers),
            mesh=self.mesh,
            envs=self.eval_envs,
            episodes=episodes,
            intervals=intervals,
            problems=problems,
        )

    # ------------------------------------------------------------------ stages
    def _run_sft(self, name: str, cfg: SFTStageConfig, params, model_state):
        records = [
            r
            for d in cfg.domains
            for r in self._records(d, "sft")[: cfg.records_per_domain.get(d)]
            * int(cfg.domain_repeats.get(d, 1))
        ]
        loop = LoopConfig(
            steps=cfg.steps,
            checkpoint_every=min(cfg.checkpoint_every, cfg.steps),
            keep_checkpoints=1,
            best_metric="",
            eval_every=cfg.eval_every,
            progress=bool(self.config.progress),
            async_checkpoint=False,
        )
        scores_fn = until = None
        if cfg.eval_every:  # the learning curve; with stop_at, only its domains decide the end
            watched = tuple(cfg.stop_at) or tuple(d for d in cfg.domains if d in self.eval_sets)

            def scores_fn(state):
                scores = self.evaluate(
                    state.params, state.model_state, domains=watched, n_samples=cfg.eval_samples
                )
                return {f"eval/{d}": v for d, v in scores.items()}

        if cfg.stop_at:

            def until(metrics):
                return all(metrics[f"eval/{d}"] >= float(s) for d, s in cfg.stop_at.items())

        packing = PackingConfig(
            seq_len=cfg.seq_len,
            global_batch=cfg.batch_size,
            thinking=cfg.thinking,
            non_thinking_fraction=cfg.non_thinking_fraction,
            overlong=cfg.overlong,
            buckets=cfg.buckets,
        )
        return run_sft_stage(
            workdir=self._stage_dir(name),
            mesh=self.mesh,
            model_cfg=self.model_cfg,
            graphdef=self.graphdef,
            weights=(params, model_state),
            tokenizer=self.tokenizer,
            train_records=records,
            packing=packing,
            optim=cfg.optim,
            loop=loop,
            loss_chunk_size=cfg.loss_chunk_size,
            seed=self.seed,
            name=name,
            scores_fn=scores_fn,
            until=until,
        )

    def _teachers(self, name: str, cfg: RLStageConfig, best: Mapping[str, str]):
        """MOPD: each domain's teacher: `cfg.teachers[domain]` (a stage name or a Hugging Face
        checkpoint directory), else its best evaluated stage so far; each checkpoint loaded
        once."""
        teachers, loaded = {}, {}
        for d in cfg.domains:
            src = cfg.teachers.get(d) or best.get(d)
            if src is None:
                raise ValueError(
                    f"stage {name}: no teacher yet for domain {d!r} (no earlier stage evaluated it)"
                )
            if src not in loaded:  # a checkpoint that teaches several domains is held once
                loaded[src] = distill.Teacher(self.graphdef, self._teacher_weights(src))
            teachers[d] = loaded[src]
        return teachers

    def _teacher_weights(self, src: str):
        if src in self.stages:
            return self._load_final(src)
        # a Hugging Face checkpoint must match the student's architecture and vocabulary
        # (load_hf_checkpoint names every tensor whose shape differs)
        model = load_hf_checkpoint(src, config=self.model_cfg, mesh=self.mesh)
        return split_model(model)[1:]

    def _reward_model(self, name: str, cfg: RLStageConfig):
        """The learned reward of an RLHF-style stage (None for verifier rewards): its checkpoint
        (`stage:<name>` is a reward_model stage's export) built into a scorer on the mesh."""
        if cfg.type != "grpo" or cfg.reward == "verifier":
            return None
        from nemocascade.rewards.reward_models import build_reward_model

        path = cfg.reward_model_path
        if path.startswith(STAGE_PREFIX):
            path = os.path.join(self._stage_dir(path[len(STAGE_PREFIX) :]), EXPORT_DIR)
        return build_reward_model(
            cfg.reward_model_config(path, f"stages.{name}"),
            policy_config=self.model_cfg,
            policy_tokenizer=self.tokenizer,
            mesh=self.mesh,
        )

    def _run_reward_model(self, name: str, cfg: RewardModelStageConfig, params, model_state):
        return run_reward_stage(
            name=name,
            cfg=cfg,
            stage_dir=self._stage_dir(name),
            pairs=[p for d in cfg.domains for p in self._records(d, "pairs")],
            tokenizer=self.tokenizer,
            model_cfg=self.model_cfg,
            policy_graphdef=self.graphdef,
            params=params,
            model_state=model_state,
            mesh=self.mesh,
            seed=self.seed,
            progress=bool(self.config.progress),
        )

    def _run_rl(self, name: str, cfg: RLStageConfig, params, model_state, best_teachers):
        stage = RLStage(
            name=name,
            cfg=cfg,
            graphdef=self.graphdef,
            tokenizer=self.tokenizer,
            pools={d: self._records(d, "rl") for d in cfg.domains},
            seed=self.seed,
            teachers=self._teachers(name, cfg, best_teachers) if cfg.type == "mopd" else None,
            reward_cache=self.reward_cache,
            reward_model=self._reward_model(name, cfg),
            num_workers=int(self.config.num_workers),
            mesh=self.mesh,
        )

        def eval_fn(state):
            scores = self.evaluate(state.params, state.model_state)
            return {f"eval/{d}": v for d, v in scores.items()}

        return stage.run(
            params,
            model_state,
            stage_dir=self._stage_dir(name),
            eval_fn=eval_fn,
            progress=bool(self.config.progress),
        )

    # ------------------------------------------------------------------ the pipeline
    def _load_summary(self) -> dict:
        if os.path.exists(self.results_path):
            with open(self.results_path) as f:
                return json.load(f)
        return {"stages": [], "teachers": {}, "best": {}}

    def _write_summary(self, summary: dict) -> None:
        tmp = self.results_path + ".tmp"
        with open(tmp, "w") as f:
            json.dump(summary, f, indent=2)
        os.replace(tmp, self.results_path)
        write_report(summary, self.workdir, self.domains)

    def run(self) -> dict[str, Any]:
        summary = self._load_summary()
        done = {s["name"] for s in summary["stages"]}
        check_finished_exports(self.order, self.stages, done, self._stage_dir, self.results_path)
        chain = None  # the last finished main-chain stage (side branches have a start_from)
        weights = None  # its (params, model_state) when they are in memory
        for name in self.order:
            cfg = self.stages[name]
            main_chain = not cfg.start_from and not isinstance(cfg, RewardModelStageConfig)
            if name in done:
                if main_chain:
                    chain, weights = name, None
                continue
            t0 = time.perf_counter()
            start = cfg.start_from or chain
            log.info("stage %s (%s) on %s from %s", name, cfg.type, cfg.domains, start or "init")
            if cfg.start_from or weights is None:
                params, model_state = self._load_final(start) if start else self._init_weights()
            else:
                params, model_state = weights
            extra: dict[str, Any] = {}
            if isinstance(cfg, SFTStageConfig):
                result = self._run_sft(name, cfg, params, model_state)
                extra["steps_done"] = int(result.record.get("step", cfg.steps))
                if result.stopped_early:  # stop_at reached: the measured scores that ended it
                    extra["stop_at"] = dict(cfg.stop_at)
                    extra["stopped_at"] = {
                        k[len("eval/") :]: float(v)
                        for k, v in result.record.items()
                        if k.startswith("eval/")
                    }
            elif isinstance(cfg, RewardModelStageConfig):
                result, extra["rm_eval"] = self._run_reward_model(name, cfg, params, model_state)
            else:
                result = self._run_rl(name, cfg, params, model_state, summary["teachers"])
            if result.preempted:  # never go on to the next stage with a partly trained model
                raise Preempted(
                    f"stage {name}: SIGTERM at step {result.record.get('step')}/{cfg.steps}; "
                    "checkpoint saved, run the same command again to resume"
                )
            train_s = time.perf_counter() - t0
            if isinstance(cfg, RewardModelStageConfig):  # not a policy: no held-out scores
                scores = {}
            else:
                params, model_state = result.state.params, result.state.model_state
                if main_chain:
                    chain, weights = name, (params, model_state)
                episodes: dict[str, dict[str, float]] = {}
                intervals: dict[str, list] = {}
                problems: dict[str, list[float]] = {}
                scores = self.evaluate(
                    params, model_state, episodes, intervals=intervals, problems=problems
                )
                extra["eval_ci95"] = intervals  # over problems, normal approximation
                refs = [start]  # paired differences against the start and MOPD's teachers
                if cfg.type == "mopd":
                    refs += [cfg.teachers.get(d) or summary["teachers"].get(d) for d in cfg.domains]
                extra["paired_ci95"] = paired_deltas(
                    problems,
                    self._stage_dir(name),
                    {r: self._stage_dir(r) for r in refs if r in self.stages},
                )
                if episodes:  # success by number of turns, finish reasons, ... per domain
                    extra["episodes"] = episodes
            entry = {
                "name": name,
                "type": cfg.type,
                "domains": list(cfg.domains),
                "start_from": start or "",
                "eval": scores,
                **extra,
                "train_s": round(train_s, 1),
                "eval_s": round(time.perf_counter() - t0 - train_s, 1),
            }
            summary["stages"].append(entry)
            record_stage(summary, entry)
            self._write_summary(summary)
            log.info("stage %s: eval %s (%.0fs)", name, scores, time.perf_counter() - t0)
            shown = scores or {k: v for k, v in extra.get("rm_eval", {}).items() if "acc" in k}
            print(
                f"[cascade] {name:>10s} ({cfg.type}): "
                + "  ".join(f"{d}={s:5.1f}" for d, s in shown.items()),
                flush=True,
            )
        if self.config.export_hf and chain is not None:
            params, model_state = weights or self._load_final(chain)
            model = nnx.merge(self.graphdef, params, model_state)
            save_hf_checkpoint(model, os.path.join(self.workdir, "hf"))
            self.tokenizer.save(os.path.join(self.workdir, "hf", "tokenizer.json"))
        final = dict(summary["stages"][-1]["eval"]) if summary["stages"] else {}
        return {"final_" + d: v for d, v in final.items()}


def cascade_preflight(config, workdir: str) -> None:
    """Before anything is written: every stage validated, and room on disk for every stage's
    final checkpoint (weights and optimizer state)."""
    plan = CascadePlan.check(config)
    model_cfg = ModelConfig.from_mapping(config.model)
    params = nnx.eval_shape(lambda: NemotronH(model_cfg, rngs=nnx.Rngs(0)))
    per_stage = 3 * state_bytes(nnx.state(params))  # weights + two Adam moments
    check_disk(workdir, len(plan.order) * per_stage, f"{len(plan.order)} stage checkpoints")


def cascade_identity(config) -> dict[str, Any]:
    """What a cascade run's checkpoints and tokenizer depend on (`jobs.identity`)."""
    return {
        "job": "cascade",
        "model": model_identity(config.model),
        "tokenizer": tokenizer_identity(config.tokenizer.path),
    }


@register_job("cascade", identity=cascade_identity, preflight=cascade_preflight)
def run_cascade(config, workdir: str) -> dict[str, Any]:
    """The Cascade pipeline job (see the module docstring)."""
    return Cascade(config, workdir).run()
