"""The Cascade pipeline: ordered stages (SFT, GRPO, MOPD), per-domain evaluation after each stage,
and the registry of the best checkpoint per domain (the MOPD teachers, as in Cascade 2 §4.4).

    python -m nemocascade.launch --config=configs/tiny_cascade.py --workdir=DIR

Config (see configs/tiny_cascade.py for a complete example):
    seed, model (ModelConfig fields; vocab_size is raised to the tokenizer's if needed), mesh,
    tokenizer  {path: "" -> train a BPE on the task texts, vocab_size, split_digits}
    data       {source: "synthetic" (nemocascade.tasks) | "jsonl", train_per_domain,
                eval_per_domain, paths: {domain: {sft, rl, eval}} for jsonl}
    eval       {n_samples, temperature, top_p, max_new_tokens, thinking}
    stage_order  comma-separated stage names, run in this order
    stages.<name>  {type: sft | grpo | mopd, domains, steps, optim, ...}; an SFT stage may cap its
                   data per domain with records_per_domain {domain: n}; an RL stage with
                   eval_every=k evaluates every domain every k steps (`eval/<domain>` in its
                   metrics.jsonl: the held-out learning curve within the stage)

Outputs in DIR: summary.json ({"stages": [{"name", "type", "domains", "eval": {domain: score}}],
"teachers": {domain: stage}}), report.md (stages x domains, best per domain marked), scores.png,
and per stage DIR/stages/<name>/ (metrics.jsonl, checkpoints/, final/). Re-running the command
resumes: finished stages are skipped (their final weights reloaded), an interrupted stage continues
from its last checkpoint.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import time
from collections.abc import Mapping
from typing import Any

import jax
import orbax.checkpoint as ocp
from flax import nnx

from nemocascade import data as nc_data
from nemocascade import rollouts as ro
from nemocascade import tasks
from nemocascade.model import ModelConfig, NemotronH, load_hf_checkpoint, save_hf_checkpoint
from nemocascade.report import write_report
from nemocascade.rl import Preempted, RLStage
from nemocascade.sharding import MeshConfig, make_mesh
from nemocascade.train import distill
from nemocascade.train.checkpoint import Checkpointer
from nemocascade.train.jobs import register_job
from nemocascade.train.loop import CHECKPOINT_DIR, LoopConfig, train_loop
from nemocascade.train.optim import OptimConfig, freeze_router, lr_schedule, make_optimizer
from nemocascade.train.sft import sft_step
from nemocascade.train.state import TrainState, split_model

log = logging.getLogger(__name__)

STAGE_TYPES = ("sft", "grpo", "mopd")
SFT_KEYS = ("input_ids", "targets", "loss_mask", "segment_ids", "positions")


def _model_config(cfg: Mapping[str, Any], vocab_size: int) -> ModelConfig:
    fields = {f.name for f in dataclasses.fields(ModelConfig)}
    unknown = sorted(set(cfg) - fields)
    if unknown:
        raise KeyError(f"model: unknown keys {unknown}")
    kw = {k: (tuple(v) if isinstance(v, list) else v) for k, v in cfg.items()}
    kw["vocab_size"] = max(int(kw["vocab_size"]), vocab_size)
    return ModelConfig(**kw)


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
        for name in self.order:
            st = config.stages[name]
            if st.type not in STAGE_TYPES:
                raise ValueError(f"stages.{name}.type={st.type!r}: expected one of {STAGE_TYPES}")
        self.domains = sorted({d for n in self.order for d in self._stage_domains(n)})
        self.mesh = make_mesh(MeshConfig(**config.mesh.to_dict()))
        os.makedirs(self.workdir, exist_ok=True)
        self.tokenizer = self._tokenizer()
        self.model_cfg = _model_config(config.model.to_dict(), self.tokenizer.vocab_size)
        abstract = nnx.eval_shape(lambda: NemotronH(self.model_cfg, rngs=nnx.Rngs(self.seed)))
        self.graphdef, abs_params, abs_rest = split_model(abstract)
        self.abstract_weights = (abs_params, abs_rest)
        self.eval_sets = {d: self._records(d, "eval") for d in self.domains}
        self.reward_cache = ro.RewardCache()
        self.results_path = os.path.join(self.workdir, "summary.json")

    # ------------------------------------------------------------------ data
    def _stage_domains(self, name: str) -> list[str]:
        d = self.config.stages[name].domains
        return [x.strip() for x in d.split(",")] if isinstance(d, str) else list(d)

    def _tokenizer(self) -> nc_data.Tokenizer:
        tcfg = self.config.tokenizer
        if tcfg.path:
            return nc_data.Tokenizer.from_file(tcfg.path)
        path = os.path.join(self.workdir, "tokenizer.json")
        if os.path.exists(path):
            return nc_data.Tokenizer.from_file(path)
        if self.config.data.source != "synthetic":
            raise ValueError("tokenizer.path is required unless data.source='synthetic'")
        return nc_data.train_bpe(
            tasks.all_texts(seed=self.seed),
            int(tcfg.vocab_size),
            path,
            split_digits=bool(tcfg.split_digits),
        )

    def _records(self, domain: str, kind: str) -> list[dict]:
        """kind: 'sft' (chat records), 'rl' (prompt records), 'eval' (held-out prompt records)."""
        dcfg = self.config.data
        if dcfg.source == "synthetic":
            if domain not in tasks.DOMAINS:
                raise ValueError(
                    f"data.source='synthetic' has no domain {domain!r}; "
                    f"known: {sorted(tasks.DOMAINS)}"
                )
            split = "test" if kind == "eval" else "train"
            n = int(dcfg.eval_per_domain if kind == "eval" else dcfg.train_per_domain)
            probs = tasks.problems(domain, split, n, seed=self.seed)
            return [tasks.sft_record(p) if kind == "sft" else tasks.prompt_record(p) for p in probs]
        paths = dcfg.paths.get(domain) if dcfg.paths else None
        if not paths or not paths.get(kind):
            raise FileNotFoundError(
                f"data.paths.{domain}.{kind} is not set: stage data for domain "
                f"{domain!r} is not available here"
            )
        path = paths[kind]
        if not os.path.exists(path):
            raise FileNotFoundError(f"data.paths.{domain}.{kind}: {path} does not exist")
        reader = nc_data.read_chat_jsonl if kind == "sft" else nc_data.read_prompt_jsonl
        records, _ = reader(path)
        return records

    # ------------------------------------------------------------------ weights
    def _final_dir(self, name: str) -> str:
        return os.path.join(self.workdir, "stages", name, "final")

    def _save_final(self, name: str, params, model_state) -> None:
        with ocp.StandardCheckpointer() as ckptr:
            ckptr.save(
                self._final_dir(name), {"params": params, "model_state": model_state}, force=True
            )

    def _load_final(self, name: str):
        abs_params, abs_rest = self.abstract_weights
        with ocp.StandardCheckpointer() as ckptr:
            out = ckptr.restore(
                self._final_dir(name), {"params": abs_params, "model_state": abs_rest}
            )
        return out["params"], out["model_state"]

    def _init_weights(self):
        """The starting weights: `model_path` (HF safetensors) if set, else a random init."""
        path = self.config.model_path
        if path:  # built from config.model; every checkpoint tensor is checked against it
            model = load_hf_checkpoint(path, config=self.model_cfg)
        else:
            model = NemotronH(self.model_cfg, rngs=nnx.Rngs(self.seed))
        _, params, rest = split_model(model)
        return params, rest

    # ------------------------------------------------------------------ evaluation
    def evaluate(self, params, model_state) -> dict[str, float]:
        """Held-out score (percent) of every domain: mean verifier reward of greedy (or sampled,
        pass@1 over n) responses."""
        ecfg = self.config.eval
        state = nnx.merge_state(params, model_state)
        out = {}
        for d in self.domains:
            roll = ro.sample(
                self.graphdef,
                state,
                self.tokenizer,
                self.eval_sets[d],
                n=int(ecfg.n_samples),
                max_new_tokens=int(ecfg.max_new_tokens),
                temperature=float(ecfg.temperature),
                top_p=float(ecfg.top_p),
                seed=self.seed,
                thinking=bool(ecfg.thinking),
                reward_cache=self.reward_cache,
                num_workers=int(self.config.num_workers),
                mesh=self.mesh,
            )
            out[d] = round(100.0 * float(roll.rewards.mean()), 2)
        return out

    # ------------------------------------------------------------------ stages
    def _optimizer(self, scfg, steps: int):
        ocfg = OptimConfig.from_mapping(scfg.optim.to_dict())
        return ocfg, make_optimizer(ocfg, steps)

    def _fresh_state(self, params, model_state, tx) -> TrainState:
        return TrainState(
            step=jax.numpy.zeros((), jax.numpy.int32),
            params=params,
            model_state=model_state,
            opt_state=tx.init(params),
            rng=jax.random.PRNGKey(self.seed),
        )

    def _run_sft(self, name, scfg, params, model_state):
        stage_dir = os.path.join(self.workdir, "stages", name)
        steps = int(scfg.steps)
        ocfg, tx = self._optimizer(scfg, steps)
        limits = dict(scfg.get("records_per_domain", {}) or {})
        records = [
            r for d in self._stage_domains(name) for r in self._records(d, "sft")[: limits.get(d)]
        ]
        ds = nc_data.sft_dataset(
            records,
            self.tokenizer,
            seq_len=int(scfg.seq_len),
            batch_size=int(scfg.batch_size),
            seed=self.seed,
            shuffle=True,
            num_epochs=None,
            thinking=bool(scfg.thinking),
            non_thinking_fraction=0.0,
            overlong="truncate",
        )
        data_iter = iter(ds.map(lambda b: {k: b[k] for k in SFT_KEYS}))
        loop_cfg = LoopConfig(
            steps=steps,
            checkpoint_every=max(1, steps // 2),
            keep_checkpoints=1,
            best_metric="",
            progress=bool(self.config.progress),
            async_checkpoint=False,
        )

        def init():
            return self._fresh_state(params, model_state, tx)

        out = train_loop(
            config=loop_cfg,
            workdir=stage_dir,
            mesh=self.mesh,
            init_fn=init,
            step_fn=lambda s, b: sft_step(
                s,
                b,
                graphdef=self.graphdef,
                tx=tx,
                lr_fn=lr_schedule(ocfg, steps),
                moe_bias_rate=ocfg.moe_bias_rate,
            ),
            data_iter=data_iter,
        )
        if out.get("preempted"):  # never go on to the next stage with a partly trained model
            raise Preempted(
                f"stage {name}: SIGTERM at step {out.get('step')}/{steps}; checkpoint "
                "saved, run the same command again to resume"
            )
        abstract = jax.eval_shape(init)
        ckpt = Checkpointer(os.path.join(stage_dir, CHECKPOINT_DIR), keep_last=1)
        try:
            restored = ckpt.restore_latest(abstract)
        finally:
            ckpt.close()
        if restored is None or restored[0] != steps:
            raise RuntimeError(
                f"stage {name}: expected the step-{steps} checkpoint in {stage_dir}, "
                f"found {None if restored is None else restored[0]}"
            )
        state = restored[1]
        return state.params, state.model_state

    def _run_rl(self, name, scfg, params, model_state, teachers_by_domain):
        if scfg.type == "grpo" and scfg.reward != "verifier":
            if not scfg.reward_model_path:
                raise FileNotFoundError(
                    f"stages.{name}.reward_model_path is not set: stage {name!r} needs a "
                    f"{scfg.reward} reward model, which is not available here"
                )
            raise NotImplementedError(
                f"stages.{name}.reward={scfg.reward!r}: learned reward models "
                "are not implemented yet (only rule-based verifiers)"
            )
        steps = int(scfg.steps)
        ocfg, tx = self._optimizer(scfg, steps)
        if scfg.get("freeze_router", False):  # as in Nemotron-3 RL: router frozen, bias still moves
            tx = freeze_router(tx)
        domains = self._stage_domains(name)
        pools = {d: self._records(d, "rl") for d in domains}
        teachers = None
        if scfg.type == "mopd":
            teachers, loaded = {}, {}
            for d in domains:
                if d not in teachers_by_domain:
                    raise ValueError(
                        f"stage {name}: no teacher yet for domain {d!r} (no earlier "
                        "stage evaluated it)"
                    )
                src = teachers_by_domain[d]
                if src not in loaded:  # a checkpoint that teaches several domains is held once
                    loaded[src] = distill.Teacher(self.graphdef, self._load_final(src))
                teachers[d] = loaded[src]
        stage = RLStage(
            name=name,
            cfg=scfg.to_dict(),
            stage_dir=os.path.join(self.workdir, "stages", name),
            graphdef=self.graphdef,
            tx=tx,
            lr_fn=lr_schedule(ocfg, steps),
            tokenizer=self.tokenizer,
            pools=pools,
            seed=self.seed,
            teachers=teachers,
            reward_cache=self.reward_cache,
            num_workers=int(self.config.num_workers),
            progress=bool(self.config.progress),
            mesh=self.mesh,
        )
        state = stage.run(
            self._fresh_state(params, model_state, tx),
            eval_fn=lambda st: self.evaluate(st.params, st.model_state),
        )
        return state.params, state.model_state

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
        params = model_state = None
        if summary["stages"]:
            params, model_state = self._load_final(summary["stages"][-1]["name"])
        else:
            params, model_state = self._init_weights()
        for name in self.order:
            if name in done:
                continue
            scfg = self.config.stages[name]
            t0 = time.perf_counter()
            log.info("stage %s (%s) on %s", name, scfg.type, self._stage_domains(name))
            if scfg.type == "sft":
                params, model_state = self._run_sft(name, scfg, params, model_state)
            else:
                params, model_state = self._run_rl(
                    name, scfg, params, model_state, summary["teachers"]
                )
            train_s = time.perf_counter() - t0
            self._save_final(name, params, model_state)
            scores = self.evaluate(params, model_state)
            entry = {
                "name": name,
                "type": str(scfg.type),
                "domains": self._stage_domains(name),
                "eval": scores,
                "train_s": round(train_s, 1),
                "eval_s": round(time.perf_counter() - t0 - train_s, 1),
            }
            summary["stages"].append(entry)
            record_stage(summary, entry)
            self._write_summary(summary)
            log.info("stage %s: eval %s (%.0fs)", name, scores, time.perf_counter() - t0)
            print(
                f"[cascade] {name:>10s} ({scfg.type}): "
                + "  ".join(f"{d}={s:5.1f}" for d, s in scores.items()),
                flush=True,
            )
        if self.config.export_hf and params is not None:
            model = nnx.merge(self.graphdef, params, model_state)
            save_hf_checkpoint(model, os.path.join(self.workdir, "hf"))
            self.tokenizer.save(os.path.join(self.workdir, "hf", "tokenizer.json"))
        final = dict(summary["stages"][-1]["eval"]) if summary["stages"] else {}
        return {"final_" + d: v for d, v in final.items()}


@register_job("cascade")
def run_cascade(config, workdir: str) -> dict[str, Any]:
    """The Cascade pipeline job (see the module docstring)."""
    return Cascade(config, workdir).run()
