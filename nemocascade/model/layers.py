"""Shared building blocks: parameter creation with logical axes, RMSNorm, the squared-ReLU MLP.

Every parameter carries `axes` metadata (logical axis names, see `nemocascade.sharding`).
Parameters are stored in `param_dtype`; matmuls run in `compute_dtype` with fp32 accumulation
where it matters (norms, router, SSM recurrence).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from nemocascade.model.config import ModelConfig


def dtype_of(name: str) -> jnp.dtype:
    return jnp.dtype(name)


def param(
    rngs: nnx.Rngs | None, shape, axes, *, init="normal", std=0.02, dtype="float32"
) -> nnx.Param:
    """A `nnx.Param` of `shape` with logical `axes`; `init` is normal(std), zeros or ones."""
    if len(axes) != len(shape):
        raise ValueError(f"param shape {shape} and axes {axes} differ in rank")
    dt = dtype_of(dtype)
    if init == "normal":
        value = (std * jax.random.normal(rngs.params(), shape, jnp.float32)).astype(dt)
    elif init == "zeros":
        value = jnp.zeros(shape, dt)
    elif init == "ones":
        value = jnp.ones(shape, dt)
    else:
        raise ValueError(f"unknown init {init!r}")
    return nnx.Param(value, axes=tuple(axes))


def rms_norm(x: jax.Array, weight: jax.Array, eps: float) -> jax.Array:
    """x * rsqrt(mean(x^2) + eps) * weight, computed in fp32, cast back to x.dtype.

    (HF 5.x order.)
    """
    x32 = x.astype(jnp.float32)
    y = x32 * jax.lax.rsqrt(jnp.mean(jnp.square(x32), axis=-1, keepdims=True) + eps)
    return (weight.astype(jnp.float32) * y).astype(x.dtype)


class RMSNorm(nnx.Module):
    def __init__(self, size: int, eps: float, *, axis_name: str = "embed", dtype: str = "float32"):
        self.weight = nnx.Param(jnp.ones((size,), dtype_of(dtype)), axes=(axis_name,))
        self.eps = eps

    def __call__(self, x: jax.Array) -> jax.Array:
        return rms_norm(x, self.weight[...], self.eps)


def path_names(path) -> list[str]:
    """The names along a pytree key path (dict keys, attribute names, sequence indices)."""
    return [str(getattr(k, "key", getattr(k, "name", getattr(k, "idx", k)))) for k in path]


def relu2(x: jax.Array) -> jax.Array:
    return jnp.square(jax.nn.relu(x))


class MLP(nnx.Module):
    """Non-gated squared-ReLU MLP: down(relu(up(x))^2).

    Used for the shared expert and '-' blocks.
    """

    def __init__(self, cfg: ModelConfig, width: int, *, rngs: nnx.Rngs):
        d, std, pd = cfg.hidden_size, cfg.initializer_range, cfg.param_dtype
        self.up_DF = param(rngs, (d, width), ("embed", "mlp"), std=std, dtype=pd)
        self.down_FD = param(rngs, (width, d), ("mlp", "embed"), std=std, dtype=pd)
        self.compute_dtype = dtype_of(cfg.compute_dtype)

    def __call__(self, x_BTD: jax.Array) -> jax.Array:
        cd = self.compute_dtype
        h_BTF = relu2(jnp.einsum("btd,df->btf", x_BTD.astype(cd), self.up_DF[...].astype(cd)))
        return jnp.einsum("btf,fd->btd", h_BTF, self.down_FD[...].astype(cd))


def _varying_axes(x) -> frozenset:
    """Manual mesh axes (inside `shard_map`) that `x` varies over; empty outside shard_map."""
    aval = jax.typeof(x)
    mat = getattr(aval, "manual_axis_type", None)
    return frozenset(mat.varying) if mat is not None else frozenset(getattr(aval, "vma", ()))


def make_varying(tree, *refs):
    """`tree` with every leaf marked varying over the manual axes that any of `refs` varies over
    (a no-op outside `shard_map`): the initial carry of a loop whose body mixes it with sharded
    operands (else the loop's carry types clash under `shard_map`)."""
    vma = frozenset().union(*(_varying_axes(x) for x in jax.tree.leaves(refs)))

    def vary(x):
        missing = tuple(sorted(vma - _varying_axes(x)))
        return jax.lax.pcast(x, missing, to="varying") if missing else x

    return jax.tree.map(vary, tree)
