"""Supervised fine-tuning: the one SFT stage builder (`run_sft_stage`, also the cascade's SFT
stage) and the `sft` job (config -> model, tokenizer, packed data, optimizer -> train loop).

Config sections of the `sft` job (see configs/sft_tiny.py for a complete example):
    seed, model (ModelConfig), data (SFTDataConfig), optim (OptimConfig), train (LoopConfig),
    mesh (MeshConfig), loss_chunk_size (0: full logits; N: cross-entropy N tokens at a time, for
    large vocabularies), export_hf (write `<workdir>/hf/` in Hugging Face format at the end).
"""

from __future__ import annotations

import dataclasses
import functools
import logging
import os
import shutil
from collections.abc import Callable, Sequence
from typing import Any, Literal

import jax
import jax.numpy as jnp
from flax import nnx

from nemocascade import data as nc_data
from nemocascade.data.synthetic import arithmetic_records
from nemocascade.jobs.identity import model_identity, tokenizer_identity
from nemocascade.jobs.preflight import PreflightError, check_disk, state_bytes
from nemocascade.jobs.registry import register_job
from nemocascade.jobs.stages import check_buckets
from nemocascade.model import ModelConfig, NemotronH, save_hf_checkpoint
from nemocascade.sharding import MeshConfig, batch_shards, device_batch, make_mesh
from nemocascade.train.checkpoint import Checkpointer, abstract_with_shardings
from nemocascade.train.loop import (
    CHECKPOINT_DIR,
    IteratorSource,
    LoopConfig,
    LoopResult,
    full_shardings,
    train_loop,
)
from nemocascade.train.optim import OptimConfig, lr_schedule, make_optimizer
from nemocascade.train.sft import sft_eval_step, sft_step
from nemocascade.train.state import TrainState, merge_model, split_model
from nemocascade.typed_config import from_mapping

log = logging.getLogger(__name__)

BATCH_KEYS = ("input_ids", "targets", "loss_mask", "segment_ids", "positions")


@dataclasses.dataclass(frozen=True)
class PackingConfig:
    """How chat records become packed `[global_batch, seq_len]` rows (see `nemocascade.data`).

    shard_by="process": each process packs its own slice of the records (scales to any data
    size); "row": every process packs all records into the global batch and keeps its rows, so
    the global batch is the one a single process would see (small data, exact checks)."""

    seq_len: int
    global_batch: int
    thinking: bool
    non_thinking_fraction: float = 0.0
    overlong: Literal["truncate", "split"] = "truncate"
    shard_by: Literal["process", "row"] = "process"
    # longer row shapes, (seq_len, global_batch) each, beside (seq_len, global_batch): a record
    # is packed into the shortest shape that holds it, and each step is one shape's batch,
    # drawn in proportion to its records' tokens (`data.mixed_length_dataset`): long documents
    # train in long rows without making every short one pay for their attention
    buckets: tuple[tuple[int, int], ...] = ()

    def __post_init__(self):
        if self.seq_len < 2 or self.global_batch < 1:
            raise ValueError(
                f"need seq_len >= 2 and global_batch >= 1, got {self.seq_len}, {self.global_batch}"
            )
        check_buckets(self.seq_len, self.buckets)

    @property
    def shapes(self) -> tuple[tuple[int, int], ...]:
        """Every row shape, (seq_len, global_batch), shortest first."""
        return ((self.seq_len, self.global_batch), *sorted(self.buckets))


@dataclasses.dataclass(frozen=True)
class SFTDataConfig:
    """The `data` section of the `sft` job: where records come from, the tokenizer, packing."""

    source: Literal["arithmetic", "jsonl"]
    path: str  # JSONL file of chat records (source="jsonl")
    num_records: int  # how many arithmetic records to generate (source="arithmetic")
    eval_records: int  # records held out from the end of the list for `eval_loss` (0: no eval)
    tokenizer: str  # a tokenizer.json; "" trains a byte-level BPE of `vocab_size` on the records
    vocab_size: int
    seq_len: int
    global_batch: int
    thinking: bool
    non_thinking_fraction: float
    overlong: Literal["truncate", "split"]
    shard_by: Literal["process", "row"]
    buckets: tuple[tuple[int, int], ...] = ()  # longer (seq_len, global_batch) row shapes

    @property
    def packing(self) -> PackingConfig:
        fields = {f.name for f in dataclasses.fields(PackingConfig)}
        return PackingConfig(**{k: getattr(self, k) for k in fields})


