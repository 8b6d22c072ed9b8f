"""Expert and context parallelism in the jobs: SFT runs on a data x expert mesh and on a data x
expert x context mesh (8 simulated devices) log the same losses as pure data parallelism, and
the run says how it ran (run_info.json)."""

import json
import os

import numpy as np
import pytest

from nemocascade import config_files
from nemocascade.launch import run_job
from nemocascade.train.metrics import read_metrics

CONFIG = os.path.join(os.path.dirname(__file__), "..", "..", "configs", "sft_tiny.py")


@pytest.mark.slow
def test_sft_on_a_data_x_expert_mesh_matches_data_parallel(tmp_path):
    losses, infos = {}, {}
    meshes = {
        "dp": dict(data=8, expert=1),
        "ep": dict(data=2, expert=4),
        # each row's positions in 2 slices: attention and Mamba-2 context parallel
        "cp": dict(data=2, expert=2, context=2),
    }
    for name, mesh in meshes.items():
        config = config_files.load_config(CONFIG + ":fast")
        with config.unlocked():
            config.train.steps = 12
            config.train.checkpoint_every = 12
            config.train.progress = False
            config.mesh.update(mesh)
            config.model.moe_backend = "sorted"
        work = str(tmp_path / name)
        run_job(config, work)
        losses[name] = [r["loss"] for r in read_metrics(work)]
        with open(os.path.join(work, "run_info.json")) as f:
            infos[name] = json.load(f)
    assert infos["dp"]["expert_parallel"] is False and infos["ep"]["expert_parallel"] is True
    assert infos["ep"]["mesh"] == {"data": 2, "fsdp": 1, "expert": 4, "context": 1, "tensor": 1}
    assert infos["cp"]["context_parallel"] is True and infos["ep"]["context_parallel"] is False
    assert infos["ep"]["device_count"] == 8 and infos["ep"]["jax"] and infos["ep"]["git_commit"]
    assert len(losses["ep"]) == 12
    np.testing.assert_allclose(losses["ep"], losses["dp"], rtol=1e-3)
    np.testing.assert_allclose(losses["cp"], losses["dp"], rtol=1e-3)
