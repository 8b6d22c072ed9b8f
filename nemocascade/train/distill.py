"""On-policy distillation and multi-domain on-policy distillation (MOPD; Cascade 2 §4.4, Eq. 2-4).

The student samples responses (its inference engine: `sampler_logprobs`); a teacher scores the
sampled tokens (`teacher_logprobs`); per response token t (s_t = prompt + y_<t):
    a_t = sg[log pi_teacher(y_t|s_t) - log pi_train(y_t|s_t)]               (Eq. 2)
    r_t = pi_train(y_t|s_t) / pi_sampler(y_t|s_t),
    w_t = sg[r_t] * 1[is_low <= r_t <= is_high]  (ICE-POP: masked, not clamped)   (Eq. 3)
    L   = -sum_t w_t a_t log pi_train(y_t|s_t) / |response tokens|            (Eq. 4)
The denominator counts every response token of the batch (token-level, as NeMo-RL's
`token_level_loss`); tokens outside the band add 0 to the numerator only.

`cfg.objective = "reverse_kl"` instead minimises the full-vocabulary KL(student || teacher) at
every response position, through `losses.reverse_kl_per_token` (never [B, T, V] fp32); it needs
the teacher in the step rather than `teacher_logprobs` in the batch: bind `teacher_graphdef`
(static) and pass `teacher_state` at call time, so the teacher's weights are traced arguments of
the jitted step, not constants baked into it:
    step = jax.jit(functools.partial(distill_train_step, graphdef=g, tx=tx, cfg=cfg,
                                     teacher_graphdef=tg))
    state, metrics = step(state, batch, teacher_state=teacher_states)

MOPD routing (`mopd_teacher_logprobs`): each row carries a domain index; each domain maps to one
teacher (several teachers held at once); teachers are never mixed. The reverse-KL objective routes
the same way inside the step: `teacher_graphdef` a tuple of K graphdefs, `teacher_state` a tuple
of K states, `batch["teacher_index"]` [B] each row's teacher.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable, Mapping
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

from nemocascade.generate import bucket
from nemocascade.train import losses, optim
from nemocascade.train.state import TrainState
from nemocascade.train.steps import (
    accumulate,
    check_batch,
    common_stats,
    loss_denominator,
    replay_stats,
    step_metrics,
)
from nemocascade.typed_config import from_mapping

Batch = Mapping[str, jax.Array]
OBJECTIVES = ("sampled_token", "reverse_kl")


@dataclasses.dataclass(frozen=True)
class DistillConfig:
    """Hyperparameters of the (MO)PD step (the `distill` config section)."""

    is_low: float = 0.5  # ICE-POP band on r_t = pi_train / pi_sampler (paper: [0.5, 2.0])
    is_high: float = 2.0
    importance_weighting: bool = True  # False: w_t = 1 (strictly on-policy samples)
    objective: str = "sampled_token"  # or "reverse_kl" (full distribution)
    compute_entropy: bool = True
    logprob_chunk: int = losses.DEFAULT_CHUNK
    grad_accum_steps: int = 1

    def __post_init__(self):
        if not 0 <= self.is_low <= 1 <= self.is_high:
            raise ValueError(f"distill: need 0 <= is_low <= 1 <= is_high: {self}")
        if self.objective not in OBJECTIVES:
            raise ValueError(f"distill: objective {self.objective!r} not in {OBJECTIVES}")
        if self.logprob_chunk < 1 or self.grad_accum_steps < 1:
            raise ValueError(f"distill: bad logprob_chunk/grad_accum_steps in {self}")

    @classmethod
    def from_mapping(cls, cfg: Mapping[str, Any]) -> DistillConfig:
        """From a config section; unknown keys raise, naming the valid ones."""
        return from_mapping(cls, cfg, "distill")


class Teacher(NamedTuple):
    """A frozen model: its graphdef and its state (a TrainState, or the nnx.State(s) that
    `nnx.merge(graphdef, *states)` takes)."""

    graphdef: nnx.GraphDef
    state: Any


def _states(state: Any) -> tuple:
    if isinstance(state, TrainState):
        return (state.params, state.model_state)
    return tuple(state) if isinstance(state, (tuple, list)) else (state,)


# ============================================================================ per-token terms
def mopd_token_terms(
    logp_BT: jax.Array, teacher_logp_BT: jax.Array, sampler_logp_BT: jax.Array, cfg: DistillConfig
) -> tuple[jax.Array, dict]:
    """(per-token loss -w_t a_t log pi_train(y_t) [B, T], diagnostics {advantage, weight,
    in_band, ratio}) of Eq. 2-4; `logp_BT` carries the gradient, a_t and w_t do not."""
    logp_sg = jax.lax.stop_gradient(logp_BT)
    adv_BT = teacher_logp_BT.astype(jnp.float32) - logp_sg
    ratio_BT = jnp.exp(logp_sg - sampler_logp_BT.astype(jnp.float32))
    if cfg.importance_weighting:
        in_band = (ratio_BT >= cfg.is_low) & (ratio_BT <= cfg.is_high)
        w_BT = ratio_BT * in_band
    else:
        in_band = jnp.ones(ratio_BT.shape, bool)
        w_BT = jnp.ones_like(ratio_BT)
    loss_BT = -w_BT * adv_BT * logp_BT
    return loss_BT, {
        "advantage": adv_BT,
        "weight": w_BT,
        "in_band": in_band.astype(jnp.float32),
        "ratio": ratio_BT,
    }


def _merge(graphdef, state):
    return nnx.merge(graphdef, *_states(state))


def _teacher_rows(teacher_graphdef, teacher_state, batch: Batch):
    """[(graphdef, state, rows [B] bool or None)]: one teacher for every row, or (MOPD) a tuple of
    teachers with `batch["teacher_index"]` [B] choosing each row's."""
    if not isinstance(teacher_graphdef, tuple):
        return [(teacher_graphdef, teacher_state, None)]
    if not isinstance(teacher_state, (tuple, list)) or len(teacher_state) != len(teacher_graphdef):
        raise ValueError(
            f"distill: {len(teacher_graphdef)} teacher graphdefs need as many teacher "
            "states (a tuple, one per teacher)"
        )
    if "teacher_index" not in batch:
        raise KeyError(
            "distill: several teachers need batch['teacher_index'] [B] (each row's teacher)"
        )
    idx_B = batch["teacher_index"]
    return [
        (g, st, idx_B == k)
        for k, (g, st) in enumerate(zip(teacher_graphdef, teacher_state, strict=True))
    ]


