"""Parameter counts and the per-device memory plan of a NemotronH model, from `jax.eval_shape`
(nothing is allocated).

    python -m nemocascade.tools.params --model=nano_30b_a3b
    python -m nemocascade.tools.params --model=path/to/config.json
    python -m nemocascade.tools.params --model=nano_30b_a3b --mesh=fsdp=16,expert=8 \
        --batch=64 --seq=4096 --remat=block --hbm_gb=95

Prints JSON: `total_params`, `active_params` (per-token parameters including `lm_head`, excluding
the input embedding), `active_params_with_embeddings`, and a per-layer-type breakdown.
Router correction biases and norms count as parameters (as in the checkpoint).

With `--mesh` (mesh axes not named are 1) the JSON also has `plan` (see `memory_plan`): per
device, the bytes of parameters, gradients and AdamW state, from the real sharding table
(`nemocascade.sharding.LOGICAL_RULES` over an abstract mesh of that shape), an activation
estimate for the remat policy, and whether the sum fits `--hbm_gb` (vendor GB, 1e9 bytes).
"""

from __future__ import annotations

import functools
import json
import math
import sys
from collections import defaultdict
from pathlib import Path

import jax
import jax.numpy as jnp
from absl import app, flags
from flax import nnx
from jax.sharding import AbstractMesh

from nemocascade.model.config import PATTERN_TO_BLOCK, ModelConfig
from nemocascade.model.layer_scan import layer_segments
from nemocascade.model.moe_balance import ExpertBias
from nemocascade.model.nemotron_h import NemotronH


def resolve_model_config(spec: str) -> ModelConfig:
    """A preset name (tiny, small, nano_30b_a3b) or a path to a Hugging Face config.json."""
    if spec.endswith(".json") or Path(spec).is_file():
        return ModelConfig.from_json_file(spec)
    return ModelConfig.preset(spec)


def abstract_model(cfg: ModelConfig) -> NemotronH:
    return nnx.eval_shape(lambda: NemotronH(cfg, rngs=nnx.Rngs(0)))


def _block_kind(cfg: ModelConfig, path: tuple) -> str | None:
    """The block type of a layer parameter's state path (None outside the layers): unrolled
    `layers/<i>/...`, scanned `segments/<s>/blocks/<j>/...` (one stacked variable holds every
    repeat of unit position j)."""
    if path[0] == "layers":
        return cfg.block_types[path[1]]
    if path[0] == "segments":
        return PATTERN_TO_BLOCK[layer_segments(cfg.pattern)[path[1]].unit[path[3]]]
    return None


def layer_param_states(cfg: ModelConfig, params) -> list:
    """[(state, layers)]: the parameter state of one block and how many layers it holds (its
    leading stacked axis in a scanned model, else 1)."""
    if "layers" in params:
        return [(layer, 1) for layer in params["layers"].values()]
    if "segments" in params:
        segs = layer_segments(cfg.pattern)
        return [
            (block, segs[s].rows(j) if segs[s].repeats > 1 else 1)
            for s, group in params["segments"].items()
            for j, block in group["blocks"].items()
        ]
    return []


