"""The quick-start notebook: `notebooks/quickstart.ipynb` is generated from its jupytext twin
`notebooks/quickstart.py` (the source) and committed without outputs; executed end to end in a
fresh kernel (nbclient) with CI's small settings injected after its parameters cell, as papermill
does, it must finish without a cell error and show its tables and plots. Regenerate the notebook
after editing the source with `jupytext --to ipynb notebooks/quickstart.py`."""

import os
import pathlib

import pytest

nbformat = pytest.importorskip("nbformat")
nbclient = pytest.importorskip("nbclient")
jupytext = pytest.importorskip("jupytext")

NOTEBOOKS = pathlib.Path(__file__).resolve().parents[1] / "notebooks"
NOTEBOOK = NOTEBOOKS / "quickstart.ipynb"
SOURCE = NOTEBOOKS / "quickstart.py"
# CI's settings: fewer items, shots and candidates than the notebook's defaults.
CI_PARAMETERS = {
    "N_ITEMS": 4,
    "DISPATCH_ITEMS": 2,
    "CLASSIFY_MAX_NEW_TOKENS": 16,
    "SHOTS": 2,
    "POPULATION": 4,
    "GENERATIONS": 1,
}
CELL_TIMEOUT_S = 900


def cell_contents(notebook) -> list[tuple[str, str, list[str]]]:
    """(type, source, tags) of every cell."""
    return [(c.cell_type, c.source, c.metadata.get("tags", [])) for c in notebook.cells]


def parameters_index(notebook) -> int:
    """The index of the one cell tagged "parameters"."""
    tagged = [i for i, c in enumerate(notebook.cells) if "parameters" in c.metadata.get("tags", [])]
    assert len(tagged) == 1, f"expected one parameters cell, found {len(tagged)}"
    return tagged[0]


def test_notebook_matches_its_source_and_has_no_outputs():
    notebook = nbformat.read(NOTEBOOK, as_version=4)
    assert cell_contents(notebook) == cell_contents(jupytext.read(SOURCE)), (
        "notebooks/quickstart.ipynb is out of date: jupytext --to ipynb notebooks/quickstart.py"
    )
    code = [cell for cell in notebook.cells if cell.cell_type == "code"]
    assert all(not cell.outputs and cell.execution_count is None for cell in code)
    parameters = notebook.cells[parameters_index(notebook)].source
    for name in CI_PARAMETERS:
        assert f"\n{name} = " in f"\n{parameters}", f"{name} is not a notebook parameter"


def text_outputs(cell) -> str:
    """Everything a cell printed or returned as text."""
    parts = [output.get("text", "") for output in cell.outputs if output.output_type == "stream"]
    parts += [
        output.data.get("text/plain", "")
        for output in cell.outputs
        if output.output_type in ("execute_result", "display_data")
    ]
    return "".join(parts)


@pytest.mark.real_model
@pytest.mark.slow
def test_notebook_runs_end_to_end(tmp_path):
    notebook = nbformat.read(NOTEBOOK, as_version=4)
    overrides = "\n".join(f"{name} = {value!r}" for name, value in CI_PARAMETERS.items())
    notebook.cells.insert(parameters_index(notebook) + 1, nbformat.v4.new_code_cell(overrides))
    env = dict(os.environ)
    # One CPU device, as on a CPU runtime (conftest gives the tests 8 fake ones).
    env["XLA_FLAGS"] = env.get("XLA_FLAGS", "").replace(
        "--xla_force_host_platform_device_count=8", ""
    )
    env.setdefault("JAX_PLATFORMS", "cpu")
    client = nbclient.NotebookClient(
        notebook,
        timeout=CELL_TIMEOUT_S,
        kernel_name="python3",
        resources={"metadata": {"path": str(tmp_path)}},  # the kernel's working directory
    )
    client.execute(env=env)  # raises CellExecutionError at the first failing cell

    printed = "".join(text_outputs(cell) for cell in notebook.cells if cell.cell_type == "code")
    assert "runtime CPU: 1 x" in printed
    # Every comparison table: one row per item, then the accuracy of each column.
    assert printed.count("| accuracy |") == 3
    assert "| item | gold | base | expert | adapted | few-shot |" in printed
    images = [
        output
        for cell in notebook.cells
        if cell.cell_type == "code"
        for output in cell.outputs
        if "image/png" in output.get("data", {})
    ]
    assert len(images) == 3  # the expert's gains, the dispatch matrices, the run plots