def sft_batches(
    records: Sequence[dict],
    tokenizer,
    packing: PackingConfig,
    *,
    seed: int,
    shuffle: bool,
    num_epochs: int | None,
):
    """A grain dataset of this process's rows of each packed global batch (of several row
    shapes with `packing.buckets`: see `PackingConfig`)."""
    if not packing.buckets:
        return _one_shape(records, tokenizer, packing, seed, shuffle, num_epochs)

    def make(recs, seq_len: int, batch: int):
        one = dataclasses.replace(packing, seq_len=seq_len, global_batch=batch, buckets=())
        return _one_shape(recs, tokenizer, one, seed, shuffle, num_epochs)

    return nc_data.mixed_length_dataset(
        list(records),
        tokenizer,
        packing.shapes,
        make,
        thinking=packing.thinking,
        repeat=num_epochs is None,
    )


def _one_shape(records, tokenizer, packing: PackingConfig, seed, shuffle, num_epochs):
    n_proc, index = jax.process_count(), jax.process_index()
    if packing.global_batch % n_proc:
        raise ValueError(
            f"data.global_batch={packing.global_batch} is not divisible by {n_proc} processes"
        )
    by_row = packing.shard_by == "row"
    local = packing.global_batch // n_proc
    ds = nc_data.sft_dataset(
        list(records),
        tokenizer,
        seq_len=packing.seq_len,
        batch_size=packing.global_batch if by_row else local,
        seed=seed,
        shuffle=shuffle,
        num_epochs=num_epochs,
        shard_index=0 if by_row else index,
        shard_count=1 if by_row else n_proc,
        thinking=packing.thinking,
        non_thinking_fraction=packing.non_thinking_fraction,
        overlong=packing.overlong,
    )
    lo, hi = (index * local, (index + 1) * local) if by_row else (0, local)
    return ds.map(lambda b: {k: b[k][lo:hi] for k in BATCH_KEYS})


class _EvalSet:
    """A fixed list of device batches; `__call__(state)` -> {"eval_loss": token-mean NLL}."""

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


def initial_state(params, model_state, tx, seed: int) -> TrainState:
    """A TrainState at step 0: the given weights and a fresh optimizer state."""
    return TrainState(
        step=jnp.zeros((), jnp.int32),
        params=params,
        model_state=model_state,
        opt_state=tx.init(params),
        rng=jax.random.PRNGKey(seed),
    )


def fresh_weights(model_cfg: ModelConfig, seed: int, mesh=None) -> Callable[[], tuple]:
    """`() -> (params, model_state)` of a randomly initialised model (traceable: jitted by the
    loop straight into the parameters' shardings, never materialised whole on one device)."""

    def weights():
        _, params, rest = split_model(NemotronH(model_cfg, rngs=nnx.Rngs(seed), mesh=mesh))
        return params, rest

    return weights


