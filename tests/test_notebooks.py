"""The analysis notebooks run top to bottom against a real Jupyter kernel."""

from __future__ import annotations

from pathlib import Path

import nbformat
import pytest
from nbclient import NotebookClient

from stabilitylab.train.loop import run_training

NOTEBOOKS = Path(__file__).resolve().parent.parent / "notebooks"


@pytest.fixture(scope="module")
def arm_runs(tmp_path_factory):
    from conftest import TINY_RUN

    from stabilitylab.config import build_config

    root = tmp_path_factory.mktemp("arms")
    paths = []
    for arm, freeze in (("learned", False), ("frozen", True)):
        config = build_config("digits", **{**TINY_RUN, "freeze_patch_embed": freeze})
        paths.append(run_training(config, root / arm, show_progress=False).run_dir)
    return paths


def _with_parameters(notebook, **values):
    cell = next(c for c in notebook.cells if "parameters" in c.metadata.get("tags", []))
    cell.source = "\n".join(f"{name} = {value!r}" for name, value in values.items())
    return notebook


def test_notebooks_stored_without_outputs():
    for path in NOTEBOOKS.glob("*.ipynb"):
        notebook = nbformat.read(path, as_version=4)
        for cell in notebook.cells:
            if cell.cell_type == "code":
                assert not cell.outputs, path.name
                assert cell.execution_count is None, path.name


def test_compare_arms_notebook_runs(arm_runs):
    notebook = nbformat.read(NOTEBOOKS / "compare_arms.ipynb", as_version=4)
    _with_parameters(notebook, RUN_DIRS=[str(p) for p in arm_runs])
    client = NotebookClient(
        notebook,
        timeout=300,
        kernel_name="python3",
        resources={"metadata": {"path": str(NOTEBOOKS)}},
    )
    client.execute()  # raises CellExecutionError on the first failing cell
    outputs = [o for c in notebook.cells if c.cell_type == "code" for o in c.outputs]
    images = [o for o in outputs if "image/png" in o.get("data", {})]
    assert len(images) >= 2
    text = "".join(str(o.get("data", {}).get("text/plain", "")) for o in outputs)
    assert "frozen" in text
    assert "learned" in text