def count_params(cfg: ModelConfig) -> dict:
    """Total and active parameter counts with a per-block-type breakdown."""
    model = abstract_model(cfg)
    per_layer = defaultdict(lambda: {"layers": 0, "params_per_layer": 0, "active_per_layer": 0})
    total = active = 0
    k, e = cfg.num_experts_per_tok, cfg.n_routed_experts
    for path, var in nnx.to_flat_state(nnx.state(model)):
        if not isinstance(var, nnx.Param | ExpertBias):
            continue  # statistics (expert load) are not parameters
        n = math.prod(var.get_value().shape)
        is_expert = path[-1] in ("up_EDF", "down_EFD")
        act = n * k // e if is_expert else n
        total += n
        if path[0] == "embed_VD":
            continue
        active += act
        kind = _block_kind(cfg, path)
        if kind is not None:
            per_layer[kind]["params"] = per_layer[kind].get("params", 0) + n
            per_layer[kind]["active"] = per_layer[kind].get("active", 0) + act
    for kind in per_layer:
        count = cfg.block_types.count(kind)
        per_layer[kind]["layers"] = count
        per_layer[kind]["params_per_layer"] = per_layer[kind].pop("params") // count
        per_layer[kind]["active_per_layer"] = per_layer[kind].pop("active") // count
    embed = cfg.vocab_size * cfg.hidden_size
    return {
        "model": cfg.pattern if len(cfg.pattern) < 16 else f"{cfg.num_layers} layers",
        "total_params": total,
        "active_params": active,
        "active_params_with_embeddings": active + embed,
        "embedding_params": embed,
        "per_block_type": dict(per_layer),
    }


# ----------------------------------------------------------------------------- memory plan
def parse_mesh(spec: str) -> dict[str, int]:
    """'fsdp=16,expert=8' -> {'data': 1, 'fsdp': 16, 'expert': 8, 'context': 1, 'tensor': 1}."""
    from nemocascade.sharding import MESH_AXES

    sizes = dict.fromkeys(MESH_AXES, 1)
    for part in filter(None, (p.strip() for p in spec.split(","))):
        name, _, value = part.partition("=")
        if name not in sizes or not value.isdigit() or int(value) < 1:
            raise ValueError(
                f"--mesh={spec!r}: bad entry {part!r}; use axis=size with axes "
                f"{MESH_AXES} and sizes >= 1"
            )
        sizes[name] = int(value)
    return sizes


@functools.lru_cache(maxsize=4)
def abstract_train_state(cfg: ModelConfig):
    """The TrainState of `create_train_state` (AdamW of `make_optimizer`) as ShapeDtypeStructs."""
    from nemocascade.train.optim import OptimConfig, make_optimizer
    from nemocascade.train.state import create_train_state

    tx = make_optimizer(OptimConfig(), total_steps=1)
    return jax.eval_shape(
        lambda: create_train_state(NemotronH(cfg, rngs=nnx.Rngs(0)), tx, jax.random.PRNGKey(0))[1]
    )


def _block_activation_bytes(cfg: ModelConfig, kind: str, seq: int, saved: str) -> float:
    """Estimated bytes per token a block keeps for the backward pass.

    saved="all": every intermediate (no remat); "matmuls": only outputs of matmuls without batch
    dimensions (jax.checkpoint_policies.dots_with_no_batch_dims_saveable) plus the block input.
    Attention scores / probabilities are [heads, seq] per token for the naive softmax and
    [heads, block_k] for the blockwise and Pallas paths (one key tile at a time).
    """
    c, f32 = jnp.dtype(cfg.compute_dtype).itemsize, 4
    d, e, k = cfg.hidden_size, cfg.n_routed_experts, cfg.num_experts_per_tok
    common = d * c + d * f32  # block input and the fp32 norm
    if kind == "mamba":
        i, cv, h, n, L = (
            cfg.mamba_inner,
            cfg.conv_dim,
            cfg.mamba_num_heads,
            cfg.ssm_state_size,
            min(cfg.chunk_size, seq),
        )
        mm = (i + cv + h) * c + d * c  # in_proj, out_proj outputs
        rest = (
            cv * (c + f32)
            + 2 * h * f32
            + f32 * (6 * i + 2 * h * n + h)
            + 3 * L * h * f32
            + 3 * i * f32
            + i * c
        )  # conv, dt, SSD (intra-chunk [L, H]), norm
    elif kind == "attention":
        nq, kv, hd = cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim
        mm = (nq + 2 * kv) * hd * c + d * c  # q, k, v, o projections
        keys = seq if cfg.attention_impl == "naive" else min(cfg.attention_block_k, seq)
        rest = nq * keys * (3 * f32 + c) + keys + nq * hd * c  # scores, masked, probs, mask, out
    elif kind == "moe":
        fe, fs = cfg.moe_intermediate_size, cfg.moe_shared_expert_intermediate_size
        mm = e * f32 + fs * c + d * c  # router logits, shared expert
        rest = e * f32 + k * d * c + 2 * k * fe * c + k * d * f32 + fs * c + d * c
    elif kind == "mlp":
        mm = cfg.intermediate_size * c + d * c
        rest = cfg.intermediate_size * c
    else:
        raise ValueError(f"unknown block kind {kind!r}")
    return common + mm + (rest if saved == "all" else 0)


