"""A Hugging Face config.json with a mistyped or impossible value names the file, the key and the
expected type (issue 15: `"hidden_size": "64"` used to end in a JAX TypeError)."""

import json
import re

import pytest

from nemocascade.model import ModelConfig
from nemocascade.typed_config import ConfigError

HF = ModelConfig.tiny().to_hf_config()


def _write(tmp_path, **changes):
    path = tmp_path / "config.json"
    path.write_text(json.dumps({**HF, **changes}, indent=2))
    return path


@pytest.mark.parametrize(
    "key,value,expected",
    [
        ("hidden_size", "64", "expected an integer, got '64'"),
        ("vocab_size", True, "expected an integer, got True"),  # a bool is not an int
        ("num_attention_heads", 4.0, "expected an integer, got 4.0"),
        ("mamba_num_heads", [8], "expected an integer, got [8]"),
        ("use_conv_bias", 1, "expected true or false, got 1"),
        ("tie_word_embeddings", "false", "expected true or false, got 'false'"),
        ("time_step_min", "0.001", "expected a number, got '0.001'"),
        ("routed_scaling_factor", "2.5", "expected a number, got '2.5'"),
        ("hybrid_override_pattern", 7, "expected a string, got 7"),
        ("eos_token_id", "2", "'2' is not a int | tuple[int, ...]"),
        ("eos_token_id", [2, "3"], "[2, '3'] is not a int | tuple[int, ...]"),
        ("norm_eps", "1e-5", "expected a number, got '1e-5'"),  # older spellings named as written
        ("mamba_n_groups", 1.5, "expected an integer, got 1.5"),
    ],
)
def test_mistyped_value_names_file_key_and_type(tmp_path, key, value, expected):
    hf = dict(HF)
    if key == "mamba_n_groups":
        del hf["n_groups"]
    if key == "norm_eps":
        del hf["layer_norm_epsilon"]
    path = tmp_path / "config.json"
    path.write_text(json.dumps({**hf, key: value}))
    with pytest.raises(ConfigError) as e:
        ModelConfig.from_json_file(path)
    assert str(e.value) == f"{path}: {key}: {expected}"


def test_the_hidden_size_string_of_the_issue(tmp_path):
    path = _write(tmp_path, hidden_size="64")
    with pytest.raises(ValueError, match=f"^{re.escape(str(path))}: hidden_size: expected an int"):
        ModelConfig.from_json_file(path)


@pytest.mark.parametrize(
    "changes,match",
    [
        ({"num_key_value_heads": 0}, "num_key_value_heads=0: must be >= 1"),
        ({"head_dim": -8, "chunk_size": 0}, "head_dim=-8, chunk_size=0: must be >= 1"),
        ({"layers_block_type": "mamba"}, "layers_block_type: expected a list of strings"),
        ({"layers_block_type": [["mamba"]]}, "layers_block_type: expected a list of strings"),
        ({"time_step_limit": "0,inf"}, r"time_step_limit: expected \[min, max\]"),
        ({"mlp_hidden_act": "gelu"}, "mlp_hidden_act='gelu': only 'relu2'"),
    ],
)
def test_impossible_values_name_the_file_and_key(tmp_path, changes, match):
    path = _write(tmp_path, **changes)
    with pytest.raises((ValueError, NotImplementedError), match=f"^{re.escape(str(path))}: "):
        ModelConfig.from_json_file(path)
    with pytest.raises((ValueError, NotImplementedError), match=match):
        ModelConfig.from_json_file(path)


def test_not_an_object_or_not_json(tmp_path):
    path = tmp_path / "config.json"
    path.write_text("[1, 2]")
    with pytest.raises(ConfigError, match="config.json: expected a JSON object, got list"):
        ModelConfig.from_json_file(path)
    path.write_text('{\n  "hidden_size": 64,\n  oops\n}')
    with pytest.raises(ValueError, match=f"^{re.escape(str(path))}:3:3: not valid JSON"):
        ModelConfig.from_json_file(path)
    path.write_bytes(b'{"hidden_size": "\xff"}')
    with pytest.raises(ValueError, match=f"^{re.escape(str(path))}: not UTF-8 text"):
        ModelConfig.from_json_file(path)


def test_well_typed_configs_still_read(tmp_path):
    assert ModelConfig.from_json_file(_write(tmp_path)) == ModelConfig.tiny()
    # ints for floats, lists for tuples, nulls for optional ids are what HF writes
    path = _write(tmp_path, time_step_min=0, eos_token_id=[2, 3], pad_token_id=None)
    cfg = ModelConfig.from_json_file(path)
    assert cfg.time_step_min == 0.0 and cfg.eos_token_id == (2, 3) and cfg.pad_token_id == 0


def test_from_mapping_names_the_section_key():
    good = {f: getattr(ModelConfig.tiny(), f) for f in ("vocab_size", "pattern")}
    base = dict(
        good,
        hidden_size=64,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=16,
        mamba_num_heads=8,
        mamba_head_dim=16,
        ssm_state_size=16,
        n_groups=1,
    )
    assert ModelConfig.from_mapping(base).hidden_size == 64
    with pytest.raises(ConfigError, match=r"^model.hidden_size: expected an integer, got '64'"):
        ModelConfig.from_mapping({**base, "hidden_size": "64"})
    with pytest.raises(ConfigError, match=r"^model.vocab_size: expected an integer, got True"):
        ModelConfig.from_mapping({**base, "vocab_size": True})