def distill_loss(
    params: nnx.State,
    model_state: nnx.State,
    batch: Batch,
    *,
    graphdef: nnx.GraphDef,
    cfg: DistillConfig,
    denom: jax.Array,
    teacher_graphdef: nnx.GraphDef | None = None,
    teacher_state: Any = None,
    aux_loss_coef: float = 0.0,
    num_micro: int = 1,
):
    """`(loss, stats)` of one (micro)batch: summed per-token loss / `denom` (response tokens of
    the whole batch) + aux_loss_coef * MoE aux loss / num_micro; differentiable in params."""
    model = nnx.merge(graphdef, params, model_state)
    mask_BT = batch["loss_mask"].astype(jnp.float32)
    # the student replays the sampler's experts with batch["routes"] (R3); teachers route freely
    h_BTD, w_DV, aux = losses.model_hidden_and_head(model, batch, batch.get("routes"))
    logp_BT, ent_BT = losses.token_logprobs_and_entropy(
        h_BTD,
        w_DV,
        batch["targets"],
        chunk_size=cfg.logprob_chunk,
        with_entropy=cfg.compute_entropy,
    )
    if cfg.objective == "sampled_token":
        loss_BT, diag = mopd_token_terms(
            logp_BT, batch["teacher_logprobs"], batch["sampler_logprobs"], cfg
        )
        extra = {
            "advantage_sum": jnp.sum(diag["advantage"] * mask_BT),
            "in_band_sum": jnp.sum(diag["in_band"] * mask_BT),
        }
    else:
        if teacher_graphdef is None or teacher_state is None:
            raise ValueError(
                "distill: objective 'reverse_kl' needs teacher_graphdef and teacher_state"
            )
        loss_BT = jnp.zeros(mask_BT.shape, jnp.float32)
        for t_graphdef, t_state, row_B in _teacher_rows(teacher_graphdef, teacher_state, batch):
            ht_BTE, wt_EV, _ = losses.model_hidden_and_head(_merge(t_graphdef, t_state), batch)
            kl_BT = losses.reverse_kl_per_token(
                h_BTD, w_DV, ht_BTE, wt_EV, chunk_size=cfg.logprob_chunk
            )
            loss_BT = kl_BT if row_B is None else jnp.where(row_B[:, None], kl_BT, loss_BT)
        extra = {"reverse_kl_sum": jnp.sum(jax.lax.stop_gradient(loss_BT) * mask_BT)}
    num = jnp.sum(loss_BT * mask_BT)
    loss = num / denom
    if aux_loss_coef:
        loss = loss + aux_loss_coef * aux["aux_loss"] / num_micro
    stats = (
        common_stats(logp_BT, ent_BT, mask_BT, batch["sampler_logprobs"], aux["expert_counts"])
        | extra
        | {"loss_sum": jax.lax.stop_gradient(num)}
        | replay_stats(batch, aux)
    )
    return loss, stats


