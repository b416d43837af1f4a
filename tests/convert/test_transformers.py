"""Hugging Face transformers as the oracle: same random weights, same logits."""

import json
import os

import numpy as np
import pytest

import keras_gemma
from helpers import TINY, save_transformers_gemma, to_numpy, transformers_logits

# Right-padded batch: the second row has three real tokens.
TOKEN_IDS = np.array([[2, 17, 42, 9, 100, 5, 61], [2, 30, 31, 0, 0, 0, 0]])
PADDING_MASK = np.array([[1] * 7, [1, 1, 1, 0, 0, 0, 0]])

CONFIGS = {
    # head_dim (16) != hidden_dim / num_query_heads (8) in all three.
    "multi_query": {**TINY, "num_key_value_heads": 1},
    "grouped_query": {**TINY, "num_key_value_heads": 2},
    "multi_head": {**TINY, "num_key_value_heads": 4},
    # Wider than hidden, as Gemma 7B (16 x 256 > 3072).
    "multi_head_wide": {**TINY, "num_query_heads": 8, "num_key_value_heads": 8, "head_dim": 8, "hidden_dim": 48},
}


@pytest.mark.parametrize("name", list(CONFIGS))
def test_logits_equal_transformers(tmp_path, name, spm_proto):
    config = CONFIGS[name]
    reference = save_transformers_gemma(tmp_path, config, seed=len(name), spm_proto=spm_proto)
    expected = transformers_logits(reference, TOKEN_IDS, PADDING_MASK)
    lm = keras_gemma.GemmaCausalLM.from_preset(str(tmp_path))
    assert lm.preprocessor is not None
    logits = to_numpy(lm({"token_ids": TOKEN_IDS, "padding_mask": PADDING_MASK}))
    valid = PADDING_MASK.astype(bool)
    assert np.abs(expected[valid]).max() > 1.0  # the comparison is not trivial
    np.testing.assert_allclose(logits[valid], expected[valid], atol=1e-4, rtol=0)
    for key, value in config.items():
        assert getattr(lm.backbone, key) == value


def test_released_gemma1_config_generation(tmp_path):
    """Gemma 1 configs carry `hidden_act: "gelu"` and `rope_theta`; both load."""
    save_transformers_gemma(tmp_path, TINY, seed=4)
    path = tmp_path / "config.json"
    config = json.loads(path.read_text())
    config.pop("rope_parameters", None)
    config.pop("hidden_activation", None)
    config.update({"hidden_act": "gelu", "rope_theta": 500.0})
    path.write_text(json.dumps(config))
    backbone = keras_gemma.GemmaBackbone.from_preset(str(tmp_path))
    assert backbone.rope_max_wavelength == 500.0


def test_sharded_checkpoint_and_bfloat16(tmp_path):
    import torch
    from transformers import GemmaForCausalLM

    model = save_transformers_gemma(tmp_path / "full", TINY, seed=5)
    model.to(torch.bfloat16).save_pretrained(tmp_path / "sharded", max_shard_size="20KB")
    assert os.path.exists(tmp_path / "sharded" / "model.safetensors.index.json")
    backbone = keras_gemma.GemmaBackbone.from_preset(str(tmp_path / "sharded"))
    lm = keras_gemma.GemmaCausalLM(backbone)
    reference = GemmaForCausalLM.from_pretrained(tmp_path / "sharded", dtype=torch.float32)
    expected = transformers_logits(reference, TOKEN_IDS, PADDING_MASK)
    valid = PADDING_MASK.astype(bool)
    got = to_numpy(lm({"token_ids": TOKEN_IDS, "padding_mask": PADDING_MASK}))
    # Same bfloat16-rounded weights on both sides, computed in float32.
    np.testing.assert_allclose(got[valid], expected[valid], atol=1e-4, rtol=0)


def test_safetensors_reader_matches_the_safetensors_package(tmp_path):
    import torch
    from safetensors.torch import load_file, save_file

    from keras_gemma.convert.safetensors import SafetensorsFile

    tensors = {
        "a": torch.randn(3, 4, dtype=torch.bfloat16),
        "b": torch.randn(5, dtype=torch.float16),
        "c": torch.arange(6, dtype=torch.int32).reshape(2, 3),
        "d": torch.randn(2, 2),
    }
    save_file(tensors, tmp_path / "x.safetensors")
    ours = SafetensorsFile(tmp_path / "x.safetensors")
    for name, value in load_file(tmp_path / "x.safetensors").items():
        np.testing.assert_array_equal(np.asarray(ours.get(name), np.float32), value.float().numpy())
        assert ours.shapes[name] == tuple(value.shape)


# === Bad checkpoints: a clear error naming the file and the tensor ===


@pytest.fixture
def checkpoint(tmp_path, spm_proto):
    save_transformers_gemma(tmp_path, TINY, seed=6, spm_proto=spm_proto)
    return tmp_path


def rewrite_weights(path, edit):
    from safetensors.numpy import load_file, save_file

    weights = load_file(path / "model.safetensors")
    edit(weights)
    save_file(weights, path / "model.safetensors", metadata={"format": "pt"})


def test_missing_tensor(checkpoint):
    rewrite_weights(checkpoint, lambda w: w.pop("model.layers.1.mlp.up_proj.weight"))
    with pytest.raises(ValueError, match=r"model\.safetensors.*lacks 1 tensor.*model\.layers\.1\.mlp\.up_proj\.weight"):
        keras_gemma.GemmaCausalLM.from_preset(str(checkpoint))


