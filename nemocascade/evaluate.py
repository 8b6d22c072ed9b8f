"""Evaluate a checkpoint on task files: pass@1 (from k samples), pass@k and a 95% interval.

    python -m nemocascade.evaluate --checkpoint=DIR --tasks=gsm8k=gsm8k.jsonl,he=humaneval.jsonl \\
        --workdir=OUT [--thinking] [--n_samples=4 --temperature=0.6 --top_p=0.95 \\
        --max_new_tokens=1024 --seed=0 --num_workers=2 --batch_size=64 --limit=N \\
        --format=auto|FORMAT|NAME=FORMAT,... --stage=NAME --step=N --tokenizer=PATH --dtype=D]

DIR is either
  * a Hugging Face checkpoint: config.json + safetensors (`save_hf_checkpoint`) and a
    tokenizer.json beside them (or `--tokenizer`), e.g. `<workdir>/hf/` of a run with export_hf;
  * a nemocascade run directory (its config.json names the job): an `sft` run (tokenizer.json,
    checkpoints/<step>/) or a `cascade` run (stages/<name>/checkpoints/; the last stage finished
    in summary.json, or `--stage`). The model is built from the run's `model` section (a cascade
    raises its vocabulary to the tokenizer's) and only params + model state are restored, from the
    newest checkpoint (or `--step`), read-only (a run still training is not disturbed).

Task files are JSONL in a standard format (GSM8K, MATH, HumanEval, MBPP, IFEval, MCQA, or our
prompt records), detected per file; see `data.task_formats`. `--thinking` renders prompts in
thinking mode (they open `<think>`) and grades what follows `</think>` (a response that never
closes its reasoning scores 0).

Outputs in OUT:
  results.json   {"command", "created", "checkpoint": {path, kind, step, stage},
                  "settings": {n_samples, temperature, top_p, max_new_tokens, thinking, seed,
                  batch_size, limit}, "tasks": {NAME: {path, format, n_problems, n_samples,
                  pass@1, ci95 {low, high, method}, pass@k {"1", "<n>"}, pass@1_graded_only,
                  verifier_errors, verifier_errors_by_kind, mean_response_tokens,
                  truncation_rate, wall_s}}}; scores and rates in percent (`task_metrics`),
                  written after every task
  results.md     the same as a Markdown table
  samples/NAME.jsonl   one line per sample: problem, id, sample, prompt, response, score,
                 correct, error (kind or null), finished, response_tokens, verifier, details
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import json
import os
import re
import shlex
import sys
import time
from collections.abc import Sequence
from typing import Any

import jax.numpy as jnp
from flax import nnx

from nemocascade import data as nc_data
from nemocascade.jobs import evaluation as ev
from nemocascade.model import CheckpointError, ModelConfig, NemotronH, load_hf_checkpoint
from nemocascade.rewards.task_formats import FORMATS, read_task_file
from nemocascade.train.checkpoint import Checkpointer
from nemocascade.train.loop import CHECKPOINT_DIR
from nemocascade.train.state import split_model
from nemocascade.typed_config import ConfigError

_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")


class UsageError(ValueError):
    """Bad input to the command: a flag value, a checkpoint directory it cannot use."""


# ============================================================================ checkpoints
@dataclasses.dataclass
class LoadedModel:
    graphdef: nnx.GraphDef
    state: nnx.State
    tokenizer: nc_data.Tokenizer
    info: dict[str, Any]  # path, kind ("hf" | "sft" | "cascade"), step, stage


def _read_json(path: str) -> dict:
    try:
        with open(path) as f:
            return json.load(f)
    except json.JSONDecodeError as e:
        raise UsageError(f"{path}:{e.lineno}: not valid JSON ({e.msg})") from None


def _tokenizer(explicit: str | None, *candidates: str) -> nc_data.Tokenizer:
    for path in [explicit] if explicit else candidates:
        if path and os.path.isfile(path):
            return nc_data.Tokenizer.from_file(path)
    where = explicit or " or ".join(c for c in candidates if c)
    raise FileNotFoundError(f"no tokenizer at {where}; pass --tokenizer=PATH/tokenizer.json")


def restore_weights(ckpt_dir: str, model_cfg: ModelConfig, step: int | None = None):
    """(graphdef, state, step): params and model state of checkpoint `step` (default the newest)
    of `ckpt_dir`, restored without the optimizer state, through a read-only `Checkpointer` (it
    creates, cleans up and deletes nothing)."""
    abstract = nnx.eval_shape(lambda: NemotronH(model_cfg, rngs=nnx.Rngs(0)))
    graphdef, abs_params, abs_rest = split_model(abstract)
    if not os.path.isdir(ckpt_dir):
        raise FileNotFoundError(f"{ckpt_dir}: no checkpoint directory")
    ckpt = Checkpointer(ckpt_dir, read_only=True)
    try:
        steps = ckpt.all_steps()
        if not steps:
            raise FileNotFoundError(f"{ckpt_dir}: no complete checkpoint")
        step = steps[-1] if step is None else step
        if step not in steps:
            raise FileNotFoundError(f"{ckpt_dir}: no checkpoint at step {step}; steps: {steps}")
        out = ckpt.restore_fields(step, {"params": abs_params, "model_state": abs_rest})
    finally:
        ckpt.close()
    return graphdef, nnx.merge_state(out["params"], out["model_state"]), step


def load_model(
    path: str,
    *,
    stage: str | None = None,
    step: int | None = None,
    tokenizer: str | None = None,
    dtype: str = "float32",
) -> LoadedModel:
    """The model and tokenizer of a Hugging Face checkpoint or a run directory (module
    docstring)."""
    cfg_path = os.path.join(path, "config.json")
    if not os.path.isfile(cfg_path):
        raise FileNotFoundError(
            f"{path}: no config.json (expected a Hugging Face checkpoint or a run directory)"
        )
    cfg = _read_json(cfg_path)
    info: dict[str, Any] = {"path": os.path.abspath(path), "step": None, "stage": None}
    if "job" not in cfg:  # Hugging Face
        if stage or step is not None:
            raise UsageError(f"{path}: --stage / --step apply to run directories only")
        tok = _tokenizer(tokenizer, os.path.join(path, "tokenizer.json"))
        model = load_hf_checkpoint(path, dtype=jnp.dtype(dtype))
        graphdef, state = nnx.split(model)
        loaded = LoadedModel(graphdef, state, tok, {**info, "kind": "hf"})
    elif cfg["job"] == "sft":
        tok = _tokenizer(
            tokenizer, os.path.join(path, "tokenizer.json"), cfg.get("data", {}).get("tokenizer")
        )
        model_cfg = ModelConfig.from_mapping(cfg["model"])
        graphdef, state, step = restore_weights(os.path.join(path, CHECKPOINT_DIR), model_cfg, step)
        loaded = LoadedModel(graphdef, state, tok, {**info, "kind": "sft", "step": step})
    elif cfg["job"] == "cascade":
        tok = _tokenizer(
            tokenizer, cfg.get("tokenizer", {}).get("path"), os.path.join(path, "tokenizer.json")
        )
        model_cfg = ModelConfig.from_mapping(cfg["model"])
        model_cfg = model_cfg.replace(vocab_size=max(model_cfg.vocab_size, tok.vocab_size))
        stage = stage or _last_finished_stage(path)
        ckpt_dir = os.path.join(path, "stages", stage, CHECKPOINT_DIR)
        graphdef, state, step = restore_weights(ckpt_dir, model_cfg, step)
        info.update(kind="cascade", step=step, stage=stage)
        loaded = LoadedModel(graphdef, state, tok, info)
    else:
        raise UsageError(f"{cfg_path}: job {cfg['job']!r} has no model to evaluate (sft, cascade)")
    vocab = int(loaded.state["embed_VD"][...].shape[0])
    if loaded.tokenizer.vocab_size > vocab:
        raise UsageError(
            f"{loaded.tokenizer.source}: {loaded.tokenizer.vocab_size} token ids, but the model "
            f"has a vocabulary of {vocab}"
        )
    return loaded


def _last_finished_stage(run_dir: str) -> str:
    path = os.path.join(run_dir, "summary.json")
    stages = _read_json(path).get("stages", []) if os.path.isfile(path) else []
    if not stages:
        raise FileNotFoundError(f"{run_dir}: no finished stage in summary.json; pass --stage=NAME")
    return stages[-1]["name"]


# ============================================================================ command line
def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m nemocascade.evaluate",
        description="Evaluate a checkpoint on task files (see the module docstring).",
    )
    p.add_argument("--checkpoint", required=True, help="HF checkpoint or run directory")
    p.add_argument("--tasks", required=True, help="NAME=PATH[,NAME=PATH...] (JSONL task files)")
    p.add_argument("--workdir", required=True, help="output directory")
    p.add_argument("--thinking", action=argparse.BooleanOptionalAction, default=False)
    p.add_argument("--n_samples", type=int, default=1, help="samples per problem (k)")
    p.add_argument("--temperature", type=float, default=0.0, help="0 = greedy")
    p.add_argument("--top_p", type=float, default=1.0)
    p.add_argument("--max_new_tokens", type=int, default=1024)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--num_workers", type=int, default=2, help="verifier worker processes")
    p.add_argument(
        "--batch_size", type=int, default=64, help="prompts per generation batch (0: all)"
    )
    p.add_argument(
        "--slots",
        type=int,
        default=0,
        help="continuous batching: rows decoding at once, a finished row's slot taking the next "
        "(0: one static batch); pairs with a large --batch_size",
    )
    p.add_argument("--limit", type=int, default=0, help="only the first N problems of each task")
    p.add_argument("--format", default="auto", help="auto, a format, or NAME=FORMAT,...")
    p.add_argument("--stage", default=None, help="cascade run: the stage to evaluate")
    p.add_argument("--step", type=int, default=None, help="run: the checkpoint step (newest)")
    p.add_argument("--tokenizer", default=None, help="tokenizer.json, if not found in DIR")
    p.add_argument("--dtype", default="float32", help="HF checkpoint: parameter dtype")
    p.add_argument("--progress", action=argparse.BooleanOptionalAction, default=True)
    return p


def _pairs(text: str, what: str) -> dict[str, str]:
    out: dict[str, str] = {}
    for item in (s.strip() for s in text.split(",")):
        if not item:
            continue
        name, sep, value = item.partition("=")
        name, value = name.strip(), value.strip()
        if not sep or not value or not _NAME.match(name):
            raise UsageError(
                f"{what}: expected NAME=VALUE[,NAME=VALUE...] with NAME of letters, digits, "
                f"'_', '.', '-', got {item!r}"
            )
        if name in out:
            raise UsageError(f"{what}: {name!r} given twice")
        out[name] = value
    if not out:
        raise UsageError(f"{what}: nothing given")
    return out


def _formats(text: str, names: Sequence[str]) -> dict[str, str]:
    given = _pairs(text, "--format") if "=" in text else dict.fromkeys(names, text.strip())
    unknown = sorted(set(given) - set(names))
    if unknown:
        raise UsageError(f"--format names tasks {unknown} not in --tasks {list(names)}")
    bad = sorted({f for f in given.values() if f != "auto" and f not in FORMATS})
    if bad:
        raise UsageError(f"--format: unknown formats {bad}; known: auto, {', '.join(FORMATS)}")
    return {n: given.get(n, "auto") for n in names}


def load_tasks(tasks: str, fmt: str = "auto", limit: int = 0) -> dict[str, dict[str, Any]]:
    """{name: {"path", "format", "records"}} of a `--tasks` value (every file read and converted
    before any model is loaded: a bad file fails fast, naming file:line)."""
    paths = _pairs(tasks, "--tasks")
    formats = _formats(fmt, list(paths))
    out = {}
    for name, path in paths.items():
        if not os.path.isfile(path):
            raise FileNotFoundError(f"--tasks: {name}={path}: no such file")
        records, found = read_task_file(path, formats[name])
        out[name] = {
            "path": path,
            "format": found,
            "records": records[:limit] if limit else records,
        }
    return out


def _log(progress: bool, msg: str) -> None:
    if progress:
        print(f"[evaluate] {msg}", file=sys.stderr, flush=True)


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    """Runs the command (argv without the program name); returns the results.json content."""
    argv = list(sys.argv[1:] if argv is None else argv)
    a = _parser().parse_args(argv)
    try:
        cfg = ev.EvalConfig(
            n_samples=a.n_samples,
            temperature=a.temperature,
            top_p=a.top_p,
            max_new_tokens=a.max_new_tokens,
            thinking=a.thinking,
            slots=a.slots,
        )
    except ValueError as e:
        raise UsageError(str(e)) from None
    if a.limit < 0 or a.batch_size < 0:
        raise UsageError(f"--limit and --batch_size must be >= 0, got {a.limit}, {a.batch_size}")
    tasks = load_tasks(a.tasks, a.format, a.limit)
    if cfg.n_samples > 1 and cfg.temperature == 0:
        _log(True, "warning: n_samples > 1 with temperature 0: the samples are all the same")
    loaded = load_model(
        a.checkpoint, stage=a.stage, step=a.step, tokenizer=a.tokenizer, dtype=a.dtype
    )
    _log(a.progress, f"model {loaded.info}; tasks {list(tasks)}")
    os.makedirs(os.path.join(a.workdir, "samples"), exist_ok=True)
    results: dict[str, Any] = {
        "command": shlex.join([sys.executable, "-m", "nemocascade.evaluate", *argv]),
        "checkpoint": loaded.info,
        "settings": {
            **dataclasses.asdict(cfg),
            "seed": a.seed,
            "batch_size": a.batch_size,
            "limit": a.limit,
        },
        "created": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        "tasks": {},
    }
    for name, task in tasks.items():
        t0, total = time.perf_counter(), len(task["records"])

        def report(s: ev.EvalSamples, name=name, t0=t0, total=total) -> None:
            _log(
                a.progress,
                f"{name}: {len(s.records)}/{total} problems, pass@1 so far "
                f"{100 * float(s.scores.mean()):.1f}%, {int(s.errors.sum())} verifier errors, "
                f"{time.perf_counter() - t0:.0f}s",
            )

        samples = ev.sample_and_grade(
            loaded.graphdef,
            loaded.state,
            loaded.tokenizer,
            task["records"],
            cfg,
            seed=a.seed,
            num_workers=a.num_workers,
            batch_size=a.batch_size,
            on_batch=report,
        )
        write_samples(os.path.join(a.workdir, "samples", f"{name}.jsonl"), samples)
        results["tasks"][name] = {
            "path": os.path.abspath(task["path"]),
            "format": task["format"],
            **ev.task_metrics(samples),
            "wall_s": round(time.perf_counter() - t0, 1),
        }
        write_results(a.workdir, results)  # after every task: a partial run keeps what it did
    _log(a.progress, f"results in {os.path.join(a.workdir, 'results.md')}")
    return results


# ============================================================================ outputs
def write_samples(path: str, s: ev.EvalSamples) -> None:
    with open(path, "w") as f:
        for r, response in enumerate(s.responses):
            record = s.records[r // s.n]
            row = {
                "problem": r // s.n,
                "id": record.get("id"),
                "sample": r % s.n,
                "prompt": record.get("messages") or record.get("prompt"),
                "response": response,
                "score": float(s.scores[r]),
                "correct": bool(s.scores[r] >= 1.0 and not s.errors[r]),
                "error": s.details[r].get("error_kind") if s.errors[r] else None,
                "finished": bool(s.finished[r]),
                "response_tokens": int(s.response_tokens[r]),
                "verifier": record.get("verifier"),
                "details": s.details[r],
            }
            f.write(json.dumps(row, default=str) + "\n")


def _cell(v: Any) -> str:
    return "-" if v is None else f"{v:.2f}" if isinstance(v, float) else str(v)


def results_markdown(results: dict[str, Any]) -> str:
    """A table: one row per task."""
    s = results["settings"]
    ck = results["checkpoint"]
    where = ck["path"] + (f" (stage {ck['stage']})" if ck.get("stage") else "")
    where += f" step {ck['step']}" if ck.get("step") is not None else ""
    lines = [
        f"# Evaluation of {where}",
        "",
        f"{'thinking' if s['thinking'] else 'non-thinking'} mode, {s['n_samples']} sample(s) per "
        f"problem, temperature {s['temperature']}, top_p {s['top_p']}, max_new_tokens "
        f"{s['max_new_tokens']}, seed {s['seed']}. Scores in percent; the 95% interval is normal, "
        "over problems.",
        "",
        "| task | format | problems | pass@1 | 95% CI | pass@k | verifier errors "
        "| mean tokens | truncated % |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for name, t in results["tasks"].items():
        ci = f"[{_cell(t['ci95']['low'])}, {_cell(t['ci95']['high'])}]"
        pk = ", ".join(f"@{k}: {_cell(v)}" for k, v in t["pass@k"].items())
        lines.append(
            f"| {name} | {t['format']} | {t['n_problems']} | {_cell(t['pass@1'])} | {ci} | {pk} "
            f"| {t['verifier_errors']} | {_cell(t['mean_response_tokens'])} "
            f"| {_cell(t['truncation_rate'])} |"
        )
    return "\n".join(lines) + "\n"


def write_results(workdir: str, results: dict[str, Any]) -> None:
    tmp = os.path.join(workdir, "results.json.tmp")
    with open(tmp, "w") as f:
        json.dump(results, f, indent=2)
        f.write("\n")
    os.replace(tmp, os.path.join(workdir, "results.json"))
    with open(os.path.join(workdir, "results.md"), "w") as f:
        f.write(results_markdown(results))


def cli() -> None:
    """Console entry point: bad input is one `error:` line and exit status 2."""
    try:
        main()
    except (
        UsageError,
        nc_data.DataError,
        nc_data.MissingSpecialTokensError,
        FileNotFoundError,
        CheckpointError,
        ConfigError,
    ) as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)


if __name__ == "__main__":
    cli()
