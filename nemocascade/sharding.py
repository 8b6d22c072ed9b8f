"""Device mesh construction and the one logical-axis -> mesh-axis table.

Layers name logical axes on their parameters (`nnx.Param(..., axes=("embed", "mlp"))`) and on
activations; only this module knows mesh axes. The mesh has five axes:

  data     pure data parallelism (batch)
  fsdp     batch and parameter sharding (ZeRO-3 style: params gathered per layer by XLA)
  expert   MoE experts (expert parallelism; tokens exchanged with all-to-all), also a batch axis
  context  sequence positions (context parallelism, `model/context_parallel.py`): the attention
           and Mamba-2 layers exchange keys / values and recurrent states across it
  tensor   Megatron-style tensor parallelism (heads, MLP width, vocabulary)

Their product must equal the number of devices used.
"""

from __future__ import annotations

import dataclasses
import os
import re
from collections.abc import Mapping, Sequence
from typing import Any

import jax
import numpy as np
from flax import nnx
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

MESH_AXES = ("data", "fsdp", "expert", "context", "tensor")
# intra-op threads per simulated CPU device (`reserve_cpu_collective_threads`)
CPU_THREADS_PER_DEVICE = 8


def reserve_cpu_collective_threads(per_device: int = CPU_THREADS_PER_DEVICE) -> int | None:
    """Sizes XLA:CPU's intra-op thread pool for simulated devices; returns the size set (None
    when nothing was set). Call before jax's CPU backend starts (before the first
    `jax.devices()` or computation; importing jax is fine).

    With N simulated devices (`--xla_force_host_platform_device_count=N` in XLA_FLAGS, or
    JAX_NUM_CPU_DEVICES) every device's program runs on one pool of max(cores, N) threads; the
    thunk runtime runs independent operations of one program at once, collectives included,
    and an in-process collective holds its thread until all N devices have reached it. When
    every pool thread waits in some collective, a device that has not reached it yet has no
    thread to get there, and the program never finishes (caught in the 8-device rehearsal: 7
    threads in one all-reduce, the 8th in an all-gather that device 0 had started alongside,
    no thread left for device 7). XLA reads the pool size from the NPROC environment variable
    when it creates the CPU client; this sets NPROC to N * `per_device` (the extra threads
    idle; a sharded 8-device matmul chain ran as fast with 64 as with 8) unless NPROC is set
    already or there is at most one device."""
    match = re.search(
        r"--xla_force_host_platform_device_count=(\d+)", os.environ.get("XLA_FLAGS", "")
    )
    devices = int(match.group(1)) if match else int(os.environ.get("JAX_NUM_CPU_DEVICES", 1))
    if devices <= 1 or "NPROC" in os.environ:
        return None
    threads = max(os.cpu_count() or 1, devices * int(per_device))
    os.environ["NPROC"] = str(threads)
    return threads


# logical axis -> mesh axis (or tuple of mesh axes, or None = replicated).
LOGICAL_RULES: dict[str, Any] = {
    # activations
    "batch": ("data", "fsdp", "expert"),
    "seq": "context",
    "act_embed": None,
    # parameters
    "vocab": "tensor",
    "embed": "fsdp",
    "heads": "tensor",
    "kv_heads": "tensor",
    "head_dim": None,
    "mlp": "tensor",
    "experts": "expert",
    "ssm_proj": "tensor",
    "ssm_conv": "tensor",
    "ssm_inner": "tensor",
    "ssm_heads": "tensor",
    "conv_kernel": None,
    # the repeats of a scanned layer segment (stacked parameters, `layer_scan.BlockGroup`):
    # replicated, every device holds its share of every layer as in the unrolled model
    "layers": None,
}


@dataclasses.dataclass(frozen=True)
class MeshConfig:
    """Sizes of the mesh axes; -1 on one axis means 'all remaining devices'."""

    data: int = -1
    fsdp: int = 1
    expert: int = 1
    context: int = 1
    tensor: int = 1

    def shape(self, num_devices: int) -> tuple[int, ...]:
        """Sizes in `MESH_AXES` order."""
        sizes = [getattr(self, a) for a in MESH_AXES]
        if sizes.count(-1) > 1:
            raise ValueError(f"mesh {self}: at most one axis may be -1")
        known = int(np.prod([s for s in sizes if s != -1]))
        if -1 in sizes:
            if num_devices % known:
                raise ValueError(f"mesh {self}: {num_devices} devices not divisible by {known}")
            sizes[sizes.index(-1)] = num_devices // known
        if int(np.prod(sizes)) != num_devices:
            hint = ""
            if int(np.prod(sizes)) > num_devices and jax.devices()[0].platform == "cpu":
                hint = (
                    f"; on CPU, simulate {int(np.prod(sizes))} devices with XLA_FLAGS="
                    f"--xla_force_host_platform_device_count={int(np.prod(sizes))}"
                )
            raise ValueError(
                f"mesh {dict(zip(MESH_AXES, sizes, strict=True))} (mesh.data x mesh.fsdp x "
                f"mesh.expert x mesh.context x mesh.tensor) needs {int(np.prod(sizes))} devices, "
                f"{num_devices} are available{hint}"
            )
        return tuple(sizes)


