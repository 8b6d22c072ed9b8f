"""A scalar (Bradley-Terry) reward model on the NemotronH backbone, and its checkpoint format.

    h_BTD = backbone.hidden_states(input_ids, segment_ids)   # final normalised hidden states
    r_B   = h_BTD[b, last_B[b], :] . head_D                 # fp32: the last real token's state

The backbone is a whole `NemotronH` (e.g. the SFT policy it starts from); its `lm_head` is not
used, and `split_reward_model` leaves it out of the trainable parameters (no gradient, no
optimizer state, unchanged on export). Sequences are right-padded: segment ids are 1 up to
`last` and 0 after it (padding), so neither attention nor Mamba lets padding reach a real token.

Export (`export_reward_model`), a directory:

    backbone/                   the NemotronH in Hugging Face layout (`save_hf_checkpoint`:
                                config.json + safetensors), plus tokenizer.json when given
    reward_head.safetensors     {"score.weight": [1, D] float32}
    reward_model.json           format, version, pooling, the head's file / tensor / shape,
                                hidden_size, vocab_size and the tokenizer's fingerprint

`load_reward_model` rebuilds the `RewardModel`; given the policy's `ModelConfig` (and tokenizer)
it refuses a checkpoint whose vocabulary or architecture differs, naming every mismatching key.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Literal

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.sharding import Mesh
from safetensors import safe_open
from safetensors.flax import save_file

from nemocascade.model.config import ModelConfig
from nemocascade.model.hf_io import CheckpointError, load_hf_checkpoint, save_hf_checkpoint
from nemocascade.model.layers import param
from nemocascade.model.nemotron_h import NemotronH

FORMAT = "nemocascade.reward_model"
VERSION = 1
META_FILE = "reward_model.json"
HEAD_FILE = "reward_head.safetensors"
HEAD_TENSOR = "score.weight"
BACKBONE_DIR = "backbone"
# Keys of a ModelConfig that make two models read token ids the same way.
VOCAB_KEYS = ("vocab_size", "pad_token_id", "bos_token_id", "eos_token_id")
# Keys that do not change what a checkpoint computes (numerics, kernels, initialisation): never
# compared.
RUNTIME_KEYS = (
    "param_dtype",
    "compute_dtype",
    "remat",
    "scan_layers",
    "attention_impl",
    "attention_block_q",
    "attention_block_k",
    "moe_backend",
    "moe_capacity_factor",
    "moe_aux_loss_coef",
    "initializer_range",
    "rescale_prenorm_residual",
    "max_position_embeddings",
)
# The backbone's output projection: not a trainable parameter of a reward model.
LM_HEAD = "lm_head_DV"
TRAINABLE = nnx.All(nnx.Param, nnx.Not(nnx.PathContains(LM_HEAD)))


class RewardModelMismatchError(CheckpointError):
    """A reward-model checkpoint does not fit the policy it should score: names every key."""


class RewardModel(nnx.Module):
    """A NemotronH backbone and a scalar head on the last real token's final hidden state.

    `backbone`: an existing NemotronH to start from (e.g. the SFT policy); by default a fresh one
    of `cfg`. The head is fp32, normal(initializer_range), logical axis `embed`."""

    def __init__(
        self,
        cfg: ModelConfig,
        *,
        rngs: nnx.Rngs,
        mesh: Mesh | None = None,
        backbone: NemotronH | None = None,
    ):
        if backbone is not None and backbone.cfg != cfg:
            raise ValueError("RewardModel: the backbone's config differs from cfg")
        self.cfg = cfg
        self.backbone = backbone if backbone is not None else NemotronH(cfg, rngs=rngs, mesh=mesh)
        self.head_D = param(
            rngs, (cfg.hidden_size,), ("embed",), std=cfg.initializer_range, dtype="float32"
        )

    def __call__(self, input_ids_BT, last_B, return_aux: bool = False):
        """Rewards [B] fp32 of right-padded sequences whose last real token is at `last_B`
        (and, with `return_aux`, the backbone's MoE statistics)."""
        T = input_ids_BT.shape[1]
        segment_ids_BT = (jnp.arange(T)[None, :] <= last_B[:, None]).astype(jnp.int32)
        h_BTD, _, aux = self.backbone.hidden_states(input_ids_BT, segment_ids_BT, return_aux=True)
        h_BD = jnp.take_along_axis(h_BTD, last_B[:, None, None], axis=1)[:, 0]
        r_B = jnp.einsum(
            "bd,d->b",
            h_BD.astype(jnp.float32),
            self.head_D[...].astype(jnp.float32),
            preferred_element_type=jnp.float32,
        )
        return (r_B, aux) if return_aux else r_B


def split_reward_model(model: RewardModel) -> tuple[nnx.GraphDef, nnx.State, nnx.State]:
    """`(graphdef, params, model_state)` like `train.state.split_model`, except that the
    backbone's lm_head (unused by a reward model) goes to `model_state`: no gradient, no
    optimizer state, kept as it is."""
    return nnx.split(model, TRAINABLE, ...)


def abstract_reward_model(cfg: ModelConfig, mesh: Mesh | None = None) -> RewardModel:
    """The model's structure with shapes only (`nnx.eval_shape`; nothing allocated)."""
    return nnx.eval_shape(lambda: RewardModel(cfg, rngs=nnx.Rngs(0), mesh=mesh))


# ----------------------------------------------------------------------------- config checks
def config_mismatches(
    checkpoint: ModelConfig, expected: ModelConfig, check: Literal["all", "vocab"] = "all"
) -> list[str]:
    """`"key: checkpoint X, expected Y"` for every differing key (`VOCAB_KEYS` with
    check="vocab"; every ModelConfig field but `RUNTIME_KEYS` with check="all")."""
    if check == "vocab":
        keys: Sequence[str] = VOCAB_KEYS
    elif check == "all":
        keys = [f.name for f in dataclasses.fields(ModelConfig) if f.name not in RUNTIME_KEYS]
    else:
        raise ValueError(f"check={check!r}: expected 'all' or 'vocab'")
    return [
        f"{k}: checkpoint {getattr(checkpoint, k)!r}, expected {getattr(expected, k)!r}"
        for k in keys
        if getattr(checkpoint, k) != getattr(expected, k)
    ]


def vocab_fingerprint(tokenizer) -> str:
    """sha256 of the tokenizer's id -> text table (every id decoded on its own): equal for two
    tokenizers that read and write token ids the same way."""
    h = hashlib.sha256()
    for i in range(tokenizer.vocab_size):
        h.update(tokenizer.decode([i]).encode("utf-8", "surrogatepass") + b"\x00")
    return h.hexdigest()


# ----------------------------------------------------------------------------- export / load
def export_reward_model(
    model: RewardModel,
    path,
    *,
    tokenizer=None,
    dtype: str | None = None,
    metadata: dict[str, Any] | None = None,
) -> Path:
    """Writes the directory of the module docstring; `metadata` is stored in reward_model.json
    under "extra" (e.g. the training run's eval accuracy)."""
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    save_hf_checkpoint(model.backbone, path / BACKBONE_DIR, dtype=dtype)
    head = np.asarray(jax.device_get(model.head_D[...]), np.float32)[None, :]
    save_file({HEAD_TENSOR: jnp.asarray(head)}, str(path / HEAD_FILE), metadata={"format": "pt"})
    meta = {
        "format": FORMAT,
        "version": VERSION,
        "kind": "bradley_terry",
        "pooling": "last_token",
        "backbone_dir": BACKBONE_DIR,
        "head_file": HEAD_FILE,
        "head_tensor": HEAD_TENSOR,
        "head_shape": list(head.shape),
        "hidden_size": model.cfg.hidden_size,
        "vocab_size": model.cfg.vocab_size,
        "tokenizer_fingerprint": None,
        "extra": dict(metadata or {}),
    }
    if tokenizer is not None:
        tokenizer.save(path / BACKBONE_DIR / "tokenizer.json")
        meta["tokenizer_fingerprint"] = vocab_fingerprint(tokenizer)
    (path / META_FILE).write_text(json.dumps(meta, indent=2) + "\n")
    return path


def read_metadata(path) -> dict[str, Any]:
    """reward_model.json of an exported reward model (CheckpointError naming the file if it is
    missing, not JSON, or not this format)."""
    file = Path(path) / META_FILE
    if not file.exists():
        raise CheckpointError(f"{file}: missing; {path} is not an exported reward model")
    try:
        meta = json.loads(file.read_text())
    except json.JSONDecodeError as e:
        raise CheckpointError(f"{file}:{e.lineno}: not valid JSON ({e.msg})") from None
    if not isinstance(meta, dict) or meta.get("format") != FORMAT:
        raise CheckpointError(f"{file}: format is not {FORMAT!r}")
    if meta.get("version") != VERSION:
        raise CheckpointError(f"{file}: version {meta.get('version')!r}, this code reads {VERSION}")
    return meta


def load_reward_model(
    path,
    *,
    expect_config: ModelConfig | None = None,
    expect_tokenizer=None,
    check: Literal["all", "vocab"] = "all",
    dtype=jnp.float32,
    mesh: Mesh | None = None,
    **config_overrides,
) -> RewardModel:
    """The `RewardModel` exported at `path`.

    `expect_config` (the policy's ModelConfig): refuse the checkpoint, with
    `RewardModelMismatchError` naming every differing key, if its vocabulary (`check="vocab"`)
    or its whole architecture (`check="all"`, runtime keys aside) differs. `expect_tokenizer`:
    refuse it if its saved tokenizer's fingerprint differs (a checkpoint exported without a
    tokenizer cannot be checked: refused too). `dtype`, `mesh` and `config_overrides` (e.g.
    `moe_backend`) are as in `load_hf_checkpoint`.
    """
    path = Path(path)
    meta = read_metadata(path)
    backbone_dir = path / meta["backbone_dir"]
    name = jnp.dtype(dtype).name
    cfg = ModelConfig.from_json_file(
        backbone_dir / "config.json", param_dtype=name, compute_dtype=name, **config_overrides
    )
    problems = [] if expect_config is None else config_mismatches(cfg, expect_config, check)
    if expect_tokenizer is not None:
        saved = meta.get("tokenizer_fingerprint")
        if saved is None:
            problems.append("tokenizer: the checkpoint was exported without a tokenizer")
        elif saved != vocab_fingerprint(expect_tokenizer):
            problems.append(
                f"tokenizer: the checkpoint's vocabulary differs from the policy's "
                f"({expect_tokenizer.vocab_size} ids)"
            )
    if problems:
        raise RewardModelMismatchError(
            f"reward model {path} does not match the policy:\n"
            + "\n".join(f"  {p}" for p in problems)
        )
    backbone = load_hf_checkpoint(backbone_dir, config=cfg, mesh=mesh)
    head_file = path / meta["head_file"]
    if not head_file.exists():
        raise CheckpointError(f"{head_file}: missing (the reward head)")
    with safe_open(str(head_file), framework="flax") as f:
        if meta["head_tensor"] not in f.keys():
            raise CheckpointError(f"{head_file}: no tensor {meta['head_tensor']!r}")
        head = np.asarray(f.get_tensor(meta["head_tensor"]), np.float32)
    if head.shape != (1, cfg.hidden_size):
        raise CheckpointError(
            f"{head_file}: {meta['head_tensor']} has shape {head.shape}, expected "
            f"(1, {cfg.hidden_size}) for hidden_size {cfg.hidden_size}"
        )
    model = RewardModel(cfg, rngs=nnx.Rngs(0), backbone=backbone)
    model.head_D.set_value(jnp.asarray(head[0], jnp.float32))
    return model