def distill_train_step(
    state: TrainState,
    batch: Batch,
    *,
    graphdef: nnx.GraphDef,
    tx: optax.GradientTransformation,
    cfg: DistillConfig,
    teacher_graphdef: nnx.GraphDef | None = None,
    teacher_state: Any = None,
    lr_fn: Callable | None = None,
    aux_loss_coef: float = 0.0,
    moe_bias_rate: float = 0.0,
) -> tuple[TrainState, dict[str, jax.Array]]:
    """One on-policy distillation update. Pure once the keywords are bound (jit it).

    batch: input_ids, targets, loss_mask, segment_ids, sampler_logprobs [B, T], and
    teacher_logprobs [B, T] for the sampled-token objective; for "reverse_kl" the teacher
    (`teacher_graphdef` bound, `teacher_state` passed per call: see the module docstring), or
    for MOPD several: a tuple of K graphdefs, a tuple of K states and batch["teacher_index"] [B]
    (int, each row's teacher). Every teacher runs on every row and its KL is kept on its own
    rows: K teacher forwards and K full-vocabulary KL passes per row, which is cheap for a few
    small teachers; for several large ones the sampled-token objective scores each row once.
    NaN/Inf loss or gradient skips the update. metrics: loss, entropy, tokens, logp_gap_mean /
    _max, grad_norm, skipped; sampled-token: advantage (mean a_t, i.e. minus the sampled
    reverse-KL estimate), in_band_fraction; reverse_kl: reverse_kl; moe_max_violation with MoE
    layers; lr with `lr_fn`.
    """
    required = ("input_ids", "targets", "loss_mask", "segment_ids", "sampler_logprobs")
    if cfg.objective == "sampled_token":
        required += ("teacher_logprobs",)
    check_batch(batch, required, "distill_train_step")
    denom = loss_denominator(batch, token_level=True)
    loss_fn = functools.partial(
        distill_loss,
        graphdef=graphdef,
        cfg=cfg,
        denom=denom,
        teacher_graphdef=teacher_graphdef,
        teacher_state=teacher_state,
        aux_loss_coef=aux_loss_coef,
        num_micro=cfg.grad_accum_steps,
    )
    _, stats, grads = accumulate(
        loss_fn, state.params, state.model_state, batch, cfg.grad_accum_steps
    )
    loss = stats["loss_sum"] / denom
    new_state, grad_norm, skipped = optim.apply_update(
        state, loss, grads, stats["expert_counts"], tx=tx, moe_bias_rate=moe_bias_rate
    )
    metrics = step_metrics(state, stats, lr_fn) | {
        "loss": loss,
        "grad_norm": grad_norm,
        "skipped": skipped,
    }
    if cfg.objective == "sampled_token":
        metrics |= {
            "advantage": stats["advantage_sum"] / denom,
            "in_band_fraction": stats["in_band_sum"] / denom,
        }
    else:
        metrics["reverse_kl"] = stats["reverse_kl_sum"] / denom
    return new_state, metrics


