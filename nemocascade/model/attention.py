"""Grouped-query causal self-attention with no positional encoding (NemotronH `*` blocks).

Scores are `q.k * head_dim**-0.5`, softmax in fp32. A query attends to keys at earlier or equal
positions of the same segment (`segment_ids`; 0 marks padding, and padding positions attend to
earlier padding positions, so no row is ever fully masked). With a KV cache the new keys are
written at `cache.index` and the query sees the cache prefix.

`ModelConfig.attention_impl` picks how the softmax is computed (never the platform):

* `naive`: the [B, N, T, S] score tensor, ordinary autodiff. The parity oracle.
* `blockwise`: `blockwise_attention`, online softmax over [block_q, block_k] tiles in jnp with a
  custom VJP that recomputes the tiles in the backward pass; memory is O(T), never [T, T].
* `pallas`: `pallas_kernels.flash_attention` (TPU kernel; interpret mode elsewhere, for tests).

With a cache, one new token (decode) always takes the naive path over the cache (a [B, N, 1, S]
score row is already O(S)); a multi-token cached call (prefill) takes `blockwise_attention` over
the cache for `blockwise` and `pallas`, and skips the cache blocks after the last new position.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from flax import nnx, struct
from jax import lax
from jax.sharding import Mesh

from nemocascade.model import context_parallel as cp
from nemocascade.model.config import ModelConfig
from nemocascade.model.layers import dtype_of, make_varying, param


@struct.dataclass
class KVCache:
    k_BSKH: jax.Array  # [B, S_max, kv_heads, head_dim]
    v_BSKH: jax.Array
    seg_BS: jax.Array  # segment id of each cached position (0 = empty / padding)
    index: jax.Array  # scalar int32: number of positions written

    @classmethod
    def init(cls, cfg: ModelConfig, batch: int, max_len: int, dtype) -> KVCache:
        shape = (batch, max_len, cfg.num_key_value_heads, cfg.head_dim)
        return cls(
            jnp.zeros(shape, dtype),
            jnp.zeros(shape, dtype),
            jnp.zeros((batch, max_len), jnp.int32),
            jnp.zeros((), jnp.int32),
        )


def attention_weights_mask(seg_q_BT, seg_k_BS, pos_q_T, pos_k_S):
    """[B, T, S] boolean: causal (key position <= query position) and same segment."""
    causal_TS = pos_k_S[None, :] <= pos_q_T[:, None]
    same_BTS = seg_q_BT[:, :, None] == seg_k_BS[:, None, :]
    return causal_TS[None] & same_BTS


def gqa_attention(q_BTNH, k_BSKH, v_BSKH, mask_BTS):
    """Softmax attention of N query heads over K kv heads (N % K == 0), fp32 softmax."""
    b, t, n, h = q_BTNH.shape
    kv = k_BSKH.shape[2]
    q_BTKGH = q_BTNH.reshape(b, t, kv, n // kv, h)
    s_BKGTS = jnp.einsum(
        "btkgh,bskh->bkgts", q_BTKGH, k_BSKH, preferred_element_type=jnp.float32
    ) * (h**-0.5)
    s_BKGTS = jnp.where(mask_BTS[:, None, None], s_BKGTS, jnp.finfo(jnp.float32).min)
    p_BKGTS = jax.nn.softmax(s_BKGTS, axis=-1).astype(v_BSKH.dtype)
    o_BTKGH = jnp.einsum("bkgts,bskh->btkgh", p_BKGTS, v_BSKH)
    return o_BTKGH.reshape(b, t, n, h)


# --------------------------------------------------------------------------- blockwise
# Letters: Q = a block of block_q queries, C = a block of block_k keys, G = query heads per kv
# head. Inputs are padded up to whole blocks with segment id -1; padded keys sit after every real
# query position (so the causal mask hides them) and padded query rows are sliced away.


def _pad_to(x, length: int, value=0):
    """Pads axis 1 of `x` with `value` up to `length`."""
    widths = [(0, 0)] * x.ndim
    widths[1] = (0, length - x.shape[1])
    return jnp.pad(x, widths, constant_values=value)


def _tile_mask(seg_q_BQ, seg_k_BC, pos_q_Q, pos_k_C):
    """[B, 1, 1, Q, C]: the attention mask of one tile, broadcast over kv heads and groups."""
    return attention_weights_mask(seg_q_BQ, seg_k_BC, pos_q_Q, pos_k_C)[:, None, None]


def _blockwise_forward(q_BTNH, k_BSKH, v_BSKH, seg_q_BT, seg_k_BS, q_offset, bq: int, bk: int):
    """Returns (o [B, T, N, H], lse [B, K, G, Tp] fp32) with Tp = T rounded up to block_q.

    lse is the row log-sum-exp of the scaled scores (+inf for a row with no visible key, whose
    output is 0; such rows arise only in padding).
    """
    b, t, n, h = q_BTNH.shape
    s_len, kv = k_BSKH.shape[1], k_BSKH.shape[2]
    g, nq, nk, scale = n // kv, -(-t // bq), -(-s_len // bk), h**-0.5
    q_BTKGH = _pad_to(q_BTNH, nq * bq).reshape(b, nq * bq, kv, g, h)
    k_BSKH, v_BSKH = _pad_to(k_BSKH, nk * bk), _pad_to(v_BSKH, nk * bk)
    seg_q_BT, seg_k_BS = _pad_to(seg_q_BT, nq * bq, -1), _pad_to(seg_k_BS, nk * bk, -1)

    def q_block(i):
        q_BQKGH = lax.dynamic_slice_in_dim(q_BTKGH, i * bq, bq, 1)
        seg_q_BQ = lax.dynamic_slice_in_dim(seg_q_BT, i * bq, bq, 1)
        pos_q_Q = q_offset + i * bq + jnp.arange(bq)
        # causal block skipping: only the kv blocks holding a key <= the block's last query
        n_visible = jnp.clip((q_offset + (i + 1) * bq - 1) // bk + 1, 0, nk)

        def kv_block(j, carry):
            m_BKGQ, l_BKGQ, acc_BKGQH = carry
            k_BCKH = lax.dynamic_slice_in_dim(k_BSKH, j * bk, bk, 1)
            v_BCKH = lax.dynamic_slice_in_dim(v_BSKH, j * bk, bk, 1)
            seg_k_BC = lax.dynamic_slice_in_dim(seg_k_BS, j * bk, bk, 1)
            mask = _tile_mask(seg_q_BQ, seg_k_BC, pos_q_Q, j * bk + jnp.arange(bk))
            s_BKGQC = (
                jnp.einsum("bqkgh,bckh->bkgqc", q_BQKGH, k_BCKH, preferred_element_type=jnp.float32)
                * scale
            )
            m_new = jnp.maximum(m_BKGQ, jnp.max(jnp.where(mask, s_BKGQC, -jnp.inf), axis=-1))
            m_safe = jnp.where(m_new == -jnp.inf, 0.0, m_new)  # no key seen yet: avoid inf - inf
            p_BKGQC = jnp.where(mask, jnp.exp(s_BKGQC - m_safe[..., None]), 0.0)
            alpha_BKGQ = jnp.exp(m_BKGQ - m_safe)
            pv_BKGQH = jnp.einsum(
                "bkgqc,bckh->bkgqh",
                p_BKGQC.astype(v_BCKH.dtype),
                v_BCKH,
                preferred_element_type=jnp.float32,
            )
            l_BKGQ = alpha_BKGQ * l_BKGQ + jnp.sum(p_BKGQC, axis=-1)
            return m_new, l_BKGQ, alpha_BKGQ[..., None] * acc_BKGQH + pv_BKGQH

        init = (
            jnp.full((b, kv, g, bq), -jnp.inf, jnp.float32),
            jnp.zeros((b, kv, g, bq), jnp.float32),
            jnp.zeros((b, kv, g, bq, h), jnp.float32),
        )
        # (under shard_map the carry varies over the mesh axes of its operands)
        init = make_varying(init, q_BQKGH, k_BSKH, v_BSKH, seg_q_BQ, seg_k_BS, q_offset)
        m_BKGQ, l_BKGQ, acc_BKGQH = lax.fori_loop(0, n_visible, kv_block, init)
        seen = l_BKGQ > 0
        o_BKGQH = acc_BKGQH / jnp.where(seen, l_BKGQ, 1.0)[..., None]
        lse_BKGQ = jnp.where(seen, m_BKGQ + jnp.log(jnp.where(seen, l_BKGQ, 1.0)), jnp.inf)
        return o_BKGQH.astype(q_BTNH.dtype), lse_BKGQ

    o_nBKGQH, lse_nBKGQ = lax.map(q_block, jnp.arange(nq))
    o_BTNH = o_nBKGQH.transpose(1, 0, 4, 2, 3, 5).reshape(b, nq * bq, n, h)[:, :t]
    lse_BKGT = lse_nBKGQ.transpose(1, 2, 3, 0, 4).reshape(b, kv, g, nq * bq)
    return o_BTNH, lse_BKGT


def _blockwise_backward(bq: int, bk: int, residuals, do_BTNH):
    """Flash-attention backward: kv blocks outer (dk, dv accumulate in the carry), visible query
    blocks inner (dq accumulates in place in a [B, Tp, K, G, H] fp32 buffer)."""
    q_BTNH, k_BSKH, v_BSKH, seg_q_BT, seg_k_BS, q_offset, o_BTNH, lse_BKGT = residuals
    b, t, n, h = q_BTNH.shape
    s_len, kv = k_BSKH.shape[1], k_BSKH.shape[2]
    g, nq, nk, scale = n // kv, -(-t // bq), -(-s_len // bk), h**-0.5
    delta_BTN = jnp.sum(do_BTNH.astype(jnp.float32) * o_BTNH.astype(jnp.float32), axis=-1)
    delta_BKGT = _pad_to(delta_BTN, nq * bq).reshape(b, nq * bq, kv, g).transpose(0, 2, 3, 1)
    q_BTKGH = _pad_to(q_BTNH, nq * bq).reshape(b, nq * bq, kv, g, h)
    do_BTKGH = _pad_to(do_BTNH, nq * bq).reshape(b, nq * bq, kv, g, h)
    kp_BSKH, vp_BSKH = _pad_to(k_BSKH, nk * bk), _pad_to(v_BSKH, nk * bk)
    seg_q_BT, seg_k_BS = _pad_to(seg_q_BT, nq * bq, -1), _pad_to(seg_k_BS, nk * bk, -1)

    def kv_block(dq_BTKGH, j):
        k_BCKH = lax.dynamic_slice_in_dim(kp_BSKH, j * bk, bk, 1)
        v_BCKH = lax.dynamic_slice_in_dim(vp_BSKH, j * bk, bk, 1)
        seg_k_BC = lax.dynamic_slice_in_dim(seg_k_BS, j * bk, bk, 1)
        pos_k_C = j * bk + jnp.arange(bk)
        first = jnp.clip((j * bk - q_offset) // bq, 0, nq)  # first block with a query >= j * bk

        def q_block(i, carry):
            dk_BCKH, dv_BCKH, dq_BTKGH = carry
            q_BQKGH = lax.dynamic_slice_in_dim(q_BTKGH, i * bq, bq, 1)
            do_BQKGH = lax.dynamic_slice_in_dim(do_BTKGH, i * bq, bq, 1)
            lse_BKGQ = lax.dynamic_slice_in_dim(lse_BKGT, i * bq, bq, 3)
            delta_BKGQ = lax.dynamic_slice_in_dim(delta_BKGT, i * bq, bq, 3)
            seg_q_BQ = lax.dynamic_slice_in_dim(seg_q_BT, i * bq, bq, 1)
            mask = _tile_mask(seg_q_BQ, seg_k_BC, q_offset + i * bq + jnp.arange(bq), pos_k_C)
            s_BKGQC = (
                jnp.einsum("bqkgh,bckh->bkgqc", q_BQKGH, k_BCKH, preferred_element_type=jnp.float32)
                * scale
            )
            p_BKGQC = jnp.where(mask, jnp.exp(s_BKGQC - lse_BKGQ[..., None]), 0.0)
            dv_BCKH += jnp.einsum(
                "bkgqc,bqkgh->bckh",
                p_BKGQC.astype(do_BQKGH.dtype),
                do_BQKGH,
                preferred_element_type=jnp.float32,
            )
            dp_BKGQC = jnp.einsum(
                "bqkgh,bckh->bkgqc", do_BQKGH, v_BCKH, preferred_element_type=jnp.float32
            )
            ds_BKGQC = p_BKGQC * (dp_BKGQC - delta_BKGQ[..., None]) * scale
            dq_BQKGH = jnp.einsum(
                "bkgqc,bckh->bqkgh",
                ds_BKGQC.astype(k_BCKH.dtype),
                k_BCKH,
                preferred_element_type=jnp.float32,
            )
            dq_old = lax.dynamic_slice_in_dim(dq_BTKGH, i * bq, bq, 1)
            dq_BTKGH = lax.dynamic_update_slice_in_dim(dq_BTKGH, dq_old + dq_BQKGH, i * bq, 1)
            dk_BCKH += jnp.einsum(
                "bkgqc,bqkgh->bckh",
                ds_BKGQC.astype(q_BQKGH.dtype),
                q_BQKGH,
                preferred_element_type=jnp.float32,
            )
            return dk_BCKH, dv_BCKH, dq_BTKGH

        zeros_BCKH = make_varying(jnp.zeros((b, bk, kv, h), jnp.float32), operands, q_offset)
        dk_BCKH, dv_BCKH, dq_BTKGH = lax.fori_loop(
            first, nq, q_block, (zeros_BCKH, zeros_BCKH, dq_BTKGH)
        )
        return dq_BTKGH, (dk_BCKH, dv_BCKH)

    operands = (q_BTKGH, do_BTKGH, kp_BSKH, vp_BSKH, lse_BKGT, delta_BKGT, seg_q_BT, seg_k_BS)
    dq0 = make_varying(jnp.zeros((b, nq * bq, kv, g, h), jnp.float32), operands, q_offset)
    dq_BTKGH, (dk_nBCKH, dv_nBCKH) = lax.scan(kv_block, dq0, jnp.arange(nk))

    def unblock(x_nBCKH):
        return x_nBCKH.transpose(1, 0, 2, 3, 4).reshape(b, nk * bk, kv, h)[:, :s_len]

    dq_BTNH = dq_BTKGH.reshape(b, nq * bq, n, h)[:, :t].astype(q_BTNH.dtype)
    dk_BSKH = unblock(dk_nBCKH).astype(k_BSKH.dtype)
    dv_BSKH = unblock(dv_nBCKH).astype(v_BSKH.dtype)
    return dq_BTNH, dk_BSKH, dv_BSKH, None, None, None


@functools.partial(jax.custom_vjp, nondiff_argnums=(6, 7))
def _blockwise(q_BTNH, k_BSKH, v_BSKH, seg_q_BT, seg_k_BS, q_offset, bq, bk):
    return _blockwise_forward(q_BTNH, k_BSKH, v_BSKH, seg_q_BT, seg_k_BS, q_offset, bq, bk)[0]


def _blockwise_fwd(q_BTNH, k_BSKH, v_BSKH, seg_q_BT, seg_k_BS, q_offset, bq, bk):
    o_BTNH, lse_BKGT = _blockwise_forward(
        q_BTNH, k_BSKH, v_BSKH, seg_q_BT, seg_k_BS, q_offset, bq, bk
    )
    return o_BTNH, (q_BTNH, k_BSKH, v_BSKH, seg_q_BT, seg_k_BS, q_offset, o_BTNH, lse_BKGT)


_blockwise.defvjp(_blockwise_fwd, _blockwise_backward)


def blockwise_attention(
    q_BTNH,
    k_BSKH,
    v_BSKH,
    seg_q_BT,
    seg_k_BS=None,
    q_offset=0,
    *,
    block_q: int = 512,
    block_k: int = 512,
):
    """Causal GQA attention by online softmax over [block_q, block_k] tiles; never builds [T, S].

    Query t sits at position `q_offset + t`, key s at position s; query t sees key s iff
    s <= q_offset + t and seg_q[t] == seg_k[s] (segment ids >= 0). Without `seg_k_BS` the keys
    are the queries' own positions (`seg_k_BS = seg_q_BT`, self-attention). Equals
    `gqa_attention` with `attention_weights_mask` up to summation order, for every row that sees a
    key. Key blocks after a query block's last position are skipped, forward and backward. The
    backward pass (custom VJP) recomputes the tiles from q, k, v, the output and the row
    log-sum-exp, so it holds O(T) memory as well. Block sizes are clamped to T and S.
    """
    t, s_len = q_BTNH.shape[1], k_BSKH.shape[1]
    if q_BTNH.shape[2] % k_BSKH.shape[2]:
        raise ValueError(f"blockwise_attention: {q_BTNH.shape[2]} query heads, {k_BSKH.shape[2]}")
    seg_k_BS = seg_q_BT if seg_k_BS is None else seg_k_BS
    bq, bk = max(1, min(block_q, t)), max(1, min(block_k, s_len))
    return _blockwise(
        q_BTNH,
        k_BSKH,
        v_BSKH,
        jnp.asarray(seg_q_BT, jnp.int32),
        jnp.asarray(seg_k_BS, jnp.int32),
        jnp.asarray(q_offset, jnp.int32),
        bq,
        bk,
    )


def context_parallel_attention(
    q_BTNH, k_BTKH, v_BTKH, seg_BT, mesh: Mesh, *, impl: str, block_q: int, block_k: int
):
    """Self-attention of sequences sharded over the mesh's `context` axis (`context_parallel`):
    local queries at their global positions, keys and values all-gathered. Equals the
    single-device layer (naive: the masked softmax; blockwise and pallas: `blockwise_attention`,
    which takes the query offset) up to summation order."""
    t_l = cp.local_length(q_BTNH.shape[1], mesh, "context_parallel_attention")
    tp = mesh.shape.get("tensor", 1)
    split_heads = tp > 1 and q_BTNH.shape[2] % tp == 0 and k_BTKH.shape[2] % tp == 0

    def local(q, k, v, seg):
        start = cp.offset(t_l)
        k_all, v_all, seg_all = cp.gather(k), cp.gather(v), cp.gather(seg)
        if impl == "naive":
            pos_k = jnp.arange(k_all.shape[1])
            mask = attention_weights_mask(seg, seg_all, start + jnp.arange(t_l), pos_k)
            return gqa_attention(q, k_all, v_all, mask)
        return blockwise_attention(
            q, k_all, v_all, seg, seg_all, start, block_q=block_q, block_k=block_k
        )

    qkv = cp.seq_spec(mesh, 4, ("tensor" if split_heads else None,))
    seg = cp.seq_spec(mesh, 2)
    fn = jax.shard_map(local, mesh=mesh, in_specs=(qkv, qkv, qkv, seg), out_specs=qkv)
    return fn(q_BTNH, k_BTKH, v_BTKH, seg_BT)


# --------------------------------------------------------------------------- the layer


class Attention(nnx.Module):
    """`mesh`: with a context axis of more than one device, the forward without a cache runs
    context parallel (`context_parallel_attention`)."""

    def __init__(self, cfg: ModelConfig, *, rngs: nnx.Rngs, mesh: Mesh | None = None):
        d, n, kv, h = (
            cfg.hidden_size,
            cfg.num_attention_heads,
            cfg.num_key_value_heads,
            cfg.head_dim,
        )
        std, pd = cfg.initializer_range, cfg.param_dtype
        self.q_DNH = param(rngs, (d, n, h), ("embed", "heads", "head_dim"), std=std, dtype=pd)
        self.k_DKH = param(rngs, (d, kv, h), ("embed", "kv_heads", "head_dim"), std=std, dtype=pd)
        self.v_DKH = param(rngs, (d, kv, h), ("embed", "kv_heads", "head_dim"), std=std, dtype=pd)
        self.o_NHD = param(rngs, (n, h, d), ("heads", "head_dim", "embed"), std=std, dtype=pd)
        self.compute_dtype = dtype_of(cfg.compute_dtype)
        self.impl = cfg.attention_impl
        self.block_q, self.block_k = cfg.attention_block_q, cfg.attention_block_k
        self.cp_mesh = cp.context_mesh(mesh)  # None: one device holds each sequence

    def _self_attention(self, q_BTNH, k_BTKH, v_BTKH, segment_ids_BT):
        if self.cp_mesh is not None:
            return context_parallel_attention(
                q_BTNH,
                k_BTKH,
                v_BTKH,
                segment_ids_BT,
                self.cp_mesh,
                impl=self.impl,
                block_q=self.block_q,
                block_k=self.block_k,
            )
        if self.impl == "blockwise":
            return blockwise_attention(
                q_BTNH, k_BTKH, v_BTKH, segment_ids_BT, block_q=self.block_q, block_k=self.block_k
            )
        if self.impl == "pallas":
            import pallas_kernels  # imported lazily: the kernel package is optional for the others

            return pallas_kernels.flash_attention(
                q_BTNH,
                k_BTKH,
                v_BTKH,
                segment_ids_BT,
                causal=True,
                block_q=self.block_q,
                block_k=self.block_k,
            )
        pos_T = jnp.arange(q_BTNH.shape[1])
        mask = attention_weights_mask(segment_ids_BT, segment_ids_BT, pos_T, pos_T)
        return gqa_attention(q_BTNH, k_BTKH, v_BTKH, mask)

    def __call__(self, x_BTD, segment_ids_BT, cache: KVCache | None = None):
        cd = self.compute_dtype
        x_BTD = x_BTD.astype(cd)
        q = jnp.einsum("btd,dnh->btnh", x_BTD, self.q_DNH[...].astype(cd))
        k = jnp.einsum("btd,dkh->btkh", x_BTD, self.k_DKH[...].astype(cd))
        v = jnp.einsum("btd,dkh->btkh", x_BTD, self.v_DKH[...].astype(cd))
        t = x_BTD.shape[1]
        if cache is None:
            o = self._self_attention(q, k, v, segment_ids_BT)
        else:
            start = cache.index
            k_all = jax.lax.dynamic_update_slice_in_dim(
                cache.k_BSKH, k.astype(cache.k_BSKH.dtype), start, 1
            )
            v_all = jax.lax.dynamic_update_slice_in_dim(
                cache.v_BSKH, v.astype(cache.v_BSKH.dtype), start, 1
            )
            seg_all = jax.lax.dynamic_update_slice_in_dim(
                cache.seg_BS, segment_ids_BT.astype(jnp.int32), start, 1
            )
            if self.impl == "naive" or t == 1:
                pos_q = start + jnp.arange(t)
                pos_k = jnp.arange(k_all.shape[1])
                mask = attention_weights_mask(segment_ids_BT, seg_all, pos_q, pos_k)
                mask &= (pos_k < start + t)[None, None, :]
                o = gqa_attention(q, k_all.astype(cd), v_all.astype(cd), mask)
            else:  # cached prefill: causal from `start`, so positions >= start + t are unseen
                o = blockwise_attention(
                    q,
                    k_all.astype(cd),
                    v_all.astype(cd),
                    segment_ids_BT,
                    seg_all,
                    start,
                    block_q=self.block_q,
                    block_k=self.block_k,
                )
            cache = KVCache(k_all, v_all, seg_all, start + t)
        y = jnp.einsum("btnh,nhd->btd", o, self.o_NHD[...].astype(cd))
        return y, cache
