"""Bradley-Terry reward-model training: the loss, the pure train step, held-out evaluation and
the reward-model stage (the one train loop over an `IteratorSource` of preference batches).

With r_c, r_r the rewards of a pair's chosen and rejected responses (`RewardModel`, the last
real token's hidden state through a scalar head) and d = r_c - r_r:

    loss = mean over pairs of -log sigmoid(d) = log(1 + exp(-d))      (softplus(-d), stable)
    d loss / d r_c = -sigmoid(-d) / P,  d loss / d r_r = +sigmoid(-d) / P

The batch is `data.preferences.pair_batch`'s: chosen_ids / rejected_ids [P, T], chosen_last /
rejected_last [P], pair_mask [P] (0: a padding pair, ignored). Both sides run as one [2P, T]
forward. The mean is over the real pairs of the whole batch (its count is taken before
microbatching, so `grad_accum_steps` microbatches sum to the full-batch gradient).

metrics: loss, accuracy (fraction of pairs with r_c > r_r), margin (mean d), reward_chosen,
reward_rejected (means), pairs, grad_norm, lr, skipped, and with MoE layers moe_max_violation.
Evaluation over held-out pairs (`PairEvalSet`): eval_loss, eval_accuracy, eval_margin.
"""

from __future__ import annotations

import functools
import os
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import NamedTuple

import jax
import jax.numpy as jnp
import optax
from flax import nnx

from nemocascade.model.config import ModelConfig
from nemocascade.model.reward_head import RewardModel, abstract_reward_model, split_reward_model
from nemocascade.sharding import device_batch
from nemocascade.train.checkpoint import Checkpointer
from nemocascade.train.loop import (
    CHECKPOINT_DIR,
    IteratorSource,
    LoopConfig,
    LoopResult,
    full_shardings,
    train_loop,
)
from nemocascade.train.optim import OptimConfig, apply_update, lr_schedule, make_optimizer
from nemocascade.train.state import TrainState
from nemocascade.train.steps import accumulate, update_metrics

Batch = Mapping[str, jax.Array]
PAIR_KEYS = ("chosen_ids", "chosen_last", "rejected_ids", "rejected_last", "pair_mask")


# ----------------------------------------------------------------------------- the loss
def bradley_terry_loss(r_chosen_P: jax.Array, r_rejected_P: jax.Array) -> jax.Array:
    """mean over pairs of -log sigmoid(r_chosen - r_rejected)."""
    return jnp.mean(jax.nn.softplus(-(r_chosen_P - r_rejected_P)))


def pair_sums(r_chosen_P, r_rejected_P, pair_mask_P) -> dict[str, jax.Array]:
    """Additive statistics of a batch of pairs (padding pairs masked out): loss_sum, correct,
    margin_sum, chosen_sum, rejected_sum, pairs."""
    m = pair_mask_P.astype(jnp.float32)
    d = r_chosen_P - r_rejected_P
    return {
        "loss_sum": jnp.sum(jax.nn.softplus(-d) * m),
        "correct": jnp.sum((d > 0) * m),
        "margin_sum": jnp.sum(d * m),
        "chosen_sum": jnp.sum(r_chosen_P * m),
        "rejected_sum": jnp.sum(r_rejected_P * m),
        "pairs": jnp.sum(m),
    }


def check_pair_batch(batch: Batch, where: str) -> None:
    """KeyError / ValueError naming a missing key or a mismatching shape (at trace time)."""
    missing = [k for k in PAIR_KEYS if k not in batch]
    if missing:
        raise KeyError(f"{where}: batch is missing {missing}; it has {sorted(batch)}")
    shape = batch["chosen_ids"].shape
    want = {"rejected_ids": shape, "chosen_last": shape[:1], "rejected_last": shape[:1]}
    want["pair_mask"] = shape[:1]
    for k, s in want.items():
        if batch[k].shape != s:
            raise ValueError(f"{where}: batch[{k!r}] has shape {batch[k].shape}, expected {s}")


def pair_rewards(model: RewardModel, batch: Batch) -> tuple[jax.Array, jax.Array, dict]:
    """(r_chosen [P], r_rejected [P], MoE aux) from one [2P, T] forward."""
    P = batch["chosen_ids"].shape[0]
    ids = jnp.concatenate([batch["chosen_ids"], batch["rejected_ids"]])
    last = jnp.concatenate([batch["chosen_last"], batch["rejected_last"]])
    r, aux = model(ids, last, return_aux=True)
    return r[:P], r[P:], aux


