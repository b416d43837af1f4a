"""GGUF files written here from random transformers Gemma 3 weights, in llama.cpp's
layout, read back by keras_gemma and by transformers (the oracle)."""

import os

import numpy as np
import pytest

import keras_gemma
from helpers import save_transformers_model, to_numpy, transformers_logits, write_gemma3_gguf

gguf = pytest.importorskip("gguf")

def tiny_gemma3(tmp_path):
    from transformers import Gemma3TextConfig

    config = Gemma3TextConfig(
        vocab_size=256, hidden_size=64, intermediate_size=96, num_hidden_layers=6,
        num_attention_heads=2, num_key_value_heads=1, sliding_window=4,
        max_position_embeddings=64,
        # GGUF stores no query scale: llama.cpp and transformers both take
        # head_dim, and transformers' default 256, so the two agree here.
        head_dim=256, query_pre_attn_scalar=256,
        rope_parameters={
            "full_attention": {"rope_type": "default", "rope_theta": 1_000_000.0},
            "sliding_attention": {"rope_type": "default", "rope_theta": 10_000.0},
        },
    )
    return save_transformers_model(tmp_path / "hf", config, seed=21)


@pytest.mark.parametrize("quantization", ["F32", "F16", "BF16", "Q8_0"])
def test_logits_equal_transformers_reading_the_same_file(tmp_path, quantization):
    import torch
    from transformers import AutoModelForCausalLM

    qtype = gguf.GGMLQuantizationType[quantization]
    path = tmp_path / f"tiny-{quantization}.gguf"
    write_gemma3_gguf(path, tiny_gemma3(tmp_path), qtype)
    reference = AutoModelForCausalLM.from_pretrained(
        tmp_path, gguf_file=path.name, dtype=torch.float32
    ).eval()
    token_ids = np.array([[2, 17, 42, 9, 100, 5, 61, 7, 88, 23]])
    with torch.no_grad():
        expected = reference(torch.tensor(token_ids)).logits.numpy()
    backbone = keras_gemma.GemmaBackbone.from_preset(str(path))
    assert backbone.layer_types[5] == "full_attention" and backbone.layer_types[4] == "sliding_attention"
    got = to_numpy(keras_gemma.GemmaCausalLM(backbone)({"token_ids": token_ids, "padding_mask": np.ones_like(token_ids)}))
    assert np.abs(expected).max() > 0.5
    np.testing.assert_allclose(got, expected, atol=1e-4, rtol=0)


