"""The analysis notebooks run top to bottom against a real Jupyter kernel."""

from __future__ import annotations

import ast
from pathlib import Path

import nbformat
import pytest
from nbclient import NotebookClient
from test_api import (
    STABLE_LR,
    SWEEP_BATCH_SIZE,
    train_tiny_sweep,
    write_synthetic_run,
)

from stabilitylab.importers import import_run
from stabilitylab.sweep import run_name

NOTEBOOKS = Path(__file__).resolve().parent.parent / "notebooks"
NOTEBOOK_NAMES = ("inspect_run.ipynb", "compare_arms.ipynb", "analyse_sweep.ipynb")
# Besides the public API, the notebooks import only these.
ALLOWED_IMPORTS = {"matplotlib.pyplot", "numpy", "pandas", "seaborn", "stabilitylab"}


@pytest.fixture(scope="module")
def sweep_dir(tmp_path_factory) -> Path:
    """The tiny 2 lr x 2 arm sweep of test_api, trained once per session."""
    return train_tiny_sweep(tmp_path_factory.getbasetemp())


def read_notebook(name: str) -> nbformat.NotebookNode:
    return nbformat.read(NOTEBOOKS / name, as_version=4)


def parameters_cell(notebook: nbformat.NotebookNode) -> nbformat.NotebookNode:
    return next(c for c in notebook.cells if "parameters" in c.metadata.get("tags", []))


def execute(name: str, **values) -> list[dict]:
    """Run a notebook with its parameters replaced by ``values``; return the code outputs.

    Any failing cell raises CellExecutionError, which fails the test.
    """
    notebook = read_notebook(name)
    parameters_cell(notebook).source = "\n".join(
        f"{key} = {value!r}" for key, value in values.items()
    )
    client = NotebookClient(
        notebook,
        timeout=300,
        kernel_name="python3",
        resources={"metadata": {"path": str(NOTEBOOKS)}},
    )
    client.execute()
    return [
        output for cell in notebook.cells if cell.cell_type == "code" for output in cell.outputs
    ]


def images(outputs: list[dict]) -> list[dict]:
    return [output for output in outputs if "image/png" in output.get("data", {})]


def text_of(outputs: list[dict]) -> str:
    parts = [str(output.get("data", {}).get("text/plain", "")) for output in outputs]
    parts += [str(output.get("text", "")) for output in outputs]
    return "".join(parts)


def imported_modules(source: str) -> set[str]:
    modules = set()
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            modules.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            modules.add(node.module or "")
    return modules


def test_notebooks_stored_without_outputs():
    for path in NOTEBOOKS.glob("*.ipynb"):
        notebook = nbformat.read(path, as_version=4)
        for cell in notebook.cells:
            if cell.cell_type == "code":
                assert not cell.outputs, path.name
                assert cell.execution_count is None, path.name


@pytest.mark.parametrize("name", NOTEBOOK_NAMES)
def test_notebook_imports_public_api_only(name):
    notebook = read_notebook(name)
    code = "\n".join(cell.source for cell in notebook.cells if cell.cell_type == "code")
    assert imported_modules(code) <= ALLOWED_IMPORTS


@pytest.mark.parametrize("name", NOTEBOOK_NAMES)
def test_notebook_parameters_cell(name):
    cell = parameters_cell(read_notebook(name))
    assigned = [node.targets[0].id for node in ast.parse(cell.source).body]
    assert assigned
    assert all(target.isupper() for target in assigned)


def test_inspect_run_notebook_runs(tmp_path):
    run_dir = write_synthetic_run(tmp_path / "learned")
    outputs = execute("inspect_run.ipynb", RUN_DIR=str(run_dir), DETECTORS=None)
    assert len(images(outputs)) == 3
    text = text_of(outputs)
    assert "recovered dips" in text
    assert "gradient_fault" in text
    assert "grad_norm[blocks.01]" in text


def test_inspect_run_notebook_trained_run(sweep_dir):
    run_dir = sweep_dir / run_name(STABLE_LR, SWEEP_BATCH_SIZE, "frozen", 0)
    outputs = execute("inspect_run.ipynb", RUN_DIR=str(run_dir), DETECTORS=None)
    assert len(images(outputs)) == 3
    assert "token_grad_norm" in text_of(outputs)


def test_inspect_run_notebook_without_layers(tmp_path):
    rows = [
        f"{step},{2.0 - 0.01 * step},{10.0 + step if step % 10 == 9 else ''}" for step in range(60)
    ]
    (tmp_path / "metrics.csv").write_text("step,loss,knn_top1\n" + "\n".join(rows) + "\n")
    run_dir = import_run(tmp_path / "metrics.csv", tmp_path / "imported").run_dir
    outputs = execute("inspect_run.ipynb", RUN_DIR=str(run_dir), DETECTORS=None)
    text = text_of(outputs)
    assert "has no per-layer gradient norms" in text
    assert "no transformer blocks (blocks.NN)" in text
    assert "has no first-layer signal" in text
    assert len(images(outputs)) == 2


def test_compare_arms_notebook_runs(sweep_dir):
    run_dirs = [
        str(sweep_dir / run_name(STABLE_LR, SWEEP_BATCH_SIZE, arm, 0))
        for arm in ("learned", "frozen")
    ]
    outputs = execute("compare_arms.ipynb", RUN_DIRS=run_dirs)
    assert len(images(outputs)) >= 2
    text = text_of(outputs)
    assert "frozen" in text
    assert "learned" in text
    assert "final_top1_diff" in text


def test_analyse_sweep_notebook_runs(sweep_dir):
    outputs = execute("analyse_sweep.ipynb", SWEEP_DIR=str(sweep_dir))
    assert len(images(outputs)) == 3
    text = text_of(outputs)
    assert "diverged" in text
    assert "lr_sensitivity" in text