def reward_model_loss(
    params: nnx.State,
    model_state: nnx.State,
    batch: Batch,
    *,
    graphdef: nnx.GraphDef,
    denom: jax.Array,
    aux_loss_coef: float = 0.0,
    num_micro: int = 1,
):
    """`(loss, stats)` of one (micro)batch: loss = loss_sum / denom (+ the MoE aux loss),
    denom the real pairs of the whole batch; stats = `pair_sums` + expert_counts."""
    model = nnx.merge(graphdef, params, model_state)
    rc, rr, aux = pair_rewards(model, batch)
    stats = pair_sums(rc, rr, batch["pair_mask"])
    loss = stats["loss_sum"] / denom
    if aux_loss_coef:
        loss = loss + aux_loss_coef * aux["aux_loss"] / num_micro
    return loss, {**stats, "expert_counts": aux["expert_counts"].astype(jnp.float32)}


def _means(stats: Mapping[str, jax.Array], prefix: str = "") -> dict[str, jax.Array]:
    n = jnp.maximum(stats["pairs"], 1.0)
    return {
        f"{prefix}loss": stats["loss_sum"] / n,
        f"{prefix}accuracy": stats["correct"] / n,
        f"{prefix}margin": stats["margin_sum"] / n,
        f"{prefix}reward_chosen": stats["chosen_sum"] / n,
        f"{prefix}reward_rejected": stats["rejected_sum"] / n,
        f"{prefix}pairs": stats["pairs"],
    }


# ----------------------------------------------------------------------------- the step
def reward_model_step(
    state: TrainState,
    batch: Batch,
    *,
    graphdef: nnx.GraphDef,
    tx: optax.GradientTransformation,
    lr_fn: Callable[[jax.Array], jax.Array],
    grad_accum_steps: int = 1,
    aux_loss_coef: float = 0.0,
    moe_bias_rate: float = 0.0,
) -> tuple[TrainState, dict[str, jax.Array]]:
    """One Bradley-Terry update. Pure `(state, batch) -> (state, metrics)` once the keywords are
    bound; `graphdef` is `split_reward_model`'s. NaN/Inf losses or gradients skip the update
    (`optim.apply_update`); the MoE correction biases follow this batch's expert counts."""
    check_pair_batch(batch, "reward_model_step")
    denom = jnp.maximum(jnp.sum(batch["pair_mask"].astype(jnp.float32)), 1.0)
    loss_fn = functools.partial(
        reward_model_loss,
        graphdef=graphdef,
        denom=denom,
        aux_loss_coef=aux_loss_coef,
        num_micro=grad_accum_steps,
    )
    _, stats, grads = accumulate(loss_fn, state.params, state.model_state, batch, grad_accum_steps)
    counts_LE = stats.pop("expert_counts")
    metrics = _means(stats)
    new_state, grad_norm, skipped = apply_update(
        state, metrics["loss"], grads, counts_LE, tx=tx, moe_bias_rate=moe_bias_rate
    )
    return new_state, metrics | update_metrics(state, counts_LE, grad_norm, skipped, lr_fn)


def reward_model_eval_step(state, batch: Batch, *, graphdef: nnx.GraphDef) -> dict[str, jax.Array]:
    """`pair_sums` of a batch under the state's weights (no update); `state` is a TrainState or
    anything with `.params` and `.model_state`."""
    check_pair_batch(batch, "reward_model_eval_step")
    model = nnx.merge(graphdef, state.params, state.model_state)
    rc, rr, _ = pair_rewards(model, batch)
    return pair_sums(rc, rr, batch["pair_mask"])


class PairEvalSet:
    """Held-out pairs as a fixed list of device batches; `__call__(state)` -> eval_loss,
    eval_accuracy, eval_margin, eval_reward_chosen, eval_reward_rejected, eval_pairs (over all
    real pairs of all batches). The loop's `eval_fn`, or `evaluate(model)` for a RewardModel."""

    def __init__(self, batches: Iterable[Mapping], graphdef: nnx.GraphDef, mesh=None):
        self.batches = [device_batch(b, mesh, process_local=False) for b in batches]
        if not self.batches:
            raise ValueError("PairEvalSet: no held-out batches")
        self.graphdef = graphdef
        self._step = jax.jit(functools.partial(reward_model_eval_step, graphdef=graphdef))

    def __call__(self, state) -> dict[str, float]:
        total: dict[str, float] = {}
        for b in self.batches:
            for k, v in jax.device_get(self._step(state, b)).items():
                total[k] = total.get(k, 0.0) + float(v)
        return {k: float(v) for k, v in _means(total, "eval_").items()}

    def evaluate(self, model: RewardModel) -> dict[str, float]:
        _, params, rest = split_reward_model(model)
        return self(_Weights(params, rest))


class _Weights(NamedTuple):
    """The weights of a state without its optimizer (a pytree, as `jax.jit` needs)."""

    params: nnx.State
    model_state: nnx.State


