"""Pallas kernels of nemocascade; each has a pure-jnp reference and a custom-VJP op.

`gmm(lhs[M,K], rhs[G,K,N], group_sizes[G], *, interpret=None, tiling=None,
preferred_element_type=None, impl=None)` is the MoE grouped matmul
(see pallas_kernels/gmm/README.md).
"""

from pallas_kernels.gmm import gmm, gmm_reference, tgmm, tgmm_reference

__all__ = ["gmm", "gmm_reference", "tgmm", "tgmm_reference"]
