"""Bad checkpoints give errors that name every offending key, the file and the path;
pickles are refused."""

import json
import re
import shutil

import numpy as np
import pytest
from flax import nnx
from safetensors.numpy import load_file, save_file

from nemocascade.model import (
    CheckpointError,
    ModelConfig,
    NemotronH,
    load_hf_checkpoint,
    save_hf_checkpoint,
)


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    """The tiny model saved once as one file and as several shards with an index."""
    model = NemotronH(ModelConfig.tiny(), rngs=nnx.Rngs(0))
    root = tmp_path_factory.mktemp("saved")
    return save_hf_checkpoint(model, root / "one"), save_hf_checkpoint(
        model, root / "sharded", max_shard_bytes=64 << 10
    )


@pytest.fixture()
def good(saved, tmp_path):
    return shutil.copytree(saved[0], tmp_path / "ckpt")


@pytest.fixture()
def sharded(saved, tmp_path):
    return shutil.copytree(saved[1], tmp_path / "sharded")


def _edit(path, fn):
    tensors = load_file(str(path / "model.safetensors"))
    fn(tensors)
    save_file(tensors, str(path / "model.safetensors"))


def test_good_checkpoint_loads(good):
    model = load_hf_checkpoint(good)
    assert model.cfg == ModelConfig.tiny()


def test_missing_extra_and_misshaped_keys_all_named(good):
    def corrupt(t):
        del t["backbone.layers.0.mixer.A_log"]
        del t["backbone.layers.2.mixer.experts.3.up_proj.weight"]
        t["backbone.layers.9.mixer.surprise"] = np.zeros(3, np.float32)
        t["backbone.layers.1.mixer.q_proj.weight"] = np.zeros((5, 64), np.float32)

    _edit(good, corrupt)
    with pytest.raises(CheckpointError) as e:
        load_hf_checkpoint(good)
    msg = str(e.value)
    for key in (
        "missing: backbone.layers.0.mixer.A_log",
        "missing: backbone.layers.2.mixer.experts.3.up_proj.weight",
        "unexpected: backbone.layers.9.mixer.surprise",
        "wrong shape: backbone.layers.1.mixer.q_proj.weight",
    ):
        assert key in msg, msg


def test_pickle_checkpoints_refused(tmp_path):
    (tmp_path / "config.json").write_text(
        __import__("json").dumps(ModelConfig.tiny().to_hf_config())
    )
    (tmp_path / "pytorch_model.bin").write_bytes(b"not loaded")
    with pytest.raises(CheckpointError, match="pickle"):
        load_hf_checkpoint(tmp_path)


def test_missing_config_is_named(tmp_path):
    with pytest.raises(CheckpointError, match="config.json"):
        load_hf_checkpoint(tmp_path)


def test_missing_tensor_names_the_file_it_should_be_in(good):
    _edit(good, lambda t: t.pop("backbone.norm_f.weight"))
    with pytest.raises(CheckpointError) as e:
        load_hf_checkpoint(good)
    assert f"missing: backbone.norm_f.weight (not in {good / 'model.safetensors'})" in str(e.value)


def test_nonexistent_path_is_named(tmp_path):
    # before: "<tmp_path>/config.json: missing", the parent's file
    target = tmp_path / "no_such_run" / "hf"
    with pytest.raises(CheckpointError, match=f"^{re.escape(str(target))}: no such checkpoint"):
        load_hf_checkpoint(target)


def test_truncated_single_file_is_named(good):
    file = good / "model.safetensors"
    file.write_bytes(file.read_bytes()[:-100])
    with pytest.raises(CheckpointError, match=f"^{re.escape(str(file))}: not a readable"):
        load_hf_checkpoint(good)


def test_truncated_shard_is_named(sharded):
    index = json.loads((sharded / "model.safetensors.index.json").read_text())["weight_map"]
    shards = sorted(set(index.values()))
    assert len(shards) > 2
    file = sharded / shards[1]
    file.write_bytes(file.read_bytes()[: file.stat().st_size // 2])
    with pytest.raises(CheckpointError) as e:
        load_hf_checkpoint(sharded)
    msg = str(e.value)
    assert msg.startswith(f"{file}: not a readable safetensors file") and "truncated" in msg, msg


def test_tensor_missing_from_its_shard_names_tensor_and_shard(sharded):
    index = json.loads((sharded / "model.safetensors.index.json").read_text())["weight_map"]
    key = "backbone.layers.0.mixer.A_log"
    shard = sharded / index[key]
    tensors = load_file(str(shard))
    del tensors[key]
    save_file(tensors, str(shard), metadata={"format": "pt"})
    with pytest.raises(CheckpointError, match=rf"missing: {re.escape(key)} \(in {index[key]}\)"):
        load_hf_checkpoint(sharded)


def test_sharded_checkpoint_loads(sharded):
    assert load_hf_checkpoint(sharded).cfg == ModelConfig.tiny()


def test_mistyped_config_value_names_file_and_key(good):
    cfg = json.loads((good / "config.json").read_text())
    cfg["hidden_size"] = "64"
    (good / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ValueError) as e:
        load_hf_checkpoint(good)
    assert str(e.value) == f"{good / 'config.json'}: hidden_size: expected an integer, got '64'"