def activation_estimate(
    cfg: ModelConfig, tokens: int, seq: int, remat: str, loss_chunk: int = 0
) -> dict[str, float]:
    """Activation bytes of one device's `tokens` (training step peak, an analytic estimate).

    none: every block's intermediates; block: each block's input, plus one block's intermediates
    while it is recomputed; matmuls: matmul outputs of every block plus one block's rest.
    Plus the loss: fp32 logits and their gradient ([tokens or loss_chunk, V] x 3 buffers) and
    the final hidden states.
    """
    if remat not in ("none", "block", "matmuls"):
        raise ValueError(f"remat {remat!r} not in ('none', 'block', 'matmuls')")
    c = jnp.dtype(cfg.compute_dtype).itemsize
    per_all = [_block_activation_bytes(cfg, kd, seq, "all") for kd in cfg.block_types]
    per_mm = [_block_activation_bytes(cfg, kd, seq, "matmuls") for kd in cfg.block_types]
    if remat == "none":
        blocks = sum(per_all)
    elif remat == "block":
        blocks = cfg.num_layers * cfg.hidden_size * c + max(per_all)
    else:
        blocks = sum(per_mm) + max(per_all)
    loss_rows = min(loss_chunk, tokens) if loss_chunk else tokens
    loss = 3 * loss_rows * cfg.vocab_size * 4 + tokens * cfg.hidden_size * 4
    return {"blocks": blocks * tokens, "loss": float(loss), "total": blocks * tokens + loss}


