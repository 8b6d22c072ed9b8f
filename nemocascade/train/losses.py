"""Large-vocabulary token losses that never hold `[tokens, V]` fp32 logits for the whole batch.

The lm_head projection, the softmax statistics and their gradients are computed in chunks of
about `chunk_size` tokens inside a `lax.scan`, with hand-written `jax.custom_vjp` rules: the
forward pass keeps only per-token statistics (log-sum-exp, entropy, KL) and the backward pass
recomputes each chunk's logits, so peak temporary memory is O(chunk_size x V) (plus the `[D, V]`
weight gradient) instead of O(N x V). A chunk is every row x `chunk_size // rows` positions
(the sequence is chunked, not the flattened batch), so with the batch sharded over devices
each device holds O(chunk_size / n_devices x V) and every scan step keeps all devices busy.
Values and gradients equal the naive versions below (`naive_*`), which materialise the logits and
are kept as the reference for tests/benchmarks.

Shapes: [B, T] tokens (more leading dims are folded into rows), D hidden, V vocab;
internally [K chunks, B, C positions]. Logits are
`h_ND @ w_DV` accumulated in fp32 (`preferred_element_type`), like `NemotronH.logits`.

Gradient formulas used by the backward rules (z = student logits of one token, p = softmax(z)):
    log p(y):            d/dz_j = 1[j = y] - p_j
    entropy H(p):        d/dz_j = -p_j (log p_j + H)
    KL(p || q), q fixed: d/dz_j = p_j (log p_j - log q_j - KL)
No gradient flows into the teacher of the KL (its hidden states and weights are constants).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from nemocascade.model.layers import dtype_of

DEFAULT_CHUNK = 1024


# ----------------------------------------------------------------------------- helpers
def _logits(h_CD: jax.Array, w_DV: jax.Array) -> jax.Array:
    """fp32 logits [C, V] of a chunk."""
    return jnp.dot(h_CD, w_DV, preferred_element_type=jnp.float32)


def _dot_vt(dz_CV: jax.Array, w_DV: jax.Array) -> jax.Array:
    """dz @ w.T in fp32 without materialising the transposed weight."""
    return jax.lax.dot_general(
        dz_CV, w_DV, (((1,), (1,)), ((), ())), preferred_element_type=jnp.float32
    )


def _to_chunks(x_BT: jax.Array, ct: int) -> jax.Array:
    """[B, T, ...] -> [K, B, ct, ...]: chunks along T (zero-padded at the end). Chunking the
    sequence, not the flattened batch, keeps the batch axis (data-sharded) in every chunk, so
    each scan step works on all devices' rows at once."""
    T = x_BT.shape[1]
    k = -(-T // ct)
    if k * ct != T:
        x_BT = jnp.pad(x_BT, [(0, 0), (0, k * ct - T)] + [(0, 0)] * (x_BT.ndim - 2))
    x = x_BT.reshape(x_BT.shape[:1] + (k, ct) + x_BT.shape[2:])
    return jnp.moveaxis(x, 1, 0)


def _from_chunks(x_KBC: jax.Array, T: int) -> jax.Array:
    """[K, B, ct] -> [B, T]."""
    x = jnp.moveaxis(x_KBC, 0, 1)
    return x.reshape(x.shape[:1] + (-1,))[:, :T]


def _flat(x: jax.Array) -> jax.Array:
    """[B, ct, ...] -> [B * ct, ...] (one chunk's tokens)."""
    return x.reshape((-1,) + x.shape[2:])


def _as_rows(lead: tuple, chunk_size: int) -> tuple[int, int, int]:
    """(rows, T, positions per chunk) for leading shape `lead`: the last axis is the sequence,
    the others are rows; a chunk holds about `chunk_size` tokens (all rows x ct positions)."""
    T = lead[-1] if lead else 1
    rows = int(np.prod(lead[:-1])) if len(lead) > 1 else 1
    return rows, T, max(1, min(T, int(chunk_size) // rows))


def _check(h: jax.Array, w_DV: jax.Array, name: str) -> None:
    if h.shape[-1] != w_DV.shape[0]:
        raise ValueError(
            f"losses: {name} hidden size {h.shape[-1]} != weight rows {w_DV.shape[0]} "
            f"(h {h.shape}, w {w_DV.shape})"
        )


# ----------------------------------------------------------------------------- log-prob / entropy
@functools.partial(jax.custom_vjp, nondiff_argnums=(3,))
def _logprob_entropy(h_KBCD, w_DV, tgt_KBC, with_entropy: bool):
    out, _ = _logprob_entropy_fwd(h_KBCD, w_DV, tgt_KBC, with_entropy)
    return out


def _logprob_entropy_fwd(h_KBCD, w_DV, tgt_KBC, with_entropy):
    def body(_, xs):
        h_CD, t_C = _flat(xs[0]), _flat(xs[1])
        z_CV = _logits(h_CD, w_DV)
        lse_C = jax.nn.logsumexp(z_CV, axis=-1)
        logp_C = jnp.take_along_axis(z_CV, t_C[:, None], axis=-1)[:, 0] - lse_C
        if with_entropy:
            p_CV = jnp.exp(z_CV - lse_C[:, None])
            ent_C = lse_C - jnp.sum(p_CV * z_CV, axis=-1)
        else:
            ent_C = jnp.zeros_like(lse_C)
        shape = xs[1].shape
        return None, (logp_C.reshape(shape), ent_C.reshape(shape), lse_C.reshape(shape))

    _, (logp_KBC, ent_KBC, lse_KBC) = jax.lax.scan(body, None, (h_KBCD, tgt_KBC))
    return (logp_KBC, ent_KBC), (h_KBCD, w_DV, tgt_KBC, lse_KBC, ent_KBC)


def _logprob_entropy_bwd(with_entropy, res, g):
    h_KBCD, w_DV, tgt_KBC, lse_KBC, ent_KBC = res
    g_logp_KBC, g_ent_KBC = g
    cd = h_KBCD.dtype
    v_iota = jnp.arange(w_DV.shape[1], dtype=tgt_KBC.dtype)

    def body(dw_DV, xs):
        h_CD, t_C, lse_C, ent_C, gl_C, ge_C = map(_flat, xs)
        logp_CV = _logits(h_CD, w_DV) - lse_C[:, None]
        p_CV = jnp.exp(logp_CV)
        onehot_CV = (v_iota[None, :] == t_C[:, None]).astype(jnp.float32)
        dz_CV = gl_C[:, None] * (onehot_CV - p_CV)
        if with_entropy:
            dz_CV = dz_CV - ge_C[:, None] * p_CV * (logp_CV + ent_C[:, None])
        dz_CV = dz_CV.astype(cd)
        dh_CD = _dot_vt(dz_CV, w_DV.astype(cd))
        dw_DV = dw_DV + jnp.dot(h_CD.T, dz_CV, preferred_element_type=jnp.float32)
        return dw_DV, dh_CD.astype(cd).reshape(xs[0].shape)

    dw0 = jnp.zeros(w_DV.shape, jnp.float32)
    dw_DV, dh_KBCD = jax.lax.scan(
        body, dw0, (h_KBCD, tgt_KBC, lse_KBC, ent_KBC, g_logp_KBC, g_ent_KBC)
    )
    return dh_KBCD, dw_DV.astype(w_DV.dtype), None


_logprob_entropy.defvjp(_logprob_entropy_fwd, _logprob_entropy_bwd)


def token_logprobs_and_entropy(
    h_BTD: jax.Array,
    w_DV: jax.Array,
    targets_BT: jax.Array,
    *,
    chunk_size: int = DEFAULT_CHUNK,
    with_entropy: bool = True,
) -> tuple[jax.Array, jax.Array]:
    """Per-token `log softmax(h @ w)[target]` and (if `with_entropy`, else zeros) the entropy of
    `softmax(h @ w)`, both fp32 with the leading shape of `targets_BT`; chunked over tokens.

    Differentiable in `h_BTD` and `w_DV` (custom VJP; memory O(chunk_size x V)).
    """
    _check(h_BTD, w_DV, "h_BTD")
    if h_BTD.shape[:-1] != targets_BT.shape:
        raise ValueError(f"losses: h {h_BTD.shape} and targets {targets_BT.shape} disagree")
    lead = targets_BT.shape
    rows, T, ct = _as_rows(lead, chunk_size)
    h = _to_chunks(h_BTD.reshape(rows, T, h_BTD.shape[-1]), ct)
    t = _to_chunks(targets_BT.reshape(rows, T).astype(jnp.int32), ct)
    logp_KBC, ent_KBC = _logprob_entropy(h, w_DV, t, bool(with_entropy))
    return _from_chunks(logp_KBC, T).reshape(lead), _from_chunks(ent_KBC, T).reshape(lead)


def token_logprobs(
    h_BTD: jax.Array, w_DV: jax.Array, targets_BT: jax.Array, *, chunk_size: int = DEFAULT_CHUNK
) -> jax.Array:
    """Per-token log-probability of `targets_BT` (fp32), chunked; see
    `token_logprobs_and_entropy`."""
    return token_logprobs_and_entropy(
        h_BTD, w_DV, targets_BT, chunk_size=chunk_size, with_entropy=False
    )[0]


def token_cross_entropy_sum(
    h_BTD: jax.Array,
    w_DV: jax.Array,
    targets_BT: jax.Array,
    mask_BT: jax.Array,
    *,
    chunk_size: int = DEFAULT_CHUNK,
) -> tuple[jax.Array, jax.Array]:
    """(sum over masked tokens of -log p(target), number of masked tokens), fp32, chunked."""
    mask_BT = mask_BT.astype(jnp.float32)
    logp_BT = token_logprobs(h_BTD, w_DV, targets_BT, chunk_size=chunk_size)
    return -jnp.sum(logp_BT * mask_BT), jnp.sum(mask_BT)


# ----------------------------------------------------------------------------- reverse KL
@jax.custom_vjp
def _reverse_kl(hs_KBCD, ws_DV, ht_KBCE, wt_EV):
    out, _ = _reverse_kl_fwd(hs_KBCD, ws_DV, ht_KBCE, wt_EV)
    return out


def _kl_chunk(hs_CD, ws_DV, ht_CE, wt_EV):
    zs_CV = _logits(hs_CD, ws_DV)
    logps_CV = zs_CV - jax.nn.logsumexp(zs_CV, axis=-1, keepdims=True)
    zt_CV = _logits(ht_CE, wt_EV)
    logpt_CV = zt_CV - jax.nn.logsumexp(zt_CV, axis=-1, keepdims=True)
    ps_CV = jnp.exp(logps_CV)
    diff_CV = logps_CV - logpt_CV
    return ps_CV, diff_CV, jnp.sum(ps_CV * diff_CV, axis=-1)


def _reverse_kl_fwd(hs_KBCD, ws_DV, ht_KBCE, wt_EV):
    def body(_, xs):
        kl_C = _kl_chunk(_flat(xs[0]), ws_DV, _flat(xs[1]), wt_EV)[2]
        return None, kl_C.reshape(xs[0].shape[:2])

    _, kl_KBC = jax.lax.scan(body, None, (hs_KBCD, ht_KBCE))
    return kl_KBC, (hs_KBCD, ws_DV, ht_KBCE, wt_EV, kl_KBC)


def _reverse_kl_bwd(res, g_KBC):
    hs_KBCD, ws_DV, ht_KBCE, wt_EV, kl_KBC = res
    cd = hs_KBCD.dtype

    def body(dw_DV, xs):
        hs_CD, ht_CE, kl_C, g_C = map(_flat, xs)
        ps_CV, diff_CV, _ = _kl_chunk(hs_CD, ws_DV, ht_CE, wt_EV)
        dz_CV = (g_C[:, None] * ps_CV * (diff_CV - kl_C[:, None])).astype(cd)
        dh_CD = _dot_vt(dz_CV, ws_DV.astype(cd))
        dw_DV = dw_DV + jnp.dot(hs_CD.T, dz_CV, preferred_element_type=jnp.float32)
        return dw_DV, dh_CD.astype(cd).reshape(xs[0].shape)

    dw0 = jnp.zeros(ws_DV.shape, jnp.float32)
    dw_DV, dh_KBCD = jax.lax.scan(body, dw0, (hs_KBCD, ht_KBCE, kl_KBC, g_KBC))
    return dh_KBCD, dw_DV.astype(ws_DV.dtype), None, None


_reverse_kl.defvjp(_reverse_kl_fwd, _reverse_kl_bwd)


def reverse_kl_per_token(
    hs_BTD: jax.Array,
    ws_DV: jax.Array,
    ht_BTE: jax.Array,
    wt_EV: jax.Array,
    *,
    chunk_size: int = DEFAULT_CHUNK,
) -> jax.Array:
    """Full-vocabulary KL(student || teacher) = sum_v p_s(v) (log p_s(v) - log p_t(v)) per token,
    fp32 with the leading shape of `hs_BTD`; student logits `hs @ ws`, teacher logits `ht @ wt`
    (the teacher may have another hidden size E but must share the vocabulary). Chunked over
    tokens; differentiable in the student only (the teacher is treated as a constant).
    """
    _check(hs_BTD, ws_DV, "student")
    _check(ht_BTE, wt_EV, "teacher")
    if hs_BTD.shape[:-1] != ht_BTE.shape[:-1] or ws_DV.shape[1] != wt_EV.shape[1]:
        raise ValueError(
            f"losses: student h {hs_BTD.shape} / w {ws_DV.shape} and teacher h "
            f"{ht_BTE.shape} / w {wt_EV.shape} disagree on tokens or vocabulary"
        )
    lead = hs_BTD.shape[:-1]
    rows, T, ct = _as_rows(lead, chunk_size)
    hs = _to_chunks(hs_BTD.reshape(rows, T, -1), ct)
    ht = _to_chunks(jax.lax.stop_gradient(ht_BTE).reshape(rows, T, -1), ct)
    kl_KBC = _reverse_kl(hs, ws_DV, ht, jax.lax.stop_gradient(wt_EV))
    return _from_chunks(kl_KBC, T).reshape(lead)


# ----------------------------------------------------------------------------- naive references
def naive_logprobs_and_entropy(
    h_BTD: jax.Array, w_DV: jax.Array, targets_BT: jax.Array
) -> tuple[jax.Array, jax.Array]:
    """Reference: materialises the `[..., V]` fp32 logits; plain autodiff."""
    z = jnp.einsum("...d,dv->...v", h_BTD, w_DV, preferred_element_type=jnp.float32)
    logp_all = jax.nn.log_softmax(z, axis=-1)
    logp = jnp.take_along_axis(logp_all, targets_BT[..., None].astype(jnp.int32), axis=-1)[..., 0]
    ent = -jnp.sum(jnp.exp(logp_all) * logp_all, axis=-1)
    return logp, ent


def naive_reverse_kl(
    hs_BTD: jax.Array, ws_DV: jax.Array, ht_BTE: jax.Array, wt_EV: jax.Array
) -> jax.Array:
    """Reference KL(student || teacher) per token with materialised logits (teacher constant)."""
    zs = jnp.einsum("...d,dv->...v", hs_BTD, ws_DV, preferred_element_type=jnp.float32)
    zt = jnp.einsum(
        "...e,ev->...v",
        jax.lax.stop_gradient(ht_BTE),
        jax.lax.stop_gradient(wt_EV),
        preferred_element_type=jnp.float32,
    )
    logps, logpt = jax.nn.log_softmax(zs, -1), jax.nn.log_softmax(zt, -1)
    return jnp.sum(jnp.exp(logps) * (logps - logpt), axis=-1)


# ----------------------------------------------------------------------------- model glue
def model_hidden_and_head(
    model: nnx.Module, batch, routes_BTLK: jax.Array | None = None
) -> tuple[jax.Array, jax.Array, dict]:
    """(final hidden states [B, T, D], lm_head weight [D, V], MoE aux), both cast to the model's
    compute dtype exactly as `NemotronH.logits` does, so chunked log-probs equal the model's.
    `routes_BTLK` ([B, T, n_moe_layers, K], a batch's "routes"): routing replay (R3)."""
    cd = dtype_of(model.cfg.compute_dtype)
    routes = None if routes_BTLK is None else jnp.moveaxis(routes_BTLK, 2, 0)
    h_BTD, _, aux = model.hidden_states(
        batch["input_ids"], batch.get("segment_ids"), return_aux=True, routes=routes
    )
    return h_BTD.astype(cd), model.lm_head_weight().astype(cd), aux


def model_token_logprobs(
    model: nnx.Module,
    batch,
    *,
    chunk_size: int = DEFAULT_CHUNK,
    with_entropy: bool = False,
    temperature: float = 1.0,
    routes_BTLK: jax.Array | None = None,
) -> tuple[jax.Array, jax.Array, dict]:
    """(log p(targets) [B, T], entropy [B, T] (zeros unless `with_entropy`), MoE aux) of a batch
    under `model`, without materialising the logits. `temperature` != 1 gives the log-probs of
    softmax(logits / temperature) (the head weight is scaled in fp32). `routes_BTLK`: routing
    replay (`model_hidden_and_head`)."""
    h_BTD, w_DV, aux = model_hidden_and_head(model, batch, routes_BTLK)
    if temperature != 1.0:
        w_DV = (w_DV.astype(jnp.float32) / temperature).astype(w_DV.dtype)
    logp, ent = token_logprobs_and_entropy(
        h_BTD, w_DV, batch["targets"], chunk_size=chunk_size, with_entropy=with_entropy
    )
    return logp, ent, aux
