"""The `sft` job: config -> model, tokenizer, packed data, optimizer -> `train_loop`.

Config sections read here (see configs/sft_tiny.py for a complete example):
    seed, model (every ModelConfig field), data, optim (OptimConfig), train (LoopConfig), mesh
    (MeshConfig), loss_chunk_size (0: full logits; N: cross-entropy N tokens at a time, for
    large vocabularies), export_hf (write `<workdir>/hf/` in Hugging Face format at the end).

data keys:
    source         "arithmetic" (generated, `arithmetic_data`) or "jsonl" (chat records at `path`)
    path           JSONL file of chat records (source="jsonl")
    num_records    how many arithmetic records to generate (source="arithmetic")
    eval_records   records held out from the end of the list for `eval_loss` (0: no eval)
    tokenizer      a tokenizer.json; "" trains a byte-level BPE of `vocab_size` on the train texts
    vocab_size     size of that BPE
    seq_len, global_batch, thinking, non_thinking_fraction, overlong   (see nemocascade.data)
    shard_by       "process" (each process packs its slice of the records) or "row" (all
                   processes pack everything and keep their rows: the 1-process global batch)
"""

from __future__ import annotations

import dataclasses
import functools
import logging
import os
import shutil
from collections.abc import Mapping
from typing import Any

import jax
from flax import nnx

from nemocascade import data as nc_data
from nemocascade.model import ModelConfig, NemotronH, save_hf_checkpoint
from nemocascade.sharding import MeshConfig, make_mesh
from nemocascade.train.arithmetic_data import arithmetic_records
from nemocascade.train.checkpoint import Checkpointer, abstract_with_shardings
from nemocascade.train.jobs import register_job
from nemocascade.train.loop import CHECKPOINT_DIR, LoopConfig, full_shardings, to_global, train_loop
from nemocascade.train.optim import OptimConfig, lr_schedule, make_optimizer
from nemocascade.train.sft import sft_eval_step, sft_step
from nemocascade.train.state import TrainState, create_train_state, merge_model, split_model

log = logging.getLogger(__name__)

BATCH_KEYS = ("input_ids", "targets", "loss_mask", "segment_ids", "positions")
DATA_SOURCES = ("arithmetic", "jsonl")
SHARD_BY = ("process", "row")


def model_config_from(cfg: Mapping[str, Any]) -> ModelConfig:
    """ModelConfig from a config section holding every field (unknown keys raise)."""
    fields = {f.name for f in dataclasses.fields(ModelConfig)}
    unknown = sorted(set(cfg) - fields)
    if unknown:
        raise KeyError(f"model: unknown keys {unknown}")
    return ModelConfig(**{k: (tuple(v) if isinstance(v, list) else v) for k, v in cfg.items()})


def load_records(data_cfg: Mapping[str, Any], seed: int) -> list[dict]:
    """The chat records of the data section (validated when read from JSONL)."""
    if data_cfg["source"] == "arithmetic":
        return arithmetic_records(int(data_cfg["num_records"]), seed=seed)
    if data_cfg["source"] == "jsonl":
        if not data_cfg["path"]:
            raise ValueError("data.source='jsonl' needs data.path")
        records, _ = nc_data.read_chat_jsonl(data_cfg["path"])
        return records
    raise ValueError(f"data.source={data_cfg['source']!r}: expected one of {DATA_SOURCES}")


def build_tokenizer(data_cfg: Mapping[str, Any], records: list[dict]) -> nc_data.Tokenizer:
    """`data.tokenizer` if set, else a BPE trained on the records' rendered text."""
    if data_cfg["tokenizer"]:
        return nc_data.Tokenizer.from_file(data_cfg["tokenizer"])
    texts = []
    for r in records:
        for m in r["messages"]:
            texts.append(m["content"])
            if m.get("reasoning_content"):
                texts.append(m["reasoning_content"])
    return nc_data.train_bpe(texts, int(data_cfg["vocab_size"]))