# ============================================================================ teacher scoring
@functools.partial(jax.jit, static_argnames=("graphdef", "chunk"))
def _score(graphdef, states, input_ids, targets, segment_ids, *, chunk):
    model = nnx.merge(graphdef, *states)
    batch = {"input_ids": input_ids, "targets": targets, "segment_ids": segment_ids}
    return losses.model_token_logprobs(model, batch, chunk_size=chunk)[0]


def teacher_logprobs(
    teacher_graphdef: nnx.GraphDef,
    teacher_state_or_params: Any,
    batch: Batch,
    *,
    chunk: int = losses.DEFAULT_CHUNK,
) -> jax.Array:
    """log pi_teacher(targets) [B, T] fp32 of the student's sampled tokens (no gradient).

    `teacher_state_or_params`: a TrainState or the state(s) `nnx.merge` takes. Jitted and cached
    per (graphdef, shapes, chunk)."""
    check_batch(batch, ("input_ids", "targets", "segment_ids"), "teacher_logprobs")
    return _score(
        teacher_graphdef,
        _states(teacher_state_or_params),
        batch["input_ids"],
        batch["targets"],
        batch["segment_ids"],
        chunk=int(chunk),
    )


def teacher_groups(teachers: Mapping[Any, Teacher]) -> list[tuple[Teacher, list]]:
    """[(teacher, its domains)], each distinct Teacher object once (a checkpoint that teaches
    several domains is run once), in first-seen order."""
    groups: dict[int, tuple[Teacher, list]] = {}
    for dom, t in teachers.items():
        groups.setdefault(id(t), (t, []))[1].append(dom)
    return list(groups.values())


def mopd_teacher_logprobs(
    batch: Mapping[str, Any],
    teachers: Mapping[Any, Teacher],
    *,
    domains_B=None,
    chunk: int = losses.DEFAULT_CHUNK,
    mode: str = "gather",
) -> jax.Array:
    """teacher_logprobs [B, T] with row b scored by `teachers[domains_B[b]]` (MOPD routing);
    `domains_B` defaults to `batch["domain"]` [B] (host values: routing happens on the host).

    Teachers shared by several domains (the same Teacher object) run once over the union of
    their rows. Cost choice (`mode`):
      - "gather" (default): each teacher scores only its own rows (gathered on the host, padded
        to a power-of-two row count): every row runs through exactly one teacher, so the cost
        is one teacher forward per row; a teacher compiles once per bucket size.
      - "all": every teacher scores the whole batch and rows are selected: K teachers cost K
        forwards per row, but one shape and no host gather; only for few, cheap teachers.
    """
    if mode not in ("gather", "all"):
        raise ValueError(f"mopd_teacher_logprobs: mode {mode!r} not in ('gather', 'all')")
    if domains_B is None:
        if "domain" not in batch:
            raise KeyError("mopd_teacher_logprobs: pass domains_B or a batch['domain'] [B]")
        domains_B = batch["domain"]
    domains_B = np.asarray(domains_B)
    B = batch["input_ids"].shape[0]
    if domains_B.shape != (B,):
        raise ValueError(f"mopd_teacher_logprobs: domains has shape {domains_B.shape}, need ({B},)")
    unknown = sorted({d.item() for d in np.unique(domains_B)} - set(teachers))
    if unknown:
        raise KeyError(
            f"mopd_teacher_logprobs: no teacher for domains {unknown}; teachers are "
            f"{sorted(teachers)}"
        )
    out = jnp.zeros(batch["targets"].shape, jnp.float32)
    for t, doms in teacher_groups(teachers):
        rows = np.nonzero(np.isin(domains_B, doms))[0]
        if rows.size == 0:
            continue
        if mode == "all":
            lp = teacher_logprobs(t.graphdef, t.state, batch, chunk=chunk)
            out = jnp.where(jnp.asarray(np.isin(domains_B, doms))[:, None], lp, out)
            continue
        idx = np.concatenate([rows, np.full(bucket(rows.size, 1) - rows.size, rows[0])])
        sub = {k: jnp.asarray(batch[k])[idx] for k in ("input_ids", "targets", "segment_ids")}
        lp = teacher_logprobs(t.graphdef, t.state, sub, chunk=chunk)
        out = out.at[rows].set(lp[: rows.size])
    return out
