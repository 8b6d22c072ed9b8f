"""Every config file in configs/ loads, names a registered job and has valid sweeps; the SFT
configs build their train state abstractly (the full-size one on its simulated 64-device mesh)."""

import glob
import inspect
import os

import jax
import pytest
from ml_collections import ConfigDict

from nemocascade import config_files as configs_lib
from nemocascade.jobs import get_job
from nemocascade.sharding import MESH_AXES, MeshConfig
from nemocascade.train.state import bytes_per_device, param_count

ROOT = os.path.abspath(os.path.join(os.path.dirname(__file__), ".."))
CONFIG_FILES = sorted(glob.glob(os.path.join(ROOT, "configs", "*.py")))
GiB = 2**30


def _get_config(module):
    required = [
        p
        for p in inspect.signature(module.get_config).parameters.values()
        if p.default is inspect.Parameter.empty
    ]
    return module.get_config("") if required else module.get_config()


def test_there_are_configs():
    names = {os.path.basename(p) for p in CONFIG_FILES}
    assert {"sft_tiny.py", "nano_30b_a3b_sft.py"} <= names


@pytest.mark.parametrize("path", CONFIG_FILES, ids=os.path.basename)
def test_config_loads(path):
    module = configs_lib.load_module(path)
    config = _get_config(module)
    assert isinstance(config, ConfigDict)
    assert callable(get_job(config.job))
    assert config.to_json_best_effort()
    if hasattr(module, "get_sweep"):
        variants = module.get_sweep()
        configs_lib.variant_names(variants)  # distinct names
        for v in variants:
            configs_lib.apply_overrides(config, v)  # every swept key is declared


def test_sft_tiny_builds():
    from nemocascade.jobs.sft import abstract_train_state

    config = configs_lib.load_config(os.path.join(ROOT, "configs", "sft_tiny.py"))
    state = abstract_train_state(config)
    assert 10_000 < param_count(state.params) < 10_000_000


def test_nano_sft_sharded_state_fits(capsys):
    from nemocascade.jobs.sft import abstract_train_state

    module = configs_lib.load_module(os.path.join(ROOT, "configs", "nano_30b_a3b_sft.py"))
    config = module.get_config()
    assert (config.optim.lr, config.optim.min_lr, config.optim.warmup_steps) == (5e-5, 5e-6, 200)
    assert (config.optim.b1, config.optim.b2, config.optim.weight_decay) == (0.9, 0.98, 0.1)
    assert (config.data.seq_len, config.data.global_batch) == (262144, 64)
    state = abstract_train_state(config)  # jax.eval_shape: nothing is allocated
    n_params = param_count(state.params)
    assert 31e9 < n_params < 32e9  # Nemotron-3-Nano-30B-A3B has 31.6B parameters
    mesh = jax.sharding.AbstractMesh(MeshConfig(**config.mesh).shape(module.NUM_DEVICES), MESH_AXES)
    total = sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(state))
    per_device = bytes_per_device(state, mesh)
    params_per_device = bytes_per_device(state.params, mesh)
    with capsys.disabled():
        print(
            f"\nnano_30b_a3b_sft: {n_params / 1e9:.2f}B params; train state {total / GiB:.1f} GiB"
            f" total, {per_device / GiB:.2f} GiB per device on {module.NUM_DEVICES} devices "
            f"({params_per_device / GiB:.2f} GiB params)"
        )
    assert (
        total / module.NUM_DEVICES <= per_device < 16 * GiB
    )  # sharded, leaves room for activations