def memory_plan(
    cfg: ModelConfig,
    mesh: dict[str, int],
    *,
    batch: int,
    seq: int,
    remat: str = "block",
    loss_chunk: int = 0,
    hbm_gb: float | None = None,
) -> dict:
    """Per-device bytes of parameters, gradients (param dtype), AdamW state and activations on
    `mesh` (sizes of data/fsdp/expert/context/tensor), from the sharding table; `fits` compares
    the sum with `hbm_gb` * 1e9 bytes. The batch is split over the data-like axes (data, fsdp,
    expert) and each sequence over `context` (context parallelism: a device holds seq / context
    positions of its rows). A layer's parameters gathered over fsdp (forward, and again for its
    gradient) are included as `fsdp_gather_bytes` (the largest layer, twice); with context > 1,
    the keys and values an attention layer gathers over the axis (its rows' whole sequences,
    forward and backward) as `context_gather_bytes`."""
    from nemocascade.sharding import LOGICAL_RULES, MESH_AXES
    from nemocascade.train.state import bytes_per_device

    amesh = AbstractMesh(tuple(mesh[a] for a in MESH_AXES), MESH_AXES)
    n_dev = math.prod(mesh.values())
    batch_shards = math.prod(mesh[a] for a in LOGICAL_RULES["batch"])
    if batch % batch_shards:
        raise ValueError(
            f"batch {batch} is not divisible by the batch shards {batch_shards} "
            f"(data x fsdp x expert of mesh {mesh})"
        )
    state = abstract_train_state(cfg)
    params = bytes_per_device(state.params, amesh)
    grads = params  # gradients have the params' shapes, dtypes and shardings
    opt = bytes_per_device(state.opt_state, amesh)
    other = bytes_per_device(state.model_state, amesh)
    no_fsdp = AbstractMesh(tuple(1 if a == "fsdp" else mesh[a] for a in MESH_AXES), MESH_AXES)
    layer_bytes = [
        bytes_per_device(nnx.state(layer), no_fsdp) // n
        for layer, n in layer_param_states(cfg, state.params)
    ] or [0]
    gather = 2 * max(layer_bytes) if mesh["fsdp"] > 1 else 0
    context = mesh.get("context", 1)
    if seq % context:
        raise ValueError(f"seq {seq} is not divisible by the context axis {context} of {mesh}")
    tokens = batch * seq // (batch_shards * context)
    act = activation_estimate(cfg, tokens, seq, remat, loss_chunk)
    kv_bytes = 2 * cfg.num_key_value_heads * cfg.head_dim * jnp.dtype(cfg.compute_dtype).itemsize
    has_attention = "attention" in cfg.block_types
    cp_gather = 2 * (batch // batch_shards) * seq * kv_bytes if context > 1 and has_attention else 0
    total = params + grads + opt + other + gather + cp_gather + act["total"]
    plan = {
        "mesh": mesh,
        "devices": n_dev,
        "batch": batch,
        "seq": seq,
        "remat": remat,
        "loss_chunk": loss_chunk,
        "tokens_per_device": tokens,
        "param_dtype": cfg.param_dtype,
        "compute_dtype": cfg.compute_dtype,
        "params_total_bytes": sum(
            math.prod(v.shape) * jnp.dtype(v.dtype).itemsize for v in jax.tree.leaves(state.params)
        ),
        "per_device_bytes": {
            "params": params,
            "grads": grads,
            "optimizer": opt,
            "model_state": other,
            "fsdp_gather": gather,
            "context_gather": int(cp_gather),
            "activations": int(act["total"]),
            "activations_blocks": int(act["blocks"]),
            "activations_loss": int(act["loss"]),
            "total": int(total),
        },
        "per_device_gb": round(total / 1e9, 3),
    }
    if hbm_gb is not None:
        plan["hbm_gb"] = hbm_gb
        plan["fits"] = bool(total <= hbm_gb * 1e9)
    return plan


FLAGS = flags.FLAGS
flags.DEFINE_string("model", "nano_30b_a3b", "preset name or path to a HF config.json")
flags.DEFINE_string(
    "mesh",
    None,
    "mesh sizes, e.g. fsdp=16,expert=8 (axes data, fsdp, expert, context, "
    "tensor; unnamed axes are 1); enables the per-device memory plan",
)
flags.DEFINE_integer("batch", 8, "global batch (sequences) for the activation estimate")
flags.DEFINE_integer("seq", 4096, "sequence length for the activation estimate")
flags.DEFINE_string("remat", None, "none | block | matmuls (default: the model config's)")
flags.DEFINE_integer("loss_chunk", 0, "chunked cross-entropy size (0: full [B, T, V] logits)")
flags.DEFINE_float("hbm_gb", None, "HBM per device in GB (1e9 bytes), e.g. 95 (v5p), 141 (H200)")
flags.DEFINE_string(
    "attention_impl", None, "naive | blockwise | pallas (default: the model config's)"
)


def main(argv):
    del argv
    cfg = resolve_model_config(FLAGS.model)
    if FLAGS.attention_impl:
        cfg = cfg.replace(attention_impl=FLAGS.attention_impl)
    report = count_params(cfg)
    if FLAGS.mesh is not None:
        report["plan"] = memory_plan(
            cfg,
            parse_mesh(FLAGS.mesh),
            batch=FLAGS.batch,
            seq=FLAGS.seq,
            remat=FLAGS.remat or cfg.remat,
            loss_chunk=FLAGS.loss_chunk,
            hbm_gb=FLAGS.hbm_gb,
        )
    json.dump(report, sys.stdout, indent=2)
    sys.stdout.write("\n")


if __name__ == "__main__":
    app.run(main)
