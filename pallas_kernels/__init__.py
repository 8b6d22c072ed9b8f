"""Pallas kernels of nemocascade; each has a pure-jnp reference and a custom-VJP op.

`gmm(lhs[M,K], rhs[G,K,N], group_sizes[G], *, interpret=None, tiling=None,
preferred_element_type=None, impl=None)` is the MoE grouped matmul
(see pallas_kernels/gmm/README.md).

`flash_attention(q[B,T,N,H], k[B,T,K,H], v[B,T,K,H], segment_ids[B,T], *, causal=True,
block_q=512, block_k=512, interpret=None) -> [B,T,N,H]` is GQA flash attention with packed
segments (see pallas_kernels/flash_attention/README.md).
"""

from pallas_kernels.flash_attention import flash_attention, flash_attention_reference
from pallas_kernels.gmm import gmm, gmm_reference, tgmm, tgmm_reference

__all__ = [
    "flash_attention",
    "flash_attention_reference",
    "gmm",
    "gmm_reference",
    "tgmm",
    "tgmm_reference",
]