# ----------------------------------------------------------------------------- weights
def reward_model_graphdef(cfg: ModelConfig, mesh=None) -> nnx.GraphDef:
    """The graphdef of `split_reward_model` for `cfg` (nothing allocated)."""
    return split_reward_model(abstract_reward_model(cfg, mesh))[0]


def fresh_reward_weights(cfg: ModelConfig, seed: int, mesh=None) -> Callable[[], tuple]:
    """`() -> (params, model_state)` of a randomly initialised reward model (traceable)."""

    def weights():
        _, params, rest = split_reward_model(RewardModel(cfg, rngs=nnx.Rngs(seed), mesh=mesh))
        return params, rest

    return weights


def reward_weights_from_policy(
    policy_graphdef: nnx.GraphDef, params: nnx.State, model_state: nnx.State, *, seed: int
) -> tuple[nnx.State, nnx.State]:
    """`(params, model_state)` of a reward model whose backbone is a copy of the given NemotronH
    weights (e.g. the SFT stage's; a copy, since the train loop donates its state) and whose
    head is freshly initialised from `seed`."""
    backbone = nnx.merge(policy_graphdef, params, model_state)
    model = RewardModel(backbone.cfg, rngs=nnx.Rngs(seed), backbone=backbone)
    _, p, rest = split_reward_model(model)
    return jax.tree.map(jnp.copy, (p, rest))


def initial_state(params, model_state, tx, seed: int) -> TrainState:
    return TrainState(
        step=jnp.zeros((), jnp.int32),
        params=params,
        model_state=model_state,
        opt_state=tx.init(params),
        rng=jax.random.PRNGKey(seed),
    )


# ----------------------------------------------------------------------------- the stage
def run_reward_model_stage(
    *,
    workdir: str,
    mesh,
    model_cfg: ModelConfig,
    graphdef: nnx.GraphDef,
    weights: Callable[[], tuple] | tuple,
    train_batches,
    eval_batches: Sequence[Mapping] = (),
    optim: OptimConfig,
    loop: LoopConfig,
    seed: int,
    name: str | None = None,
) -> LoopResult:
    """Bradley-Terry training of `weights` (a `(params, model_state)` pair of
    `split_reward_model`, or a traceable function returning one) in the one train loop.

    `train_batches`: an iterator of `pair_batch` dicts with `get_state` / `set_state` (e.g.
    `iter(data.preferences.preference_dataset(...))`, this process's pairs); `eval_batches`:
    held-out pair batches, evaluated every `loop.eval_every` steps and at checkpoints
    (eval_accuracy, eval_margin, eval_loss). Checkpoints (orbax, with the head) go to
    `workdir/checkpoints`; `final_reward_model(workdir, ...)` rebuilds the model from the newest.
    Concrete `weights` become the loop's state, which each step donates: their arrays may be
    deleted (pass copies of weights that are still needed).
    """
    tx = make_optimizer(optim, loop.steps)
    step_fn = functools.partial(
        reward_model_step,
        graphdef=graphdef,
        tx=tx,
        lr_fn=lr_schedule(optim, loop.steps),
        grad_accum_steps=optim.grad_accum_steps,
        aux_loss_coef=model_cfg.moe_aux_loss_coef,
        moe_bias_rate=optim.moe_bias_rate,
    )
    if callable(weights):

        def init():
            return initial_state(*weights(), tx, seed)

    else:
        init = initial_state(*weights, tx, seed)
    eval_fn = PairEvalSet(eval_batches, graphdef, mesh) if eval_batches else None
    return train_loop(
        config=loop,
        workdir=workdir,
        mesh=mesh,
        init=init,
        step_fn=step_fn,
        source=IteratorSource(train_batches),
        eval_fn=eval_fn,
        progress_keys=("loss", "accuracy"),
        name=name,
    )


def final_reward_model(workdir: str, model_cfg: ModelConfig, mesh=None) -> RewardModel:
    """The RewardModel of the newest checkpoint in `workdir` (a `run_reward_model_stage` run),
    e.g. to export it with `model.reward_head.export_reward_model`."""
    graphdef, params, rest = split_reward_model(abstract_reward_model(model_cfg, mesh))
    abstract = {"params": params, "model_state": rest}
    if mesh is not None:
        shardings = full_shardings(abstract, mesh)
        abstract = jax.tree.map(
            lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), abstract, shardings
        )
    ckpt = Checkpointer(os.path.join(workdir, CHECKPOINT_DIR), keep_last=1)
    try:
        steps = ckpt.all_steps()
        if not steps:
            raise FileNotFoundError(f"{workdir}: no reward-model checkpoint")
        out = ckpt.restore_fields(steps[-1], abstract)
    finally:
        ckpt.close()
    return nnx.merge(graphdef, out["params"], out["model_state"])
