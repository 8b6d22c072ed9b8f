"""Test-wide setup: 8 simulated CPU devices (for mesh tests) and fp32 matmuls.

XLA_FLAGS must be set before jax is imported anywhere, so it lives here.
"""

import os

os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")
os.environ.setdefault("JAX_PLATFORMS", "cpu")

import jax

jax.config.update("jax_default_matmul_precision", "highest")
