"""Gemma 2 and Gemma 3 text layouts against transformers, random weights."""

import numpy as np
import pytest

import keras_gemma
from helpers import save_transformers_model, to_numpy, transformers_logits

# 12 tokens: longer than every sliding window below.
TOKEN_IDS = np.array([[2, 17, 42, 9, 100, 5, 61, 7, 88, 23, 54, 3], [2, 30, 31, 90, 11, 0, 0, 0, 0, 0, 0, 0]])
PADDING_MASK = (TOKEN_IDS != 0).astype("int32")
PADDING_MASK[:, 0] = 1
COMMON = dict(
    vocab_size=384,
    hidden_size=32,
    intermediate_size=48,
    num_attention_heads=4,
    num_key_value_heads=2,
    head_dim=16,
    max_position_embeddings=64,
    hidden_activation="gelu_pytorch_tanh",
)


def gemma2_config():
    from transformers import Gemma2Config

    return Gemma2Config(
        **COMMON,
        num_hidden_layers=3,
        layer_types=["full_attention", "sliding_attention", "sliding_attention"],
        sliding_window=4,
        query_pre_attn_scalar=24,
        attn_logit_softcapping=3.0,
        final_logit_softcapping=2.0,
    )


def gemma3_config():
    from transformers import Gemma3TextConfig

    return Gemma3TextConfig(
        **COMMON,
        num_hidden_layers=4,
        layer_types=["sliding_attention", "full_attention", "sliding_attention", "sliding_attention"],
        sliding_window=3,
        query_pre_attn_scalar=20,
        rope_parameters={
            "full_attention": {"rope_type": "linear", "rope_theta": 1_000_000.0, "factor": 4.0},
            "sliding_attention": {"rope_type": "default", "rope_theta": 10_000.0},
        },
    )


@pytest.mark.parametrize("make_config", [gemma2_config, gemma3_config], ids=["gemma2", "gemma3_text"])
def test_logits_equal_transformers(tmp_path, make_config, spm_proto):
    hf_config = make_config()
    reference = save_transformers_model(tmp_path, hf_config, seed=11, spm_proto=spm_proto)
    expected = transformers_logits(reference, TOKEN_IDS, PADDING_MASK)
    lm = keras_gemma.GemmaCausalLM.from_preset(str(tmp_path))
    assert lm.backbone.layer_types == list(hf_config.layer_types)
    got = to_numpy(lm({"token_ids": TOKEN_IDS, "padding_mask": PADDING_MASK}))
    valid = PADDING_MASK.astype(bool)
    assert np.abs(expected[valid]).max() > 0.5
    np.testing.assert_allclose(got[valid], expected[valid], atol=1e-4, rtol=0)


@pytest.mark.parametrize("make_config", [gemma2_config, gemma3_config], ids=["gemma2", "gemma3_text"])
def test_cached_generation_across_the_window(tmp_path, make_config):
    """Greedy decoding with the cache equals argmax of full forward passes
    for sequences that outgrow the sliding window."""
    save_transformers_model(tmp_path, make_config(), seed=12)
    lm = keras_gemma.GemmaCausalLM(keras_gemma.GemmaBackbone.from_preset(str(tmp_path)))
    length = 12
    prompts = [[2, 17, 42], [2, 30, 31, 90, 11]]
    token_ids = np.zeros((2, length), "int32")
    mask = np.zeros((2, length), bool)
    for i, p in enumerate(prompts):
        token_ids[i, : len(p)] = p
        mask[i, : len(p)] = True
    out = lm.generate({"token_ids": token_ids, "padding_mask": mask}, stop_token_ids=None)
    for row, prompt in zip(out["token_ids"], prompts):
        ids = list(prompt)
        while len(ids) < length:
            x = np.zeros((1, length), "int32")
            x[0, : len(ids)] = ids
            logits = to_numpy(lm({"token_ids": x, "padding_mask": (np.arange(length) < len(ids))[None]}))
            ids.append(int(logits[0, len(ids) - 1].argmax()))
        assert list(row) == ids


def test_text_part_of_an_image_text_gemma3_checkpoint(tmp_path):
    """A `gemma3` (image-text) checkpoint: the text decoder loads, the vision
    tower is left out, and text-only logits equal transformers'."""
    import torch
    from transformers import Gemma3Config, Gemma3ForConditionalGeneration, SiglipVisionConfig

    vision = SiglipVisionConfig(
        hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2,
        image_size=28, patch_size=14,
    )
    config = Gemma3Config(
        text_config=gemma3_config(), vision_config=vision, mm_tokens_per_image=4,
        boi_token_index=381, eoi_token_index=382, image_token_index=383,
    )
    config._attn_implementation = config.text_config._attn_implementation = "eager"
    torch.manual_seed(13)
    model = Gemma3ForConditionalGeneration(config).eval()
    with torch.no_grad():
        for name, param in model.named_parameters():
            param.copy_(torch.randn_like(param) * (0.5 if "norm" in name else 0.2))
    model.save_pretrained(tmp_path)
    expected = transformers_logits(model, TOKEN_IDS[:1], PADDING_MASK[:1])
    backbone = keras_gemma.GemmaBackbone.from_preset(str(tmp_path))
    got = to_numpy(keras_gemma.GemmaCausalLM(backbone)({"token_ids": TOKEN_IDS[:1], "padding_mask": PADDING_MASK[:1]}))
    np.testing.assert_allclose(got, expected, atol=1e-4, rtol=0)
