"""The train state: one pytree holding everything a training step reads and writes.

The model's static structure (`graphdef`) stays outside the state, so the state is a plain pytree
that `jax.jit` can take, donate and shard, and that orbax can save:

    graphdef, state = create_train_state(model, tx, rng)
    model = merge_model(graphdef, state)        # an nnx.Module again, e.g. for export

`params` holds the `nnx.Param`s (what the optimizer updates); `model_state` holds every other
`nnx.Variable` (e.g. the MoE correction bias, updated by rule outside the optimizer).
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx, struct


@struct.dataclass
class TrainState:
    """step: int32 scalar, number of batches consumed; rng: uint32[2] PRNG key data."""

    step: jax.Array
    params: nnx.State
    model_state: nnx.State
    opt_state: optax.OptState
    rng: jax.Array


def split_model(model: nnx.Module) -> tuple[nnx.GraphDef, nnx.State, nnx.State]:
    """`(graphdef, params, model_state)`: Params, then every other Variable."""
    return nnx.split(model, nnx.Param, ...)


def create_train_state(
    model: nnx.Module, tx: optax.GradientTransformation, rng: jax.Array
) -> tuple[nnx.GraphDef, TrainState]:
    """Split `model` and initialise the optimizer; `rng` is a raw uint32[2] key
    (jax.random.PRNGKey)."""
    graphdef, params, model_state = split_model(model)
    state = TrainState(
        step=jnp.zeros((), jnp.int32),
        params=params,
        model_state=model_state,
        opt_state=tx.init(params),
        rng=jnp.asarray(rng, jnp.uint32),
    )
    return graphdef, state


def merge_model(graphdef: nnx.GraphDef, state: TrainState) -> nnx.Module:
    """The nnx model with the state's params and model_state."""
    return nnx.merge(graphdef, state.params, state.model_state)


def bytes_per_device(state: Any, mesh) -> int:
    """Bytes of `state` (arrays or ShapeDtypeStructs, Variables carrying `axes`) held by one
    device when sharded over `mesh` (a Mesh or AbstractMesh) by the logical-axis table."""
    from nemocascade.sharding import state_specs

    specs = state_specs(state, mesh=mesh)
    total = 0
    leaves = jax.tree.leaves(state, is_leaf=lambda x: isinstance(x, nnx.Variable))
    spec_leaves = jax.tree.leaves(
        specs, is_leaf=lambda x: isinstance(x, jax.sharding.PartitionSpec)
    )
    for leaf, spec in zip(leaves, spec_leaves, strict=True):
        value = leaf.get_value() if isinstance(leaf, nnx.Variable) else leaf
        shards = 1
        for entry in spec:
            for name in (entry,) if isinstance(entry, str) else tuple(entry or ()):
                shards *= mesh.shape[name]
        total += int(np.prod(value.shape)) * jnp.dtype(value.dtype).itemsize // shards
    return total


def param_count(params: Any) -> int:
    """Total number of scalars in a params pytree."""
    return int(sum(x.size for x in jax.tree.leaves(params)))
