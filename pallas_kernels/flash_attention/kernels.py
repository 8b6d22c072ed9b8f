"""Pallas TPU kernels of flash attention: forward, dk/dv and dq.

Layout (chosen in `ops.py`): q, do, o, dq [B, N, T, H]; k, v, dk, dv [B, K, S, H] with N = K * G
query heads; query segment ids [B, T, 1], key segment ids [B, 1, S]; the row log-sum-exp and
delta = rowsum(do * o) [B, N, T, 1] fp32. One grid step handles one [block_q, block_k] tile; the
reduction axis is the last grid axis ("arbitrary"), its running state lives in fp32 VMEM scratch.

Causal block skipping: a tile whose keys all lie after its queries computes nothing, and its
index map points at the last (forward, dq) or first (dk/dv) tile that does compute, so the
pipeline fetches no new block for it. Ragged edges: T and S need not be multiples of the blocks;
rows past the end are zeroed with `where` before any matmul (never multiplied, so garbage or NaN
in a partial edge block cannot leak) and masked out of the softmax; writes past the end are
dropped by Pallas. On CPU/GPU these run with `interpret=True`.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu

NT = (((1,), (1,)), ((), ()))  # a @ b.T
TN = (((0,), (0,)), ((), ()))  # a.T @ b
NN = (((1,), (0,)), ((), ()))  # a @ b


def cdiv(a: int, b: int) -> int:
    return -(-a // b)


def _div(a, b: int):
    """a // b for a traced non-negative int32 (`lax.div` truncates; jnp's floor division lowers
    through `sign`, which Mosaic lowers only on a TPU host)."""
    return lax.div(a, jnp.int32(b))


def _rem(a, b: int):
    return lax.rem(a, jnp.int32(b))


def _zero_rows(x: jax.Array, start, limit: int) -> jax.Array:
    """Rows of `x` whose index (offset by `start`) is >= limit set to 0 (select in fp32: older
    TPUs have no bf16 VPU)."""
    rows = lax.broadcasted_iota(jnp.int32, x.shape, 0) + start
    return jnp.where(rows < limit, x.astype(jnp.float32), 0.0).astype(x.dtype)


def _tile_mask(i, j, seg_q_Q1, seg_k_1C, *, bq: int, bk: int, t: int, s: int, causal: bool):
    """[bq, bk] bool: query row sees key column (same segment, in range, causal)."""
    rows = lax.broadcasted_iota(jnp.int32, (bq, bk), 0) + i * bq
    cols = lax.broadcasted_iota(jnp.int32, (bq, bk), 1) + j * bk
    mask = (seg_q_Q1 == seg_k_1C) & (rows < t) & (cols < s)
    return mask & (cols <= rows) if causal else mask


def _visible(i, j, bq: int, bk: int):
    """True iff key block j holds a key at or before the last query of query block i."""
    return j * bk <= i * bq + bq - 1


def _run(causal: bool, i, j, bq: int, bk: int, step) -> None:
    if causal:
        pl.when(_visible(i, j, bq, bk))(step)
    else:
        step()


def _kv_block(i, j, bq: int, bk: int, causal: bool):
    """Key block to fetch at step (i, j): past the diagonal, the last visible one (no refetch)."""
    return jnp.minimum(j, _div(i * bq + bq - 1, bk)) if causal else j


def _q_block(i, j, bq: int, bk: int, causal: bool):
    """Query block to fetch at step (j, i): before the diagonal, the first visible one."""
    return jnp.maximum(i, _div(j * bk, bq)) if causal else i


def _compiler_params(n_parallel: int):
    return pltpu.CompilerParams(dimension_semantics=("parallel",) * n_parallel + ("arbitrary",))


def flash_fwd_pallas(
    q_BNTH, k_BKSH, v_BKSH, seg_q_BT1, seg_k_B1S, *, causal: bool, bq: int, bk: int, interpret
):
    """Returns (o [B, N, T, H] in q's dtype, lse [B, N, T, 1] fp32; +inf for a row that sees no
    key, whose output is 0)."""
    b, n, t, h = q_BNTH.shape
    kv, s = k_BKSH.shape[1], k_BKSH.shape[2]
    g, nq, nk, scale = n // kv, cdiv(t, bq), cdiv(s, bk), h**-0.5
    mask_of = functools.partial(_tile_mask, bq=bq, bk=bk, t=t, s=s, causal=causal)

    def kernel(q_ref, k_ref, v_ref, sq_ref, sk_ref, o_ref, lse_ref, m_sc, l_sc, acc_sc):
        i, j = pl.program_id(2), pl.program_id(3)

        @pl.when(j == 0)
        def _init():
            m_sc[...] = jnp.full_like(m_sc, -jnp.inf)
            l_sc[...] = jnp.zeros_like(l_sc)
            acc_sc[...] = jnp.zeros_like(acc_sc)

        def step():
            mask = mask_of(i, j, sq_ref[...], sk_ref[...])
            k = _zero_rows(k_ref[...], j * bk, s)
            v = _zero_rows(v_ref[...], j * bk, s)
            q = _zero_rows(q_ref[...], i * bq, t)
            s_QC = lax.dot_general(q, k, NT, preferred_element_type=jnp.float32) * scale
            m_prev = m_sc[...]  # [bq, 1]
            m_new = jnp.maximum(
                m_prev, jnp.max(jnp.where(mask, s_QC, -jnp.inf), axis=1, keepdims=True)
            )
            m_safe = jnp.where(m_new == -jnp.inf, 0.0, m_new)  # no key seen yet: no inf - inf
            p_QC = jnp.where(mask, jnp.exp(s_QC - m_safe), 0.0)
            alpha = jnp.exp(m_prev - m_safe)
            l_sc[...] = alpha * l_sc[...] + jnp.sum(p_QC, axis=1, keepdims=True)
            pv = lax.dot_general(p_QC.astype(v.dtype), v, NN, preferred_element_type=jnp.float32)
            acc_sc[...] = alpha * acc_sc[...] + pv
            m_sc[...] = m_new

        _run(causal, i, j, bq, bk, step)

        @pl.when(j == nk - 1)
        def _store():
            l_Q1 = l_sc[...]
            seen = l_Q1 > 0.0
            l_safe = jnp.where(seen, l_Q1, 1.0)
            o_ref[...] = (acc_sc[...] / l_safe).astype(o_ref.dtype)
            lse_ref[...] = jnp.where(seen, m_sc[...] + jnp.log(l_safe), jnp.inf)

    def q_map(b_, n_, i, j):
        return b_, n_, i, 0

    def kv_map(b_, n_, i, j):
        return b_, _div(n_, g), _kv_block(i, j, bq, bk, causal), 0

    def sk_map(b_, n_, i, j):
        return b_, 0, _kv_block(i, j, bq, bk, causal)

    cost = pl.CostEstimate(
        flops=4 * b * n * t * s * h // (2 if causal else 1),
        transcendentals=b * n * t * s // (2 if causal else 1),
        bytes_accessed=q_BNTH.nbytes * 2 + (k_BKSH.nbytes + v_BKSH.nbytes) * g * nq,
    )
    return pl.pallas_call(
        kernel,
        out_shape=(
            jax.ShapeDtypeStruct((b, n, t, h), q_BNTH.dtype),
            jax.ShapeDtypeStruct((b, n, t, 1), jnp.float32),
        ),
        grid=(b, n, nq, nk),
        in_specs=[
            pl.BlockSpec((None, None, bq, h), q_map),
            pl.BlockSpec((None, None, bk, h), kv_map),
            pl.BlockSpec((None, None, bk, h), kv_map),
            pl.BlockSpec((None, bq, 1), lambda b_, n_, i, j: (b_, i, 0)),
            pl.BlockSpec((None, 1, bk), sk_map),
        ],
        out_specs=[
            pl.BlockSpec((None, None, bq, h), q_map),
            pl.BlockSpec((None, None, bq, 1), q_map),
        ],
        scratch_shapes=[
            pltpu.VMEM((bq, 1), jnp.float32),
            pltpu.VMEM((bq, 1), jnp.float32),
            pltpu.VMEM((bq, h), jnp.float32),
        ],
        compiler_params=_compiler_params(3),
        interpret=interpret,
        cost_estimate=cost,
        name="nemocascade_flash_fwd",
    )(q_BNTH, k_BKSH, v_BKSH, seg_q_BT1, seg_k_B1S)


def _probs_and_dscores(q, k, v, do, lse_Q1, delta_Q1, mask, scale):
    """Recomputes one tile: p = softmax probabilities, ds = d loss / d (q k^T) (scale folded in)."""
    s_QC = lax.dot_general(q, k, NT, preferred_element_type=jnp.float32) * scale
    p_QC = jnp.where(mask, jnp.exp(s_QC - lse_Q1), 0.0)
    dp_QC = lax.dot_general(do, v, NT, preferred_element_type=jnp.float32)
    ds_QC = jnp.where(mask, p_QC * (dp_QC - delta_Q1), 0.0) * scale
    return p_QC, ds_QC


def flash_dkv_pallas(
    q_BNTH,
    k_BKSH,
    v_BKSH,
    seg_q_BT1,
    seg_k_B1S,
    do_BNTH,
    lse_BNT1,
    delta_BNT1,
    *,
    causal: bool,
    bq: int,
    bk: int,
    interpret,
):
    """(dk, dv) [B, K, S, H]: for each key block, the last grid axis walks the G query heads of
    its kv head times the query blocks, accumulating in fp32 scratch."""
    b, n, t, h = q_BNTH.shape
    kv, s = k_BKSH.shape[1], k_BKSH.shape[2]
    g, nq, nk, scale = n // kv, cdiv(t, bq), cdiv(s, bk), h**-0.5
    mask_of = functools.partial(_tile_mask, bq=bq, bk=bk, t=t, s=s, causal=causal)

    def kernel(
        q_ref, k_ref, v_ref, sq_ref, sk_ref, do_ref, lse_ref, dl_ref, dk_ref, dv_ref, dk_sc, dv_sc
    ):
        j, gi = pl.program_id(2), pl.program_id(3)
        i = _rem(gi, nq)

        @pl.when(gi == 0)
        def _init():
            dk_sc[...] = jnp.zeros_like(dk_sc)
            dv_sc[...] = jnp.zeros_like(dv_sc)

        def step():
            mask = mask_of(i, j, sq_ref[...], sk_ref[...])
            q, do = _zero_rows(q_ref[...], i * bq, t), _zero_rows(do_ref[...], i * bq, t)
            k, v = _zero_rows(k_ref[...], j * bk, s), _zero_rows(v_ref[...], j * bk, s)
            p_QC, ds_QC = _probs_and_dscores(q, k, v, do, lse_ref[...], dl_ref[...], mask, scale)
            dv_sc[...] += lax.dot_general(
                p_QC.astype(do.dtype), do, TN, preferred_element_type=jnp.float32
            )
            dk_sc[...] += lax.dot_general(
                ds_QC.astype(q.dtype), q, TN, preferred_element_type=jnp.float32
            )

        _run(causal, i, j, bq, bk, step)

        @pl.when(gi == g * nq - 1)
        def _store():
            dk_ref[...] = dk_sc[...].astype(dk_ref.dtype)
            dv_ref[...] = dv_sc[...].astype(dv_ref.dtype)

    def q_map(b_, kh, j, gi):
        return b_, kh * g + _div(gi, nq), _q_block(_rem(gi, nq), j, bq, bk, causal), 0

    def sq_map(b_, kh, j, gi):
        return b_, _q_block(_rem(gi, nq), j, bq, bk, causal), 0

    def kv_map(b_, kh, j, gi):
        return b_, kh, j, 0

    q_spec = pl.BlockSpec((None, None, bq, h), q_map)
    row_spec = pl.BlockSpec((None, None, bq, 1), q_map)
    kv_spec = pl.BlockSpec((None, None, bk, h), kv_map)
    cost = pl.CostEstimate(
        flops=8 * b * n * t * s * h // (2 if causal else 1),
        transcendentals=b * n * t * s // (2 if causal else 1),
        bytes_accessed=(q_BNTH.nbytes + do_BNTH.nbytes) * nk + 2 * (k_BKSH.nbytes + v_BKSH.nbytes),
    )
    return pl.pallas_call(
        kernel,
        out_shape=(
            jax.ShapeDtypeStruct(k_BKSH.shape, k_BKSH.dtype),
            jax.ShapeDtypeStruct(v_BKSH.shape, v_BKSH.dtype),
        ),
        grid=(b, kv, nk, g * nq),
        in_specs=[
            q_spec,
            kv_spec,
            kv_spec,
            pl.BlockSpec((None, bq, 1), sq_map),
            pl.BlockSpec((None, 1, bk), lambda b_, kh, j, gi: (b_, 0, j)),
            q_spec,
            row_spec,
            row_spec,
        ],
        out_specs=[kv_spec, kv_spec],
        scratch_shapes=[pltpu.VMEM((bk, h), jnp.float32), pltpu.VMEM((bk, h), jnp.float32)],
        compiler_params=_compiler_params(3),
        interpret=interpret,
        cost_estimate=cost,
        name="nemocascade_flash_dkv",
    )(q_BNTH, k_BKSH, v_BKSH, seg_q_BT1, seg_k_B1S, do_BNTH, lse_BNT1, delta_BNT1)


def flash_dq_pallas(
    q_BNTH,
    k_BKSH,
    v_BKSH,
    seg_q_BT1,
    seg_k_B1S,
    do_BNTH,
    lse_BNT1,
    delta_BNT1,
    *,
    causal: bool,
    bq: int,
    bk: int,
    interpret,
):
    """dq [B, N, T, H]: for each query block, the last grid axis walks the key blocks."""
    b, n, t, h = q_BNTH.shape
    kv, s = k_BKSH.shape[1], k_BKSH.shape[2]
    g, nq, nk, scale = n // kv, cdiv(t, bq), cdiv(s, bk), h**-0.5
    mask_of = functools.partial(_tile_mask, bq=bq, bk=bk, t=t, s=s, causal=causal)

    def kernel(q_ref, k_ref, v_ref, sq_ref, sk_ref, do_ref, lse_ref, dl_ref, dq_ref, dq_sc):
        i, j = pl.program_id(2), pl.program_id(3)

        @pl.when(j == 0)
        def _init():
            dq_sc[...] = jnp.zeros_like(dq_sc)

        def step():
            mask = mask_of(i, j, sq_ref[...], sk_ref[...])
            q, do = _zero_rows(q_ref[...], i * bq, t), _zero_rows(do_ref[...], i * bq, t)
            k, v = _zero_rows(k_ref[...], j * bk, s), _zero_rows(v_ref[...], j * bk, s)
            _, ds_QC = _probs_and_dscores(q, k, v, do, lse_ref[...], dl_ref[...], mask, scale)
            dq_sc[...] += lax.dot_general(
                ds_QC.astype(k.dtype), k, NN, preferred_element_type=jnp.float32
            )

        _run(causal, i, j, bq, bk, step)

        @pl.when(j == nk - 1)
        def _store():
            dq_ref[...] = dq_sc[...].astype(dq_ref.dtype)

    def q_map(b_, n_, i, j):
        return b_, n_, i, 0

    def kv_map(b_, n_, i, j):
        return b_, _div(n_, g), _kv_block(i, j, bq, bk, causal), 0

    def sk_map(b_, n_, i, j):
        return b_, 0, _kv_block(i, j, bq, bk, causal)

    q_spec = pl.BlockSpec((None, None, bq, h), q_map)
    row_spec = pl.BlockSpec((None, None, bq, 1), q_map)
    kv_spec = pl.BlockSpec((None, None, bk, h), kv_map)
    cost = pl.CostEstimate(
        flops=6 * b * n * t * s * h // (2 if causal else 1),
        transcendentals=b * n * t * s // (2 if causal else 1),
        bytes_accessed=(q_BNTH.nbytes + do_BNTH.nbytes) * 2 + (k_BKSH.nbytes + v_BKSH.nbytes) * nq,
    )
    return pl.pallas_call(
        kernel,
        out_shape=jax.ShapeDtypeStruct(q_BNTH.shape, q_BNTH.dtype),
        grid=(b, n, nq, nk),
        in_specs=[
            q_spec,
            kv_spec,
            kv_spec,
            pl.BlockSpec((None, bq, 1), lambda b_, n_, i, j: (b_, i, 0)),
            pl.BlockSpec((None, 1, bk), sk_map),
            q_spec,
            row_spec,
            row_spec,
        ],
        out_specs=q_spec,
        scratch_shapes=[pltpu.VMEM((bq, h), jnp.float32)],
        compiler_params=_compiler_params(3),
        interpret=interpret,
        cost_estimate=cost,
        name="nemocascade_flash_dq",
    )(q_BNTH, k_BKSH, v_BKSH, seg_q_BT1, seg_k_B1S, do_BNTH, lse_BNT1, delta_BNT1)
