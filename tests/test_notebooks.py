"""Executes the notebooks in `notebooks/` with nbclient at tiny size (in a kernel that runs this
interpreter), and checks they ran without errors and produced their key outputs."""

from __future__ import annotations

import math
import os
import re
from pathlib import Path

import nbformat
import pytest
from ipykernel.kernelspec import install as install_kernelspec
from nbclient import NotebookClient

ROOT = Path(__file__).resolve().parents[1]
KERNEL = "nemocascade-test"
# Parameter-cell overrides: smaller than the notebook's defaults, same code paths.
QUICKSTART_PARAMS = {"SFT_STEPS": 60, "PROMPTS": 4, "SAMPLES": 4, "MAX_NEW_TOKENS": 8}


def set_parameters(nb: nbformat.NotebookNode, values: dict[str, object]) -> None:
    """Rewrites `NAME = ...` lines of the cell tagged "parameters"; every name must be there."""
    cells = [c for c in nb.cells if "parameters" in c.metadata.get("tags", [])]
    if len(cells) != 1:
        raise ValueError(f"expected one cell tagged 'parameters', found {len(cells)}")
    src = cells[0].source
    for name, value in values.items():
        src, n = re.subn(rf"^{name} = .*$", f"{name} = {value!r}", src, flags=re.MULTILINE)
        if n != 1:
            raise KeyError(f"parameter {name!r} is not assigned once in the parameters cell")
    cells[0].source = src


def execute(
    path: Path, tmp_path: Path, params: dict[str, object], monkeypatch: pytest.MonkeyPatch
) -> nbformat.NotebookNode:
    """Runs the notebook with `params` in a fresh kernel of this interpreter (CPU JAX, headless
    matplotlib, the repository first on PYTHONPATH), its working directory `tmp_path`."""
    nb = nbformat.read(path, as_version=4)
    set_parameters(nb, params)
    prefix = tmp_path / "jupyter"
    install_kernelspec(kernel_name=KERNEL, prefix=str(prefix))
    env = dict(os.environ)
    env.pop("XLA_FLAGS", None)  # the notebook sees one CPU device, as a user would
    env.update(
        JAX_PLATFORMS="cpu",
        MPLBACKEND="module://matplotlib_inline.backend_inline",
        JUPYTER_PATH=os.pathsep.join(
            [str(prefix / "share" / "jupyter"), env.get("JUPYTER_PATH", "")]
        ).rstrip(os.pathsep),
        PYTHONPATH=os.pathsep.join([str(ROOT), env.get("PYTHONPATH", "")]).rstrip(os.pathsep),
    )
    monkeypatch.setenv("JUPYTER_PATH", env["JUPYTER_PATH"])  # where nbclient looks up KERNEL
    client = NotebookClient(
        nb, kernel_name=KERNEL, timeout=600, resources={"metadata": {"path": str(tmp_path)}}
    )
    client.execute(env=env)
    return nb


def _text(nb: nbformat.NotebookNode) -> str:
    out = []
    for cell in nb.cells:
        for o in cell.get("outputs", []):
            if o.output_type == "stream":
                out.append(o.text)
    return "".join(out)


def test_quickstart(tmp_path, monkeypatch):
    nb = execute(ROOT / "notebooks" / "quickstart.ipynb", tmp_path, QUICKSTART_PARAMS, monkeypatch)
    text = _text(nb)

    # the verifier accepts the reference answer and rejects a wrong one
    assert re.search(r"verifier\('\\\\boxed\{\d+\}'\) = 1\.0", text), text
    assert "verifier('\\\\boxed{0}') = 0.0" in text, text

    # SFT ran every step and the loss went down
    sft = [float(x) for x in re.findall(r"SFT step +\d+ +loss ([\d.]+)", text)]
    assert re.search(rf"SFT step +{QUICKSTART_PARAMS['SFT_STEPS']} ", text), text
    assert sft[-1] < sft[0], sft

    # one GRPO step whose metrics are all finite, on real response tokens
    lines = [ln for ln in text.splitlines() if ln.startswith("GRPO step 1:")]
    assert len(lines) == 1, text
    metrics = dict(re.findall(r"(\w+)=(\S+)", lines[0]))
    for key in ("loss", "grad_norm", "entropy", "tokens", "response_length", "skipped"):
        assert key in metrics, (key, lines[0])
    values = {k: float(v) for k, v in metrics.items()}
    assert all(math.isfinite(v) for v in values.values()), values
    assert values["tokens"] > 0 and values["response_length"] > 0 and values["skipped"] == 0
    assert re.search(r"reward after 1 GRPO step\(s\): [\d.]+", text), text

    # the plot was drawn
    images = [o for c in nb.cells for o in c.get("outputs", []) if "image/png" in o.get("data", {})]
    assert len(images) == 1


@pytest.mark.parametrize("path", sorted((ROOT / "notebooks").glob("*.ipynb")), ids=lambda p: p.name)
def test_notebook_is_committed_clean(path):
    """Committed without outputs, with one parameters cell, installing the package only in Colab."""
    nb = nbformat.read(path, as_version=4)
    nbformat.validate(nb)
    code = [c for c in nb.cells if c.cell_type == "code"]
    assert all(not c.outputs and c.execution_count is None for c in code), f"{path.name}: outputs"
    assert sum("parameters" in c.metadata.get("tags", []) for c in code) == 1
    assert '"google.colab" in sys.modules' in code[0].source and "REPO_URL" in code[0].source
