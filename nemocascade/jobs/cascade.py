"""The Cascade pipeline: ordered stages (SFT, GRPO, MOPD), per-domain evaluation after each stage,
and the registry of the best checkpoint per domain (the MOPD teachers, as in Cascade 2 §4.4).

    python -m nemocascade.launch --config=configs/tiny_cascade.py --workdir=DIR

Config (see configs/tiny_cascade.py for a complete example; every section is typed):
    seed, progress, num_workers, export_hf, model_path, model (ModelConfig; vocab_size is raised
    to the tokenizer's if needed), mesh (MeshConfig),
    tokenizer  {path: "" -> train a BPE on the task texts, vocab_size, split_digits}
    data       {source: "synthetic" (`data.synthetic`) | "jsonl", train_per_domain,
                eval_per_domain, paths: {domain: {sft, rl, eval}} for jsonl}
    eval       EvalConfig {n_samples, temperature, top_p, max_new_tokens, thinking}
    stage_order  comma-separated stage names, run in this order
    stages.<name>  SFTStageConfig (type sft) or RLStageConfig (type grpo | mopd), see
                   `jobs.stages`; an RL stage with eval_every=k evaluates every domain every k
                   steps (`eval/<domain>` in its metrics.jsonl: the held-out learning curve)

Outputs in DIR: summary.json ({"stages": [{"name", "type", "domains", "eval": {domain: score}}],
"teachers": {domain: stage}}), report.md (stages x domains, best per domain marked), scores.png,
and per stage DIR/stages/<name>/ (metrics.jsonl, checkpoints/: the last one holds the stage's
final weights). Re-running the command resumes: finished stages are skipped (their final
weights reloaded), an interrupted stage continues from its last checkpoint.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import time
from collections.abc import Mapping
from typing import Any, Literal

from flax import nnx

from nemocascade import data as nc_data
from nemocascade.data import synthetic
from nemocascade.jobs.evaluation import EvalConfig, evaluate_domains
from nemocascade.jobs.registry import register_job
from nemocascade.jobs.report import write_report
from nemocascade.jobs.sft import PackingConfig, run_sft_stage
from nemocascade.jobs.stages import SFTStageConfig, StageConfig, parse_stage
from nemocascade.model import ModelConfig, NemotronH, load_hf_checkpoint, save_hf_checkpoint
from nemocascade.rl import RLStage, RLStageConfig
from nemocascade.rl import rollouts as ro
from nemocascade.sharding import MeshConfig, make_mesh
from nemocascade.train import distill
from nemocascade.train.checkpoint import Checkpointer
from nemocascade.train.loop import CHECKPOINT_DIR, LoopConfig, Preempted
from nemocascade.train.state import split_model
from nemocascade.typed_config import from_mapping

log = logging.getLogger(__name__)


@dataclasses.dataclass(frozen=True)
class TokenizerConfig:
    path: str  # a tokenizer.json; "" trains a BPE on the synthetic task texts
    vocab_size: int
    split_digits: bool


@dataclasses.dataclass(frozen=True)
class DomainPaths:
    sft: str = ""  # chat records
    rl: str = ""  # prompt records with verifiers
    eval: str = ""  # held-out prompt records


@dataclasses.dataclass(frozen=True)
class CascadeDataConfig:
    source: Literal["synthetic", "jsonl"]
    train_per_domain: int  # synthetic: SFT / RL problems per domain
    eval_per_domain: int  # synthetic: held-out prompts per domain
    paths: dict[str, DomainPaths] = dataclasses.field(default_factory=dict)


def record_stage(summary: dict, entry: Mapping[str, Any]) -> None:
    """Updates the registry of the best checkpoint per domain (`summary["best"]` scores and
    `summary["teachers"]` stage names) with one evaluated stage; ties keep the earlier stage."""
    for d, s in entry["eval"].items():
        if d not in summary["best"] or s > summary["best"][d]:
            summary["best"][d] = s
            summary["teachers"][d] = entry["name"]


class Cascade:
    """Holds the run's tokenizer, data, model structure and results; `run()` executes the stages."""

    def __init__(self, config, workdir: str):
        self.config, self.workdir = config, os.path.abspath(workdir)
        self.seed = int(config.seed)
        self.order = [s.strip() for s in str(config.stage_order).split(",") if s.strip()]
        unknown = [s for s in self.order if s not in config.stages]
        if unknown:
            raise KeyError(
                f"stage_order names stages {unknown} not in config.stages ({sorted(config.stages)})"
            )
        self.stages: dict[str, StageConfig] = {
            name: parse_stage(name, config.stages[name]) for name in self.order
        }
        self.data_cfg = from_mapping(CascadeDataConfig, config.data, "data")
        self.eval_cfg = from_mapping(EvalConfig, config.eval, "eval")
        self.domains = sorted({d for st in self.stages.values() for d in st.domains})
        self.mesh = make_mesh(from_mapping(MeshConfig, config.mesh, "mesh"))
        os.makedirs(self.workdir, exist_ok=True)
        self.tokenizer = self._tokenizer(
            from_mapping(TokenizerConfig, config.tokenizer, "tokenizer")
        )
        model_cfg = ModelConfig.from_mapping(config.model)
        self.model_cfg = model_cfg.replace(
            vocab_size=max(model_cfg.vocab_size, self.tokenizer.vocab_size)
        )
        abstract = nnx.eval_shape(
            lambda: NemotronH(self.model_cfg, rngs=nnx.Rngs(self.seed), mesh=self.mesh)
        )
        self.graphdef, abs_params, abs_rest = split_model(abstract)
        self.abstract_weights = {"params": abs_params, "model_state": abs_rest}
        self.eval_sets = {d: self._records(d, "eval") for d in self.domains}
        self.reward_cache = ro.RewardCache()
        self.results_path = os.path.join(self.workdir, "summary.json")

    # ------------------------------------------------------------------ data
    def _tokenizer(self, tcfg: TokenizerConfig) -> nc_data.Tokenizer:
        if tcfg.path:
            return nc_data.Tokenizer.from_file(tcfg.path)
        path = os.path.join(self.workdir, "tokenizer.json")
        if os.path.exists(path):
            return nc_data.Tokenizer.from_file(path)
        if self.data_cfg.source != "synthetic":
            raise ValueError("tokenizer.path is required unless data.source='synthetic'")
        return nc_data.train_bpe(
            synthetic.all_texts(seed=self.seed),
            tcfg.vocab_size,
            path,
            split_digits=tcfg.split_digits,
        )

    def _records(self, domain: str, kind: str) -> list[dict]:
        """kind: 'sft' (chat records), 'rl' (prompt records), 'eval' (held-out prompt records)."""
        dcfg = self.data_cfg
        if dcfg.source == "synthetic":
            if domain not in synthetic.DOMAINS:
                raise ValueError(
                    f"data.source='synthetic' has no domain {domain!r}; "
                    f"known: {sorted(synthetic.DOMAINS)}"
                )
            split = "test" if kind == "eval" else "train"
            n = dcfg.eval_per_domain if kind == "eval" else dcfg.train_per_domain
            probs = synthetic.problems(domain, split, n, seed=self.seed)
            make = synthetic.sft_record if kind == "sft" else synthetic.prompt_record
            return [make(p) for p in probs]
        path = getattr(dcfg.paths.get(domain, DomainPaths()), kind)
        if not path:
            raise FileNotFoundError(
                f"data.paths.{domain}.{kind} is not set: stage data for domain "
                f"{domain!r} is not available here"
            )
        if not os.path.exists(path):
            raise FileNotFoundError(f"data.paths.{domain}.{kind}: {path} does not exist")
        reader = nc_data.read_chat_jsonl if kind == "sft" else nc_data.read_prompt_jsonl
        records, _ = reader(path)
        return records

    # ------------------------------------------------------------------ weights
    def _stage_dir(self, name: str) -> str:
        return os.path.join(self.workdir, "stages", name)

    def _load_final(self, name: str):
        """A finished stage's final weights: params and model state of its last checkpoint."""
        ckpt = Checkpointer(os.path.join(self._stage_dir(name), CHECKPOINT_DIR), keep_last=1)
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

    def evaluate(self, params, model_state) -> dict[str, float]:
        """Held-out score (percent) of every domain (`jobs.evaluation`)."""
        return evaluate_domains(
            self.graphdef,
            nnx.merge_state(params, model_state),
            self.tokenizer,
            self.eval_sets,
            self.eval_cfg,
            seed=self.seed,
            reward_cache=self.reward_cache,
            num_workers=int(self.config.num_workers),
            mesh=self.mesh,
        )

    # ------------------------------------------------------------------ stages
    def _run_sft(self, name: str, cfg: SFTStageConfig, params, model_state):
        records = [
            r for d in cfg.domains for r in self._records(d, "sft")[: cfg.records_per_domain.get(d)]
        ]
        loop = LoopConfig(
            steps=cfg.steps,
            checkpoint_every=min(cfg.checkpoint_every, cfg.steps),
            keep_checkpoints=1,
            best_metric="",
            progress=bool(self.config.progress),
            async_checkpoint=False,
        )
        packing = PackingConfig(
            seq_len=cfg.seq_len,
            global_batch=cfg.batch_size,
            thinking=cfg.thinking,
            non_thinking_fraction=cfg.non_thinking_fraction,
            overlong=cfg.overlong,
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
        )

    def _teachers(self, name: str, cfg: RLStageConfig, teachers_by_domain: Mapping[str, str]):
        """MOPD: each domain's teacher (its best stage so far), each checkpoint loaded once."""
        teachers, loaded = {}, {}
        for d in cfg.domains:
            if d not in teachers_by_domain:
                raise ValueError(
                    f"stage {name}: no teacher yet for domain {d!r} (no earlier stage evaluated it)"
                )
            src = teachers_by_domain[d]
            if src not in loaded:  # a checkpoint that teaches several domains is held once
                loaded[src] = distill.Teacher(self.graphdef, self._load_final(src))
            teachers[d] = loaded[src]
        return teachers

    def _run_rl(self, name: str, cfg: RLStageConfig, params, model_state, teachers_by_domain):
        if cfg.type == "grpo" and cfg.reward != "verifier":
            if not cfg.reward_model_path:
                raise FileNotFoundError(
                    f"stages.{name}.reward_model_path is not set: stage {name!r} needs a "
                    f"{cfg.reward} reward model, which is not available here"
                )
            raise NotImplementedError(
                f"stages.{name}.reward={cfg.reward!r}: learned reward models "
                "are not implemented yet (only rule-based verifiers)"
            )
        stage = RLStage(
            name=name,
            cfg=cfg,
            graphdef=self.graphdef,
            tokenizer=self.tokenizer,
            pools={d: self._records(d, "rl") for d in cfg.domains},
            seed=self.seed,
            teachers=self._teachers(name, cfg, teachers_by_domain) if cfg.type == "mopd" else None,
            reward_cache=self.reward_cache,
            num_workers=int(self.config.num_workers),
            mesh=self.mesh,
        )

        def eval_fn(state):
            scores = self.evaluate(state.params, state.model_state)
            return {f"eval/{d}": v for d, v in scores.items()}

        return stage.run(
            stage.initial_state(params, model_state),
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
        if summary["stages"]:
            params, model_state = self._load_final(summary["stages"][-1]["name"])
        else:
            params, model_state = self._init_weights()
        for name in self.order:
            if name in done:
                continue
            cfg = self.stages[name]
            t0 = time.perf_counter()
            log.info("stage %s (%s) on %s", name, cfg.type, list(cfg.domains))
            if isinstance(cfg, SFTStageConfig):
                result = self._run_sft(name, cfg, params, model_state)
            else:
                result = self._run_rl(name, cfg, params, model_state, summary["teachers"])
            if result.preempted:  # never go on to the next stage with a partly trained model
                raise Preempted(
                    f"stage {name}: SIGTERM at step {result.record.get('step')}/{cfg.steps}; "
                    "checkpoint saved, run the same command again to resume"
                )
            params, model_state = result.state.params, result.state.model_state
            train_s = time.perf_counter() - t0
            scores = self.evaluate(params, model_state)
            entry = {
                "name": name,
                "type": cfg.type,
                "domains": list(cfg.domains),
                "eval": scores,
                "train_s": round(train_s, 1),
                "eval_s": round(time.perf_counter() - t0 - train_s, 1),
            }
            summary["stages"].append(entry)
            record_stage(summary, entry)
            self._write_summary(summary)
            log.info("stage %s: eval %s (%.0fs)", name, scores, time.perf_counter() - t0)
            print(
                f"[cascade] {name:>10s} ({cfg.type}): "
                + "  ".join(f"{d}={s:5.1f}" for d, s in scores.items()),
                flush=True,
            )
        if self.config.export_hf:
            model = nnx.merge(self.graphdef, params, model_state)
            save_hf_checkpoint(model, os.path.join(self.workdir, "hf"))
            self.tokenizer.save(os.path.join(self.workdir, "hf", "tokenizer.json"))
        final = dict(summary["stages"][-1]["eval"]) if summary["stages"] else {}
        return {"final_" + d: v for d, v in final.items()}


@register_job("cascade")
def run_cascade(config, workdir: str) -> dict[str, Any]:
    """The Cascade pipeline job (see the module docstring)."""
    return Cascade(config, workdir).run()