def run_sft_stage(
    *,
    workdir: str,
    mesh,
    model_cfg: ModelConfig,
    graphdef: nnx.GraphDef,
    weights: Callable[[], tuple] | tuple,
    tokenizer,
    train_records: Sequence[dict],
    eval_records: Sequence[dict] = (),
    packing: PackingConfig,
    optim: OptimConfig,
    loop: LoopConfig,
    loss_chunk_size: int,
    seed: int,
    name: str | None = None,
    scores_fn: Callable[[TrainState], dict[str, float]] | None = None,
    until: Callable[[dict[str, float]], bool] | None = None,
) -> LoopResult:
    """SFT of `weights` (a `(params, model_state)` pair, or a traceable function returning one)
    on the packed records: the one SFT stage, for the `sft` job and the cascade's SFT stage.

    Every option is honoured: the optimizer (schedule, clipping, weight decay,
    `grad_accum_steps`, the MoE bias rate), the model's MoE aux-loss coefficient and
    `loss_chunk_size` (chunked cross-entropy, never [B, T, V] logits). With `eval_records`, the
    token-mean NLL on them is logged as `eval_loss` at `loop.eval_every` steps and checkpoints.
    `scores_fn(state)` adds measured scores (e.g. held-out accuracies) to those evaluations, and
    `until(metrics)` ends the stage early once they are good enough (`train_loop`).
    """
    tx = make_optimizer(optim, loop.steps)
    step_fn = functools.partial(
        sft_step,
        graphdef=graphdef,
        tx=tx,
        lr_fn=lr_schedule(optim, loop.steps),
        grad_accum_steps=optim.grad_accum_steps,
        aux_loss_coef=model_cfg.moe_aux_loss_coef,
        moe_bias_rate=optim.moe_bias_rate,
        loss_chunk_size=loss_chunk_size,
    )
    if callable(weights):

        def init():
            return initial_state(*weights(), tx, seed)

    else:
        init = initial_state(*weights, tx, seed)
    data = sft_batches(train_records, tokenizer, packing, seed=seed, shuffle=True, num_epochs=None)
    eval_fn = None
    if eval_records:
        batches = list(
            sft_batches(eval_records, tokenizer, packing, seed=seed, shuffle=False, num_epochs=1)
        )
        if not batches:
            raise ValueError(
                f"data.eval_records={len(eval_records)} fill no batch of "
                f"{packing.global_batch} rows; raise eval_records"
            )
        eval_step = jax.jit(
            functools.partial(sft_eval_step, graphdef=graphdef, loss_chunk_size=loss_chunk_size)
        )
        eval_fn = _EvalSet([device_batch(b, mesh) for b in batches], eval_step)
    if scores_fn is not None:
        eval_fn = _with_scores(eval_fn, scores_fn)
    return train_loop(
        config=loop,
        workdir=workdir,
        mesh=mesh,
        init=init,
        step_fn=step_fn,
        source=IteratorSource(iter(data)),
        eval_fn=eval_fn,
        eval_on_checkpoint=until is None,  # an early stop decides at eval_every steps only
        until=until,
        name=name,
    )


def _with_scores(eval_fn, scores_fn):
    def both(state: TrainState) -> dict[str, float]:
        return {**(eval_fn(state) if eval_fn is not None else {}), **scores_fn(state)}

    return both


# ----------------------------------------------------------------------------- the `sft` job
def load_records(data: SFTDataConfig, seed: int) -> list[dict]:
    """The chat records of the data section (validated when read from JSONL)."""
    if data.source == "arithmetic":
        return arithmetic_records(data.num_records, seed=seed)
    if not data.path:
        raise ValueError("data.source='jsonl' needs data.path")
    records, _ = nc_data.read_chat_jsonl(data.path)
    return records


def build_tokenizer(
    data: SFTDataConfig, records: list[dict], workdir: str | None = None
) -> nc_data.Tokenizer:
    """`data.tokenizer` if set; else the run's own `tokenizer.json` when the workdir has one (a
    resumed run keeps its vocabulary: that file is never rewritten); else a BPE trained on the
    records' text."""
    if data.tokenizer:
        return nc_data.Tokenizer.from_file(data.tokenizer)
    own = os.path.join(workdir, "tokenizer.json") if workdir else ""
    if own and os.path.exists(own):
        return nc_data.Tokenizer.from_file(own)
    texts = []
    for r in records:
        for m in r["messages"]:
            texts.append(m.get("content") or "")
            if m.get("reasoning_content"):
                texts.append(m["reasoning_content"])
    return nc_data.train_bpe(texts, data.vocab_size)


@dataclasses.dataclass(frozen=True)
class SFTJob:
    """The typed sections of an `sft` job config."""

    seed: int
    model: ModelConfig
    data: SFTDataConfig
    optim: OptimConfig
    train: LoopConfig
    mesh: MeshConfig
    loss_chunk_size: int
    export_hf: bool

    @classmethod
    def from_config(cls, config) -> SFTJob:
        return from_mapping(
            cls, {f.name: config[f.name] for f in dataclasses.fields(cls)}, "config"
        )


def abstract_train_state(config) -> TrainState:
    """The config's TrainState as shapes and dtypes only (`jax.eval_shape`; nothing allocated)."""
    job = SFTJob.from_config(config)
    tx = make_optimizer(job.optim, job.train.steps)
    weights = fresh_weights(job.model, job.seed)
    return jax.eval_shape(lambda: initial_state(*weights(), tx, job.seed))


def sft_identity(config) -> dict[str, Any]:
    """What an sft run's checkpoints and tokenizer depend on (`jobs.identity`)."""
    return {
        "job": "sft",
        "model": model_identity(config.model),
        "tokenizer": tokenizer_identity(config.data.tokenizer),
    }


