"""Flash attention (GQA, causal, packed segments): Pallas TPU kernels, custom-VJP op, jnp
reference."""

from pallas_kernels.flash_attention.ops import flash_attention
from pallas_kernels.flash_attention.reference import attention_mask, flash_attention_reference

__all__ = ["attention_mask", "flash_attention", "flash_attention_reference"]
