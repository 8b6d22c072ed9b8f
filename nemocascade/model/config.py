"""`ModelConfig`: every field the NemotronH architecture needs, presets, and HF config.json I/O.

Block pattern letters (Hugging Face `hybrid_override_pattern`):
    M = Mamba-2 mixer, * = attention, E = MoE, - = dense MLP.
The newer `layers_block_type` spelling uses `linear_attention` / `full_attention` / `moe` / `mlp`
(older builds: `mamba` / `attention`); both are read, the pattern is written with both.
"""

from __future__ import annotations

import dataclasses
import json
import math
import typing
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from nemocascade.typed_config import ConfigError, convert, from_mapping

PATTERN_TO_BLOCK = {"M": "mamba", "*": "attention", "E": "moe", "-": "mlp"}
BLOCK_TO_PATTERN = {v: k for k, v in PATTERN_TO_BLOCK.items()}
# Hugging Face `layers_block_type` names (5.x) and the legacy ones, to our block names.
HF_BLOCK_NAMES = {
    "linear_attention": "mamba",
    "mamba": "mamba",
    "full_attention": "attention",
    "attention": "attention",
    "moe": "moe",
    "mlp": "mlp",
}
OUR_TO_HF_BLOCK = {
    "mamba": "linear_attention",
    "attention": "full_attention",
    "moe": "moe",
    "mlp": "mlp",
}

# config.json keys read by `from_hf_config` -> the ModelConfig field whose declared type each must
# have (legacy spellings included, so a mistyped value is named by the key the file holds).
_SAME_NAME = """vocab_size hidden_size num_attention_heads num_key_value_heads head_dim
    mamba_num_heads mamba_head_dim ssm_state_size n_groups conv_kernel chunk_size use_conv_bias
    time_step_min time_step_max time_step_floor n_routed_experts num_experts_per_tok
    moe_intermediate_size moe_shared_expert_intermediate_size n_shared_experts n_group topk_group
    norm_topk_prob routed_scaling_factor intermediate_size layer_norm_epsilon initializer_range
    rescale_prenorm_residual tie_word_embeddings bos_token_id eos_token_id pad_token_id
    max_position_embeddings""".split()
HF_KEY_FIELDS = {
    **{f: f for f in _SAME_NAME},
    "hybrid_override_pattern": "pattern",
    "norm_eps": "layer_norm_epsilon",
    "mamba_n_groups": "n_groups",
    "mamba_d_conv": "conv_kernel",
    "mamba_chunk_size": "chunk_size",
    "mamba_dt_min": "time_step_min",
    "mamba_dt_max": "time_step_max",
    "mamba_conv_bias": "use_conv_bias",
}
# sizes that must be >= 1 (0 would divide by zero or build empty layers)
POSITIVE_FIELDS = """vocab_size hidden_size num_attention_heads num_key_value_heads head_dim
    mamba_num_heads mamba_head_dim ssm_state_size n_groups conv_kernel chunk_size
    n_routed_experts num_experts_per_tok n_group topk_group""".split()

MOE_BACKENDS = ("dense", "ragged_dot", "pallas", "sorted")
ATTENTION_IMPLS = ("naive", "blockwise", "pallas")


