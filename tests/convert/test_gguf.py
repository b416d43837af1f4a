"""GGUF files written here from random transformers Gemma 3 weights, in llama.cpp's
layout, read back by keras_gemma and by transformers (the oracle)."""

import os

import numpy as np
import pytest

import keras_gemma
from helpers import save_transformers_model, to_numpy, write_gemma3_gguf

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