def _batches(records, tokenizer, data_cfg, *, seed: int, shuffle: bool, num_epochs: int | None):
    """This process's rows of each global batch.

    shard_by="process": each process packs its own slice of the records (scales to any data
    size); shard_by="row": every process packs all records into the global batch and keeps its
    rows, so the global batch is the one a single process would see (small data, exact checks).
    """
    n_proc, index = jax.process_count(), jax.process_index()
    global_batch = int(data_cfg["global_batch"])
    if global_batch % n_proc:
        raise ValueError(f"data.global_batch={global_batch} is not divisible by {n_proc} processes")
    if data_cfg["shard_by"] not in SHARD_BY:
        raise ValueError(f"data.shard_by={data_cfg['shard_by']!r}: expected one of {SHARD_BY}")
    by_row = data_cfg["shard_by"] == "row"
    local = global_batch // n_proc
    ds = nc_data.sft_dataset(
        records,
        tokenizer,
        seq_len=int(data_cfg["seq_len"]),
        batch_size=global_batch if by_row else local,
        seed=seed,
        shuffle=shuffle,
        num_epochs=num_epochs,
        shard_index=0 if by_row else index,
        shard_count=1 if by_row else n_proc,
        thinking=bool(data_cfg["thinking"]),
        non_thinking_fraction=float(data_cfg["non_thinking_fraction"]),
        overlong=str(data_cfg["overlong"]),
    )
    lo, hi = (index * local, (index + 1) * local) if by_row else (0, local)
    return ds.map(lambda b: {k: b[k][lo:hi] for k in BATCH_KEYS})


def make_init_fn(model_cfg: ModelConfig, tx, seed: int):
    """`init_fn() -> TrainState`: a fresh model from `seed` and its optimizer state."""

    def init_fn() -> TrainState:
        model = NemotronH(model_cfg, rngs=nnx.Rngs(seed))
        return create_train_state(model, tx, jax.random.PRNGKey(seed))[1]

    return init_fn


def abstract_train_state(config) -> TrainState:
    """The config's TrainState as shapes and dtypes only (`jax.eval_shape`; nothing allocated)."""
    optim_cfg = OptimConfig.from_mapping(config.optim.to_dict())
    loop_cfg = LoopConfig.from_mapping(config.train.to_dict())
    tx = make_optimizer(optim_cfg, loop_cfg.steps)
    return jax.eval_shape(
        make_init_fn(model_config_from(config.model.to_dict()), tx, int(config.seed))
    )


class _EvalSet:
    """A fixed list of batches; `__call__(state)` -> {"eval_loss": token-mean NLL}."""

    def __init__(self, batches: list[dict], eval_step):
        self.batches = batches
        self.eval_step = eval_step

    def __call__(self, state: TrainState) -> dict[str, float]:
        nll, tokens = 0.0, 0.0
        for b in self.batches:
            out = jax.device_get(self.eval_step(state, b))
            nll += float(out["nll_sum"])
            tokens += float(out["tokens"])
        return {"eval_loss": nll / max(tokens, 1.0)}