def test_unsupported_architecture(tmp_path):
    path = tmp_path / "llama.gguf"
    writer = gguf.GGUFWriter(str(path), "llama")
    writer.add_block_count(1)
    writer.add_tensor("token_embd.weight", np.zeros((8, 4), np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    with pytest.raises(ValueError, match=r"llama\.gguf holds a 'llama' model"):
        keras_gemma.GemmaBackbone.from_preset(str(path))


def test_unsupported_quantization_type(tmp_path):
    path = tmp_path / "tiny.gguf"
    write_gemma3_gguf(path, tiny_gemma3(tmp_path), gguf.GGMLQuantizationType.F32)
    # Rewrite one tensor's type in place as IQ2_XXS, which keras_gemma does not read.
    reader = gguf.GGUFReader(str(path), "r+")
    tensor = next(t for t in reader.tensors if t.name == "blk.0.attn_output.weight")
    info_offset = tensor.field.offset
    del reader
    with open(path, "r+b") as f:
        # tensor info: name (u64 length + bytes), n_dims u32, dims u64 * n, type u32
        f.seek(info_offset)
        name_len = int.from_bytes(f.read(8), "little")
        f.seek(info_offset + 8 + name_len)
        n_dims = int.from_bytes(f.read(4), "little")
        f.seek(info_offset + 8 + name_len + 4 + 8 * n_dims)
        f.write(int(gguf.GGMLQuantizationType.IQ2_XXS).to_bytes(4, "little"))
    with pytest.raises(ValueError, match=r"tensor 'blk\.0\.attn_output\.weight' is quantized as IQ2_XXS"):
        keras_gemma.GemmaBackbone.from_preset(str(path))


def test_missing_file():
    with pytest.raises(FileNotFoundError, match=r"nowhere\.gguf not found"):
        keras_gemma.GemmaBackbone.from_preset(os.path.join("nowhere.gguf"))


# === Metadata llama.cpp's converter does not write for Gemma, and its defaults ===


def write_gguf_with_fields(path, model, monkeypatch, fields):
    """`write_gemma3_gguf` (float32), plus the metadata `fields`: `[(GGUFWriter
    method without `add_`, value)]`."""

    class Writer(gguf.GGUFWriter):
        def write_header_to_file(self, *args, **kwargs):
            for method, value in fields:
                getattr(self, "add_" + method)(value)
            super().write_header_to_file(*args, **kwargs)

    with monkeypatch.context() as patch:
        patch.setattr(gguf, "GGUFWriter", Writer)
        write_gemma3_gguf(path, model, gguf.GGMLQuantizationType.F32)


def test_query_scale_layer_pattern_and_rope_scaling_from_the_metadata(tmp_path, monkeypatch):
    """`attention.scale` (the factor llama.cpp multiplies queries by),
    `attention.sliding_window_pattern` and linear RoPE scaling, against
    transformers running the model they describe."""
    from transformers import Gemma3TextConfig

    config = Gemma3TextConfig(
        vocab_size=256, hidden_size=64, intermediate_size=96, num_hidden_layers=6,
        num_attention_heads=2, num_key_value_heads=1, head_dim=16, sliding_window=4,
        max_position_embeddings=64, query_pre_attn_scalar=20,
        layer_types=["sliding_attention", "sliding_attention", "full_attention"] * 2,
        rope_parameters={
            "full_attention": {"rope_type": "linear", "rope_theta": 1_000_000.0, "factor": 4.0},
            "sliding_attention": {"rope_type": "default", "rope_theta": 10_000.0},
        },
    )
    reference = save_transformers_model(tmp_path / "hf", config, seed=22)
    path = tmp_path / "tiny.gguf"
    fields = [
        ("attention_scale", 20**-0.5),
        ("sliding_window_pattern", 3),
        ("rope_scaling_type", gguf.RopeScalingType.LINEAR),
        ("rope_scaling_factor", 4.0),
    ]
    write_gguf_with_fields(path, reference, monkeypatch, fields)
    backbone = keras_gemma.GemmaBackbone.from_preset(str(path))
    assert backbone.layer_types == list(config.layer_types)
    token_ids = np.array([[2, 17, 42, 9, 100, 5, 61, 7, 88, 23]])
    expected = transformers_logits(reference, token_ids, np.ones_like(token_ids))
    got = to_numpy(keras_gemma.GemmaCausalLM(backbone)({"token_ids": token_ids, "padding_mask": np.ones_like(token_ids)}))
    assert np.abs(expected).max() > 0.5
    np.testing.assert_allclose(got, expected, atol=1e-4, rtol=0)


def write_metadata_only(path, arch, **fields):
    """A GGUF with metadata of any size and one placeholder tensor (no weights:
    for reading the configuration only)."""
    writer = gguf.GGUFWriter(str(path), arch)
    for method, value in fields.items():
        getattr(writer, "add_" + method)(value)
    writer.add_tensor("token_embd.weight", np.zeros((8, 4), np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


# What llama.cpp's converter writes for the released 27B models (their
# transformers configs; transformers' convert_gemma3_weights.py for Gemma 3).
GEMMA2_27B = dict(block_count=46, embedding_length=4608, feed_forward_length=36864, head_count=32, head_count_kv=16, key_length=128, sliding_window=4096)
GEMMA3_27B = dict(block_count=62, embedding_length=5376, feed_forward_length=21504, head_count=32, head_count_kv=16, key_length=128, sliding_window=1024)


@pytest.mark.parametrize(
    "arch, fields, query_pre_attn_scalar",
    [
        ("gemma2", GEMMA2_27B, 144),  # hidden / heads, as in llama.cpp and transformers
        ("gemma3", GEMMA3_27B, 168),
        ("gemma2", {**GEMMA2_27B, "block_count": 4}, 128),  # no released shape: head_dim
        ("gemma3", {**GEMMA3_27B, "attention_scale": 0.125}, 64),  # the file's own scale
    ],
)
def test_query_scale_without_the_field(tmp_path, arch, fields, query_pre_attn_scalar):
    from keras_gemma.convert.gguf import GGUFLoader

    path = tmp_path / "meta.gguf"
    write_metadata_only(path, arch, **fields)
    config = GGUFLoader(str(path)).backbone_config()
    assert config["query_pre_attn_scalar"] == query_pre_attn_scalar
    assert config["vocabulary_size"] == 8


def test_without_a_sliding_window_every_layer_is_global(tmp_path):
    """As llama.cpp reads such a Gemma 3 file: no window, no local RoPE."""
    from keras_gemma.convert.gguf import GGUFLoader

    path = tmp_path / "meta.gguf"
    write_metadata_only(path, "gemma3", **{**GEMMA3_27B, "block_count": 6, "sliding_window": 0})
    config = GGUFLoader(str(path)).backbone_config()
    assert config["layer_types"] == ["full_attention"] * 6
    assert "sliding_window_size" not in config and "local_rope_max_wavelength" not in config
