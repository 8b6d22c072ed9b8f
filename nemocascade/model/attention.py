"""Grouped-query causal self-attention with no positional encoding (NemotronH `*` blocks).

Scores are `q.k * head_dim**-0.5`, softmax in fp32. A query attends to keys at earlier or equal
positions of the same segment (`segment_ids`; 0 marks padding). With a KV cache the new keys are
written at `cache.index` and the query sees the cache prefix.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx, struct

from nemocascade.model.config import ModelConfig
from nemocascade.model.layers import dtype_of, param


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


class Attention(nnx.Module):
    def __init__(self, cfg: ModelConfig, *, rngs: nnx.Rngs):
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

    def __call__(self, x_BTD, segment_ids_BT, cache: KVCache | None = None):
        cd = self.compute_dtype
        x_BTD = x_BTD.astype(cd)
        q = jnp.einsum("btd,dnh->btnh", x_BTD, self.q_DNH[...].astype(cd))
        k = jnp.einsum("btd,dkh->btkh", x_BTD, self.k_DKH[...].astype(cd))
        v = jnp.einsum("btd,dkh->btkh", x_BTD, self.v_DKH[...].astype(cd))
        t = x_BTD.shape[1]
        if cache is None:
            pos_T = jnp.arange(t)
            mask = attention_weights_mask(segment_ids_BT, segment_ids_BT, pos_T, pos_T)
            o = gqa_attention(q, k, v, mask)
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
            pos_q = start + jnp.arange(t)
            pos_k = jnp.arange(k_all.shape[1])
            mask = attention_weights_mask(segment_ids_BT, seg_all, pos_q, pos_k)
            mask &= (pos_k < start + t)[None, None, :]
            o = gqa_attention(q, k_all.astype(cd), v_all.astype(cd), mask)
            cache = KVCache(k_all, v_all, seg_all, start + t)
        y = jnp.einsum("btnh,nhd->btd", o, self.o_NHD[...].astype(cd))
        return y, cache