@register_job("sft")
def run_sft(config, workdir: str) -> dict[str, Any]:
    """Supervised fine-tuning as configured; returns the final step's metrics."""
    model_cfg = model_config_from(config.model.to_dict())
    data_cfg = config.data.to_dict()
    optim_cfg = OptimConfig.from_mapping(config.optim.to_dict())
    loop_cfg = LoopConfig.from_mapping(config.train.to_dict())
    mesh = make_mesh(MeshConfig(**config.mesh.to_dict()))
    seed = int(config.seed)

    records = load_records(data_cfg, seed)
    n_eval = int(data_cfg["eval_records"])
    if n_eval >= len(records):
        raise ValueError(f"data.eval_records={n_eval} leaves no training records of {len(records)}")
    train_records, eval_records = records[: len(records) - n_eval], records[len(records) - n_eval :]
    tokenizer = build_tokenizer(data_cfg, train_records)
    if tokenizer.vocab_size > model_cfg.vocab_size:
        raise ValueError(
            f"tokenizer has {tokenizer.vocab_size} ids but model.vocab_size is "
            f"{model_cfg.vocab_size}"
        )
    if jax.process_index() == 0:
        os.makedirs(workdir, exist_ok=True)
        tokenizer.save(os.path.join(workdir, "tokenizer.json"))

    tx = make_optimizer(optim_cfg, loop_cfg.steps)
    init_fn = make_init_fn(model_cfg, tx, seed)
    graphdef = split_model(nnx.eval_shape(lambda: NemotronH(model_cfg, rngs=nnx.Rngs(seed))))[0]
    step_fn = functools.partial(
        sft_step,
        graphdef=graphdef,
        tx=tx,
        lr_fn=lr_schedule(optim_cfg, loop_cfg.steps),
        grad_accum_steps=optim_cfg.grad_accum_steps,
        aux_loss_coef=model_cfg.moe_aux_loss_coef,
        moe_bias_rate=optim_cfg.moe_bias_rate,
        loss_chunk_size=int(config.loss_chunk_size),
    )
    data_iter = iter(
        _batches(train_records, tokenizer, data_cfg, seed=seed, shuffle=True, num_epochs=None)
    )
    eval_fn = None
    if n_eval:
        eval_batches = list(
            _batches(eval_records, tokenizer, data_cfg, seed=seed, shuffle=False, num_epochs=1)
        )
        if not eval_batches:
            raise ValueError(
                f"data.eval_records={n_eval} fill no batch of "
                f"{data_cfg['global_batch']} rows; raise eval_records"
            )
        eval_step = jax.jit(
            functools.partial(
                sft_eval_step, graphdef=graphdef, loss_chunk_size=int(config.loss_chunk_size)
            )
        )
        eval_fn = _EvalSet([to_global(b, mesh) for b in eval_batches], eval_step)

    final = train_loop(
        config=loop_cfg,
        workdir=workdir,
        mesh=mesh,
        init_fn=init_fn,
        step_fn=step_fn,
        data_iter=data_iter,
        eval_fn=eval_fn,
    )
    if config.export_hf and not final.get("preempted"):
        if jax.process_count() > 1:  # export gathers every array on one host
            log.warning(
                "export_hf skipped in a %d-process run; export the final checkpoint with "
                "one process: nemocascade.train.sft_job.export_hf(config, workdir)",
                jax.process_count(),
            )
        else:
            export_hf(config, workdir)
    return final


def export_hf(config, workdir: str) -> str:
    """Restore the newest checkpoint of `workdir` (a run of `config`) and write it to
    `<workdir>/hf/` in Hugging Face format, with the run's tokenizer.json beside it."""
    model_cfg = model_config_from(config.model.to_dict())
    init_fn = make_init_fn(
        model_cfg,
        make_optimizer(OptimConfig.from_mapping(config.optim.to_dict()), int(config.train.steps)),
        int(config.seed),
    )
    mesh = make_mesh(MeshConfig(**config.mesh.to_dict()))
    abstract = jax.eval_shape(init_fn)
    ckpt = Checkpointer(os.path.join(workdir, CHECKPOINT_DIR), keep_last=1)
    try:
        restored = ckpt.restore_latest(
            abstract_with_shardings(abstract, full_shardings(abstract, mesh))
        )
    finally:
        ckpt.close()
    if restored is None:
        raise FileNotFoundError(f"{workdir}: no checkpoint to export")
    graphdef = split_model(nnx.eval_shape(lambda: NemotronH(model_cfg, rngs=nnx.Rngs(0))))[0]
    path = os.path.join(workdir, "hf")
    save_hf_checkpoint(merge_model(graphdef, restored[1]), path)
    tok = os.path.join(workdir, "tokenizer.json")
    if os.path.exists(tok):
        shutil.copy(tok, os.path.join(path, "tokenizer.json"))
    return path
