"""Bad checkpoints give errors that name every offending key; pickles are refused."""

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


@pytest.fixture()
def good(tmp_path):
    model = NemotronH(ModelConfig.tiny(), rngs=nnx.Rngs(0))
    return save_hf_checkpoint(model, tmp_path / "ckpt")


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