@dataclasses.dataclass(frozen=True)
class ModelConfig:
    """Architecture of a NemotronH model (Nemotron-3-Nano family).

    Sizes follow Hugging Face `NemotronHConfig` names where one exists. `dt_limit` is the clamp
    applied to the Mamba time step after softplus: Hugging Face's PyTorch path floors it at
    `time_step_min` (`dt_limit=(time_step_min, inf)`), the released CUDA kernels and the NVIDIA
    remote code do not (`(0, inf)`). Use `dt_floor_like_hf=True` to match transformers on CPU.
    """

    vocab_size: int
    hidden_size: int
    pattern: str  # one letter per layer, see PATTERN_TO_BLOCK
    # attention
    num_attention_heads: int
    num_key_value_heads: int
    head_dim: int
    # mamba-2
    mamba_num_heads: int
    mamba_head_dim: int
    ssm_state_size: int
    n_groups: int
    conv_kernel: int = 4
    chunk_size: int = 128
    use_conv_bias: bool = True
    time_step_min: float = 0.001
    time_step_max: float = 0.1
    time_step_floor: float = 1e-4
    dt_floor_like_hf: bool = False
    # moe
    n_routed_experts: int = 8
    num_experts_per_tok: int = 2
    moe_intermediate_size: int = 64
    moe_shared_expert_intermediate_size: int = 64
    n_shared_experts: int = 1
    n_group: int = 1
    topk_group: int = 1
    norm_topk_prob: bool = True
    routed_scaling_factor: float = 1.0
    moe_backend: str = "dense"
    moe_capacity_factor: float | None = None  # None = dropless; used by expert parallel exchange
    moe_aux_loss_coef: float = (
        0.0  # sequence-level balance loss (Megatron default 1e-4 when enabled)
    )
    # dense mlp ('-' blocks)
    intermediate_size: int = 64
    # common
    layer_norm_epsilon: float = 1e-5
    initializer_range: float = 0.02
    rescale_prenorm_residual: bool = True
    tie_word_embeddings: bool = False
    bos_token_id: int = 1
    eos_token_id: int | tuple[int, ...] = 2
    pad_token_id: int = 0
    max_position_embeddings: int = 4096
    # numerics
    param_dtype: str = "float32"
    compute_dtype: str = "float32"
    remat: str = "none"  # none | block | matmuls (see nemocascade.model.nemotron_h)
    # layer stack: run the repeating block pattern as one `lax.scan` body (compile time)
    scan_layers: bool = False
    # attention kernel: naive ([T, T] scores), blockwise (online softmax in jnp, no [T, T]),
    # pallas (flash attention kernel, `pallas_kernels.flash_attention`)
    attention_impl: str = "naive"
    # tile sizes of blockwise / pallas attention (clamped to the sequence length)
    attention_block_q: int = 512
    attention_block_k: int = 512

    def __post_init__(self):
        small = [f"{f}={getattr(self, f)}" for f in POSITIVE_FIELDS if getattr(self, f) < 1]
        if small:
            raise ValueError(f"ModelConfig: {', '.join(small)}: must be >= 1")
        bad = sorted(set(self.pattern) - set(PATTERN_TO_BLOCK))
        if bad or not self.pattern:
            raise ValueError(
                f"ModelConfig.pattern {self.pattern!r}: unknown letters {bad}; use M, *, E, -"
            )
        if self.num_attention_heads % self.num_key_value_heads:
            raise ValueError("num_attention_heads must be a multiple of num_key_value_heads")
        if self.mamba_num_heads % self.n_groups:
            raise ValueError("mamba_num_heads must be a multiple of n_groups")
        if self.n_routed_experts % self.n_group:
            raise ValueError("n_routed_experts must be a multiple of n_group")
        if self.n_group > 1 and self.n_routed_experts // self.n_group < 2:
            raise ValueError(
                "group-limited routing scores groups by their top-2 experts: need >= 2 per group"
            )
        if not 1 <= self.topk_group <= self.n_group:
            raise ValueError("topk_group must be in [1, n_group]")
        if self.num_experts_per_tok > self.n_routed_experts:
            raise ValueError("num_experts_per_tok > n_routed_experts")
        if self.moe_backend not in MOE_BACKENDS:
            raise ValueError(f"moe_backend {self.moe_backend!r} not in {MOE_BACKENDS}")
        if self.remat not in ("none", "block", "matmuls"):
            raise ValueError(f"remat {self.remat!r} not in ('none', 'block', 'matmuls')")
        if self.attention_impl not in ATTENTION_IMPLS:
            raise ValueError(f"attention_impl {self.attention_impl!r} not in {ATTENTION_IMPLS}")
        if self.attention_block_q < 1 or self.attention_block_k < 1:
            raise ValueError(
                f"attention_block_q / attention_block_k must be >= 1, got "
                f"{self.attention_block_q} / {self.attention_block_k}"
            )

    # ------------------------------------------------------------------ derived
    @property
    def num_layers(self) -> int:
        return len(self.pattern)

    @property
    def block_types(self) -> tuple[str, ...]:
        return tuple(PATTERN_TO_BLOCK[c] for c in self.pattern)

    @property
    def mamba_inner(self) -> int:
        """d_inner = heads * head_dim (HF ignores `expand`)."""
        return self.mamba_num_heads * self.mamba_head_dim

    @property
    def conv_dim(self) -> int:
        return self.mamba_inner + 2 * self.n_groups * self.ssm_state_size

    @property
    def dt_limit(self) -> tuple[float, float]:
        return (self.time_step_min if self.dt_floor_like_hf else 0.0, math.inf)

    def replace(self, **kw) -> ModelConfig:
        return dataclasses.replace(self, **kw)

    @classmethod
    def from_mapping(cls, cfg: Mapping[str, Any], section: str = "model") -> ModelConfig:
        """From a config section holding ModelConfig fields (unknown or mistyped keys raise,
        naming `section.key`)."""
        return from_mapping(cls, cfg, section)

    # ------------------------------------------------------------------ presets
    @classmethod
    def tiny(cls, **kw) -> ModelConfig:
        """A few-thousand-parameter model with every block type, for tests."""
        base = dict(
            vocab_size=256,
            hidden_size=64,
            pattern="M*EM-E",
            num_attention_heads=4,
            num_key_value_heads=2,
            head_dim=16,
            mamba_num_heads=4,
            mamba_head_dim=16,
            ssm_state_size=16,
            n_groups=2,
            conv_kernel=4,
            chunk_size=8,
            n_routed_experts=8,
            num_experts_per_tok=2,
            moe_intermediate_size=32,
            moe_shared_expert_intermediate_size=48,
            n_group=2,
            topk_group=1,
            routed_scaling_factor=2.5,
            intermediate_size=96,
        )
        base.update(kw)
        return cls(**base)

    @classmethod
    def small(cls, **kw) -> ModelConfig:
        """The benchmark size (issue spec)."""
        base = dict(
            vocab_size=32768,
            hidden_size=512,
            pattern="MEMEM*EMEMEM*E",
            num_attention_heads=8,
            num_key_value_heads=2,
            head_dim=64,
            mamba_num_heads=16,
            mamba_head_dim=64,
            ssm_state_size=64,
            n_groups=2,
            conv_kernel=4,
            chunk_size=64,
            n_routed_experts=32,
            num_experts_per_tok=4,
            moe_intermediate_size=256,
            moe_shared_expert_intermediate_size=512,
            routed_scaling_factor=2.5,
            intermediate_size=512,
        )
        base.update(kw)
        return cls(**base)

    @classmethod
    def nano_30b_a3b(cls, **kw) -> ModelConfig:
        """NVIDIA-Nemotron-3-Nano-30B-A3B (and Nemotron-Cascade-2-30B-A3B)."""
        base = dict(
            vocab_size=131072,
            hidden_size=2688,
            pattern="MEMEM*EMEMEM*EMEMEM*EMEMEM*EMEMEM*EMEMEMEM*EMEMEMEME",
            num_attention_heads=32,
            num_key_value_heads=2,
            head_dim=128,
            mamba_num_heads=64,
            mamba_head_dim=64,
            ssm_state_size=128,
            n_groups=8,
            conv_kernel=4,
            chunk_size=128,
            n_routed_experts=128,
            num_experts_per_tok=6,
            moe_intermediate_size=1856,
            moe_shared_expert_intermediate_size=3712,
            n_group=1,
            topk_group=1,
            routed_scaling_factor=2.5,
            intermediate_size=1856,
            max_position_embeddings=262144,
            param_dtype="bfloat16",
            compute_dtype="bfloat16",
        )
        base.update(kw)
        return cls(**base)

    @classmethod
    def preset(cls, name: str, **kw) -> ModelConfig:
        presets = {"tiny": cls.tiny, "small": cls.small, "nano_30b_a3b": cls.nano_30b_a3b}
        if name not in presets:
            raise ValueError(f"unknown model preset {name!r}; choose one of {sorted(presets)}")
        return presets[name](**kw)

    # ------------------------------------------------------------------ HF config.json
    @classmethod
    def from_hf_config(
        cls, hf: dict[str, Any], *, source: str = "config.json", **overrides
    ) -> ModelConfig:
        """Reads a Hugging Face NemotronH `config.json` dict (old and new spellings). A value of
        the wrong type is a `ConfigError` naming `source` (the file), the key and the expected
        type ("64" is not an integer, nor is true)."""
        if not isinstance(hf, Mapping):
            raise ConfigError(f"{source}: expected a JSON object, got {type(hf).__name__}")
        hf = dict(hf)
        hints = typing.get_type_hints(cls)
        for key, field in HF_KEY_FIELDS.items():
            if hf.get(key) is not None:
                hf[key] = convert(hf[key], hints[field], f"{source}: {key}")
        names = hf.get("layers_block_type") or hf.get("layer_types")
        if names and (
            not isinstance(names, list | tuple) or not all(isinstance(n, str) for n in names)
        ):
            raise ConfigError(f"{source}: layers_block_type: expected a list of strings")
        limit = hf.get("time_step_limit")
        if limit is not None and (
            not isinstance(limit, list | tuple)
            or not limit
            or (limit[0] is not None and not isinstance(limit[0], int | float))
        ):
            raise ConfigError(f"{source}: time_step_limit: expected [min, max], got {limit!r}")
        legacy = {
            "mamba_n_groups": "n_groups",
            "mamba_d_conv": "conv_kernel",
            "mamba_chunk_size": "chunk_size",
            "mamba_dt_min": "time_step_min",
            "mamba_dt_max": "time_step_max",
            "mamba_conv_bias": "use_conv_bias",
        }
        for old, new in legacy.items():
            if old in hf and new not in hf:
                hf[new] = hf[old]
        if hf.get("layers_block_type") or hf.get("layer_types"):
            names = hf.get("layers_block_type") or hf.get("layer_types")
            unknown = sorted({n for n in names if n not in HF_BLOCK_NAMES})
            if unknown:
                raise ValueError(f"{source}: layers_block_type: unknown block names {unknown}")
            pattern = "".join(BLOCK_TO_PATTERN[HF_BLOCK_NAMES[n]] for n in names)
        elif "hybrid_override_pattern" in hf:
            pattern = hf["hybrid_override_pattern"]
        else:
            raise ValueError(
                f"{source} has neither 'hybrid_override_pattern' nor 'layers_block_type'"
            )
        if hf.get("moe_latent_size") is not None:
            raise NotImplementedError(
                f"{source}: moe_latent_size (LatentMoE, Nemotron 3 Super/Ultra) is not supported"
            )
        if hf.get("mamba_num_heads") is None or hf.get("mamba_head_dim") is None:
            raise ValueError(f"{source} needs 'mamba_num_heads' and 'mamba_head_dim'")
        required = [
            "vocab_size",
            "hidden_size",
            "num_attention_heads",
            "num_key_value_heads",
            "ssm_state_size",
            "n_groups",
        ]
        missing = [k for k in required if k not in hf]
        if missing:
            raise ValueError(f"{source} is missing keys {missing}")
        eos = hf.get("eos_token_id", 2)
        kw = dict(
            vocab_size=hf["vocab_size"],
            hidden_size=hf["hidden_size"],
            pattern=pattern,
            num_attention_heads=hf["num_attention_heads"],
            num_key_value_heads=hf["num_key_value_heads"],
            head_dim=hf.get("head_dim") or hf["hidden_size"] // hf["num_attention_heads"],
            mamba_num_heads=hf["mamba_num_heads"],
            mamba_head_dim=hf["mamba_head_dim"],
            ssm_state_size=hf["ssm_state_size"],
            n_groups=hf["n_groups"],
            conv_kernel=hf.get("conv_kernel", 4),
            chunk_size=hf.get("chunk_size", 128),
            use_conv_bias=hf.get("use_conv_bias", True),
            time_step_min=hf.get("time_step_min", 0.001),
            time_step_max=hf.get("time_step_max", 0.1),
            time_step_floor=hf.get("time_step_floor", 1e-4),
            dt_floor_like_hf=bool(limit and limit[0] and limit[0] > 0),
            n_routed_experts=hf.get("n_routed_experts", 8),
            num_experts_per_tok=hf.get("num_experts_per_tok", 2),
            moe_intermediate_size=hf.get("moe_intermediate_size", hf.get("intermediate_size", 64)),
            moe_shared_expert_intermediate_size=hf.get("moe_shared_expert_intermediate_size", 64),
            n_shared_experts=hf.get("n_shared_experts", 1),
            n_group=hf.get("n_group", 1),
            topk_group=hf.get("topk_group", 1),
            norm_topk_prob=hf.get("norm_topk_prob", True),
            routed_scaling_factor=float(hf.get("routed_scaling_factor", 1.0)),
            intermediate_size=hf.get("intermediate_size", 64),
            layer_norm_epsilon=hf.get("layer_norm_epsilon", hf.get("norm_eps", 1e-5)),
            initializer_range=hf.get("initializer_range", 0.02),
            rescale_prenorm_residual=hf.get("rescale_prenorm_residual", True),
            tie_word_embeddings=hf.get("tie_word_embeddings", False),
            bos_token_id=hf.get("bos_token_id", 1) if hf.get("bos_token_id") is not None else 1,
            eos_token_id=tuple(eos) if isinstance(eos, list) else (eos if eos is not None else 2),
            pad_token_id=hf.get("pad_token_id", 0) if hf.get("pad_token_id") is not None else 0,
            max_position_embeddings=hf.get("max_position_embeddings", 4096),
        )
        for flag, want in (("mamba_hidden_act", "silu"), ("mlp_hidden_act", "relu2")):
            if hf.get(flag, want) != want:
                raise NotImplementedError(
                    f"{source}: {flag}={hf[flag]!r}: only {want!r} is supported"
                )
        for flag in ("attention_bias", "mlp_bias", "use_bias", "mamba_proj_bias"):
            if hf.get(flag):
                raise NotImplementedError(f"{source}: {flag}=true is not supported")
        kw.update(overrides)
        try:
            return cls(**kw)
        except ValueError as e:  # __post_init__ checks: name the file
            raise ValueError(f"{source}: {e}") from None

    def to_hf_config(self) -> dict[str, Any]:
        """A Hugging Face `config.json` dict that `NemotronHConfig` reads."""
        eos = list(self.eos_token_id) if isinstance(self.eos_token_id, tuple) else self.eos_token_id
        return {
            "architectures": ["NemotronHForCausalLM"],
            "model_type": "nemotron_h",
            "vocab_size": self.vocab_size,
            "hidden_size": self.hidden_size,
            "hybrid_override_pattern": self.pattern,
            "layers_block_type": [OUR_TO_HF_BLOCK[b] for b in self.block_types],
            "num_hidden_layers": self.num_layers,
            "num_attention_heads": self.num_attention_heads,
            "num_key_value_heads": self.num_key_value_heads,
            "head_dim": self.head_dim,
            "attention_bias": False,
            "attention_dropout": 0.0,
            "mamba_num_heads": self.mamba_num_heads,
            "mamba_head_dim": self.mamba_head_dim,
            "ssm_state_size": self.ssm_state_size,
            "n_groups": self.n_groups,
            "conv_kernel": self.conv_kernel,
            "chunk_size": self.chunk_size,
            "use_conv_bias": self.use_conv_bias,
            "mamba_hidden_act": "silu",
            "mamba_proj_bias": False,
            "use_bias": False,
            "expand": 2,
            "time_step_min": self.time_step_min,
            "time_step_max": self.time_step_max,
            "time_step_floor": self.time_step_floor,
            "time_step_limit": [self.dt_limit[0], float("inf")],
            "mamba_ssm_cache_dtype": "float32",
            "n_routed_experts": self.n_routed_experts,
            "num_experts_per_tok": self.num_experts_per_tok,
            "moe_intermediate_size": self.moe_intermediate_size,
            "moe_shared_expert_intermediate_size": self.moe_shared_expert_intermediate_size,
            "n_shared_experts": self.n_shared_experts,
            "n_group": self.n_group,
            "topk_group": self.topk_group,
            "norm_topk_prob": self.norm_topk_prob,
            "routed_scaling_factor": self.routed_scaling_factor,
            "intermediate_size": self.intermediate_size,
            "mlp_hidden_act": "relu2",
            "mlp_bias": False,
            "layer_norm_epsilon": self.layer_norm_epsilon,
            "initializer_range": self.initializer_range,
            "rescale_prenorm_residual": self.rescale_prenorm_residual,
            "residual_in_fp32": False,
            "tie_word_embeddings": self.tie_word_embeddings,
            "bos_token_id": self.bos_token_id,
            "eos_token_id": eos,
            "pad_token_id": self.pad_token_id,
            "max_position_embeddings": self.max_position_embeddings,
            "torch_dtype": self.param_dtype,
            "use_cache": True,
        }

    @classmethod
    def from_json_file(cls, path: str | Path, **overrides) -> ModelConfig:
        path = Path(path)
        try:
            hf = json.loads(path.read_text(encoding="utf-8"))
        except json.JSONDecodeError as e:
            raise ValueError(f"{path}:{e.lineno}:{e.colno}: not valid JSON ({e.msg})") from e
        except UnicodeDecodeError as e:
            raise ValueError(f"{path}: not UTF-8 text (byte {e.start})") from None
        return cls.from_hf_config(hf, source=str(path), **overrides)