def test_wrong_shape(checkpoint):
    def edit(w):
        w["model.layers.0.self_attn.k_proj.weight"] = np.zeros((32, 32), np.float32)

    rewrite_weights(checkpoint, edit)
    with pytest.raises(ValueError, match=r"model\.safetensors: tensor 'model\.layers\.0\.self_attn\.k_proj\.weight' has shape \(32, 32\).*needs \(16, 32\)"):
        keras_gemma.GemmaBackbone.from_preset(str(checkpoint))


def test_unexpected_tensor(checkpoint):
    def edit(w):
        w["model.layers.0.self_attn.q_norm.weight"] = np.zeros((16,), np.float32)

    rewrite_weights(checkpoint, edit)
    with pytest.raises(ValueError, match=r"model\.safetensors: tensor 'model\.layers\.0\.self_attn\.q_norm\.weight' has no place"):
        keras_gemma.GemmaBackbone.from_preset(str(checkpoint))


def test_config_that_does_not_match_the_weights(checkpoint):
    path = checkpoint / "config.json"
    config = json.loads(path.read_text())
    config["num_hidden_layers"] = 3
    path.write_text(json.dumps(config))
    with pytest.raises(ValueError, match=r"lacks .*model\.layers\.2\."):
        keras_gemma.GemmaBackbone.from_preset(str(checkpoint))


def test_unknown_model_type(checkpoint):
    path = checkpoint / "config.json"
    config = json.loads(path.read_text())
    config["model_type"] = "llama"
    path.write_text(json.dumps(config))
    with pytest.raises(ValueError, match=r"config\.json has model_type 'llama'"):
        keras_gemma.GemmaCausalLM.from_preset(str(checkpoint))


def test_missing_tokenizer_fails_before_loading(checkpoint, monkeypatch):
    os.remove(checkpoint / "tokenizer.model")
    from keras_gemma.convert import transformers as convert

    def fail(*args):
        raise AssertionError("weights were read before the tokenizer was checked")

    monkeypatch.setattr(convert, "assign_weights", fail)
    with pytest.raises(FileNotFoundError, match=r"tokenizer\.model not found"):
        keras_gemma.GemmaCausalLM.from_preset(str(checkpoint))
    # The backbone alone needs no tokenizer.
    monkeypatch.undo()
    keras_gemma.GemmaBackbone.from_preset(str(checkpoint))


def test_no_weights_and_not_a_preset(tmp_path, checkpoint):
    os.remove(checkpoint / "model.safetensors")
    with pytest.raises(FileNotFoundError, match=r"No \*\.safetensors weights in"):
        keras_gemma.GemmaBackbone.from_preset(str(checkpoint))
    with pytest.raises(FileNotFoundError, match=r"config\.json not found"):
        keras_gemma.GemmaBackbone.from_preset(str(tmp_path.parent))
    with pytest.raises(ValueError, match="not a named preset"):
        keras_gemma.GemmaBackbone.from_preset(str(tmp_path / "nowhere"))


def test_unsupported_options_are_errors(checkpoint):
    path = checkpoint / "config.json"
    config = json.loads(path.read_text())
    path.write_text(json.dumps({**config, "attention_bias": True}))
    with pytest.raises(ValueError, match=r"attention_bias=True is not supported"):
        keras_gemma.GemmaBackbone.from_preset(str(checkpoint))
    path.write_text(json.dumps({**config, "hidden_activation": "relu"}))
    with pytest.raises(ValueError, match=r"hidden_activation='relu' is not supported"):
        keras_gemma.GemmaBackbone.from_preset(str(checkpoint))


def test_truncated_weights_name_the_file_and_tensor(checkpoint):
    path = checkpoint / "model.safetensors"
    data = path.read_bytes()
    path.write_bytes(data[: len(data) - 1000])  # an interrupted download
    with pytest.raises(ValueError, match=r"model\.safetensors: tensor '.*' runs past the end of the file \(truncated download\?\)"):
        keras_gemma.GemmaCausalLM.from_preset(str(checkpoint))


def test_a_tokenizer_larger_than_the_embedding_is_refused(checkpoint, monkeypatch):
    """A tokenizer.model of another model (more pieces than embedding rows):
    refused before any weight is read, and by the model's constructor."""
    from keras_gemma.convert import transformers as transformers_loader
    from helpers import train_sentencepiece

    (checkpoint / "tokenizer.model").write_bytes(train_sentencepiece(vocab_size=512))

    def fail(*args):
        raise AssertionError("weights were read")

    monkeypatch.setattr(transformers_loader.TransformersLoader, "load_weights", fail)
    with pytest.raises(ValueError, match="tokenizer of this preset has 512 pieces, but its embedding has 384 rows"):
        keras_gemma.GemmaCausalLM.from_preset(str(checkpoint))
    tokenizer = keras_gemma.GemmaTokenizer(proto=str(checkpoint / "tokenizer.model"))
    preprocessor = keras_gemma.GemmaCausalLMPreprocessor(tokenizer, sequence_length=8)
    with pytest.raises(ValueError, match="The tokenizer has 512 pieces, but the model's embedding has 384 rows"):
        keras_gemma.GemmaCausalLM(keras_gemma.GemmaBackbone(**TINY), preprocessor)
