"""Parameter counts of a NemotronH model, from `jax.eval_shape` (nothing is allocated).

    python -m nemocascade.tools.params --model=nano_30b_a3b
    python -m nemocascade.tools.params --model=path/to/config.json

Prints JSON: `total_params`, `active_params` (per-token parameters including `lm_head`, excluding
the input embedding), `active_params_with_embeddings`, and a per-layer-type breakdown.
Router correction biases and norms count as parameters (as in the checkpoint).
"""

from __future__ import annotations

import json
import math
import sys
from collections import defaultdict
from pathlib import Path

from absl import app, flags
from flax import nnx

from nemocascade.model.config import ModelConfig
from nemocascade.model.nemotron_h import NemotronH


def resolve_model_config(spec: str) -> ModelConfig:
    """A preset name (tiny, small, nano_30b_a3b) or a path to a Hugging Face config.json."""
    if spec.endswith(".json") or Path(spec).is_file():
        return ModelConfig.from_json_file(spec)
    return ModelConfig.preset(spec)


def abstract_model(cfg: ModelConfig) -> NemotronH:
    return nnx.eval_shape(lambda: NemotronH(cfg, rngs=nnx.Rngs(0)))


def count_params(cfg: ModelConfig) -> dict:
    """Total and active parameter counts with a per-block-type breakdown."""
    model = abstract_model(cfg)
    per_layer = defaultdict(lambda: {"layers": 0, "params_per_layer": 0, "active_per_layer": 0})
    total = active = 0
    k, e = cfg.num_experts_per_tok, cfg.n_routed_experts
    for path, var in nnx.to_flat_state(nnx.state(model)):
        if not isinstance(var, nnx.Param) and type(var).__name__ != "ExpertBias":
            continue  # statistics (expert load) are not parameters
        n = math.prod(var.get_value().shape)
        is_expert = path[-1] in ("up_EDF", "down_EFD")
        act = n * k // e if is_expert else n
        total += n
        if path[0] == "embed_VD":
            continue
        active += act
        if path[0] == "layers":
            kind = cfg.block_types[path[1]]
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


FLAGS = flags.FLAGS
flags.DEFINE_string("model", "nano_30b_a3b", "preset name or path to a HF config.json")


def main(argv):
    del argv
    report = count_params(resolve_model_config(FLAGS.model))
    json.dump(report, sys.stdout, indent=2)
    sys.stdout.write("\n")


if __name__ == "__main__":
    app.run(main)
