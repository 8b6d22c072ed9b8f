"""Grouped matmul (MoE expert matmul): Pallas TPU kernel, custom VJP op, jnp references."""

from pallas_kernels.gmm.ops import IMPLS, gmm, tgmm
from pallas_kernels.gmm.reference import gmm_reference, tgmm_reference
from pallas_kernels.gmm.tiling import default_tiling

__all__ = ["IMPLS", "default_tiling", "gmm", "gmm_reference", "tgmm", "tgmm_reference"]