def make_mesh(
    cfg: MeshConfig | Mapping[str, int] | None = None, devices: Sequence[jax.Device] | None = None
) -> Mesh:
    """A `Mesh` with axes `MESH_AXES` over `devices` (default: all devices).

    With no axis at -1, a mesh smaller than the device list uses its first devices (e.g. a
    1-device run on a host that exposes several)."""
    if cfg is None:
        cfg = MeshConfig()
    elif not isinstance(cfg, MeshConfig):
        unknown = set(cfg) - set(MESH_AXES)
        if unknown:
            raise ValueError(f"mesh config: unknown axes {sorted(unknown)}; use {MESH_AXES}")
        cfg = MeshConfig(**{k: int(v) for k, v in cfg.items()})
    devices = list(jax.devices() if devices is None else devices)
    sizes = tuple(getattr(cfg, a) for a in MESH_AXES)
    if -1 not in sizes and 0 < int(np.prod(sizes)) < len(devices):
        devices = devices[: int(np.prod(sizes))]
    shape = cfg.shape(len(devices))
    return Mesh(np.asarray(devices).reshape(shape), MESH_AXES)


def logical_to_spec(
    axes: Sequence[str | None] | None,
    rules: Mapping[str, Any] = LOGICAL_RULES,
    mesh: Mesh | None = None,
) -> P:
    """PartitionSpec for a tuple of logical axis names; mesh axes of size 1 are dropped."""
    if axes is None:
        return P()
    out, used = [], set()
    for name in axes:
        target = None if name is None else rules.get(name, None)
        if name is not None and name not in rules:
            raise KeyError(f"logical axis {name!r} has no rule in the sharding table")
        targets = (target,) if isinstance(target, str) else tuple(target or ())
        if mesh is not None:
            targets = tuple(t for t in targets if mesh.shape.get(t, 1) > 1)
        targets = tuple(t for t in targets if t not in used)  # a mesh axis may appear once
        used.update(targets)
        out.append(None if not targets else (targets[0] if len(targets) == 1 else targets))
    return P(*out)


def _axes_of(leaf) -> Sequence[str | None] | None:
    if isinstance(leaf, nnx.Variable):
        return leaf.get_metadata().get("axes")
    return None


def state_specs(state: Any, rules: Mapping[str, Any] = LOGICAL_RULES, mesh: Mesh | None = None):
    """PartitionSpecs for an nnx.State (or any pytree of Variables / arrays) from `axes` metadata.

    Arrays without axes metadata are replicated. Dimensions that do not divide evenly over their
    mesh axes are replicated (so any tiny test model fits any mesh).
    """

    def spec(leaf):
        axes = _axes_of(leaf)
        value = leaf.get_value() if isinstance(leaf, nnx.Variable) else leaf
        shape = getattr(value, "shape", ())
        if axes is None or len(axes) != len(shape):
            return P()
        p = logical_to_spec(axes, rules, mesh)
        if mesh is not None:
            fixed = []
            for dim, entry in zip(shape, tuple(p) + (None,) * (len(shape) - len(p)), strict=True):
                names = (entry,) if isinstance(entry, str) else tuple(entry or ())
                size = int(np.prod([mesh.shape[n] for n in names])) if names else 1
                fixed.append(entry if dim % size == 0 else None)
            p = P(*fixed)
        return p

    return jax.tree.map(spec, state, is_leaf=lambda x: isinstance(x, nnx.Variable))


def state_shardings(state: Any, mesh: Mesh, rules: Mapping[str, Any] = LOGICAL_RULES):
    """NamedShardings for every leaf of `state` (see `state_specs`)."""
    specs = state_specs(state, rules, mesh)
    return jax.tree.map(lambda s: NamedSharding(mesh, s), specs, is_leaf=lambda x: isinstance(x, P))


def batch_sharding(
    mesh: Mesh, ndim: int = 2, rules: Mapping[str, Any] = LOGICAL_RULES
) -> NamedSharding:
    """Sharding of a `[batch, ...]` array: batch over the data-like axes, the rest replicated."""
    return NamedSharding(mesh, logical_to_spec(("batch",) + (None,) * (ndim - 1), rules, mesh))


def batch_axes(mesh: Mesh, rules: Mapping[str, Any] = LOGICAL_RULES) -> tuple[str, ...]:
    """The mesh axes (of size > 1) that the logical `batch` axis is sharded over, in table order
    (e.g. the token axes of the MoE expert-parallel exchange)."""
    spec = logical_to_spec(("batch",), rules, mesh)
    entry = spec[0] if len(spec) else None
    return (entry,) if isinstance(entry, str) else tuple(entry or ())


def batch_shards(mesh: Mesh | None) -> int:
    """How many ways the batch dimension is split (product of the batch axes' sizes; 1 without
    a mesh): every batch row count must be a multiple of it."""
    if mesh is None:
        return 1
    return int(np.prod([mesh.shape[a] for a in batch_axes(mesh)]))


def device_batch(batch: Mapping[str, Any], mesh: Mesh | None, *, process_local: bool = True):
    """The one way a host batch `{key: [B, ...] array}` becomes device arrays.

    With a mesh, each array is laid out over the mesh's batch axes (`batch_sharding`):
    `process_local=True` means each process holds only its own rows (`[B / processes, ...]`, as
    a data pipeline sharded by process yields them); `False` means every process holds the same
    whole batch (rollouts, which every process samples identically). Without a mesh: plain
    `jnp` arrays on the default device.
    """
    if mesh is None:
        return {k: jax.numpy.asarray(v) for k, v in batch.items()}
    out = {}
    copies = jax.process_count() if process_local else 1
    for k, v in batch.items():
        v = np.asarray(v)
        if v.shape and (v.shape[0] * copies) % batch_shards(mesh):
            raise ValueError(
                f"batch[{k!r}] has {v.shape[0] * copies} rows, not a multiple of the "
                f"{batch_shards(mesh)} batch shards of the mesh {dict(mesh.shape)}"
            )
        out[k] = jax.make_array_from_process_local_data(
            batch_sharding(mesh, v.ndim), v, None if process_local else v.shape
        )
    return out