def sft_preflight(config, workdir: str) -> None:
    """Before anything is written: the mesh splits the batch, the data file exists, the disk
    holds the planned checkpoints."""
    job = SFTJob.from_config(config)
    shards = batch_shards(make_mesh(job.mesh))
    if job.data.global_batch % shards:
        raise PreflightError(
            f"data.global_batch={job.data.global_batch} does not split over the {shards} batch "
            f"shards of the mesh (mesh.data x mesh.fsdp x mesh.expert on "
            f"{jax.device_count()} devices): use a multiple of {shards} or change mesh.*"
        )
    if job.data.source == "jsonl":
        for key in ("path", "tokenizer"):
            path = getattr(job.data, key)
            if (path or key == "path") and not os.path.isfile(path):
                raise PreflightError(f"data.{key}={path!r}: no such file")
    planned = job.train.keep_checkpoints + (1 if job.train.best_metric else 0)
    check_disk(
        workdir,
        planned * state_bytes(abstract_train_state(config)),
        f"{planned} checkpoints (train.keep_checkpoints + best)",
    )


@register_job("sft", identity=sft_identity, preflight=sft_preflight)
def run_sft(config, workdir: str) -> dict[str, Any]:
    """Supervised fine-tuning as configured; returns the final step's metrics."""
    job = SFTJob.from_config(config)
    mesh = make_mesh(job.mesh)
    records = load_records(job.data, job.seed)
    n_eval = job.data.eval_records
    if n_eval >= len(records):
        raise ValueError(f"data.eval_records={n_eval} leaves no training records of {len(records)}")
    train_records, eval_records = records[: len(records) - n_eval], records[len(records) - n_eval :]
    tokenizer = build_tokenizer(job.data, train_records, workdir)
    if tokenizer.vocab_size > job.model.vocab_size:
        raise ValueError(
            f"tokenizer has {tokenizer.vocab_size} ids but model.vocab_size is "
            f"{job.model.vocab_size}"
        )
    own = os.path.join(workdir, "tokenizer.json")
    if jax.process_index() == 0 and not os.path.exists(own):
        os.makedirs(workdir, exist_ok=True)
        tokenizer.save(own)
    weights = fresh_weights(job.model, job.seed, mesh)
    graphdef = split_model(
        nnx.eval_shape(lambda: NemotronH(job.model, rngs=nnx.Rngs(0), mesh=mesh))
    )[0]
    result = run_sft_stage(
        workdir=workdir,
        mesh=mesh,
        model_cfg=job.model,
        graphdef=graphdef,
        weights=weights,
        tokenizer=tokenizer,
        train_records=train_records,
        eval_records=eval_records,
        packing=job.data.packing,
        optim=job.optim,
        loop=job.train,
        loss_chunk_size=job.loss_chunk_size,
        seed=job.seed,
    )
    final = dict(result.record)
    if result.preempted:
        final["preempted"] = True
    elif job.export_hf:
        if jax.process_count() > 1:  # export gathers every array on one host
            log.warning(
                "export_hf skipped in a %d-process run; export the final checkpoint with "
                "one process: nemocascade.jobs.sft.export_hf(config, workdir)",
                jax.process_count(),
            )
        else:
            export_hf(config, workdir)
    return final


def export_hf(config, workdir: str) -> str:
    """Restore the newest checkpoint of `workdir` (a run of `config`) and write it to
    `<workdir>/hf/` in Hugging Face format, with the run's tokenizer.json beside it."""
    job = SFTJob.from_config(config)
    mesh = make_mesh(job.mesh)
    abstract = abstract_train_state(config)
    ckpt = Checkpointer(os.path.join(workdir, CHECKPOINT_DIR), keep_last=1)
    try:
        restored = ckpt.restore_latest(
            abstract_with_shardings(abstract, full_shardings(abstract, mesh))
        )
    finally:
        ckpt.close()
    if restored is None:
        raise FileNotFoundError(f"{workdir}: no checkpoint to export")
    graphdef = split_model(nnx.eval_shape(lambda: NemotronH(job.model, rngs=nnx.Rngs(0))))[0]
    path = os.path.join(workdir, "hf")
    save_hf_checkpoint(merge_model(graphdef, restored[1]), path)
    tok = os.path.join(workdir, "tokenizer.json")
    if os.path.exists(tok):
        shutil.copy(tok, os.path.join(path, "tokenizer.json"))
    return path
