"""`export_to_transformers`: transformers itself loads what we write.

Each layout starts as a transformers checkpoint with random weights (the oracle), is
loaded here, exported, and loaded back by transformers: the same logits as ours within
1e-4, every tensor and config value of the original exactly, no warning.
"""

import json
import logging
import os
import warnings

import numpy as np
import pytest

import keras_gemma
from helpers import CORPUS, TINY, save_transformers_model, to_numpy, train_sentencepiece, transformers_logits

TOKEN_IDS = np.array([[2, 17, 42, 9, 100, 5, 61, 7, 88, 23, 54, 3], [2, 30, 31, 90, 11, 0, 0, 0, 0, 0, 0, 0]])
PADDING_MASK = (TOKEN_IDS != 0).astype("int32")
PADDING_MASK[:, 0] = 1
# The context lengths of the released configs (the model does not hold one; the
# export writes its family's).
CONTEXT = {"gemma": 8192, "gemma2": 8192, "gemma3_text": 32768, "gemma3_text_scaled": 131072}
COMMON = dict(
    vocab_size=384,
    hidden_size=32,
    intermediate_size=48,
    num_attention_heads=4,
    num_key_value_heads=2,
    head_dim=16,
    hidden_activation="gelu_pytorch_tanh",
)


def gemma(num_key_value_heads):
    def make():
        from transformers import GemmaConfig

        return GemmaConfig(
            vocab_size=TINY["vocabulary_size"],
            hidden_size=TINY["hidden_dim"],
            intermediate_size=TINY["intermediate_dim"] // 2,
            num_hidden_layers=TINY["num_layers"],
            num_attention_heads=TINY["num_query_heads"],
            num_key_value_heads=num_key_value_heads,
            head_dim=TINY["head_dim"],
            hidden_act="gelu_pytorch_tanh",
            max_position_embeddings=CONTEXT["gemma"],
        )

    return make


def gemma2():
    from transformers import Gemma2Config

    return Gemma2Config(
        **COMMON,
        num_hidden_layers=3,
        layer_types=["full_attention", "sliding_attention", "sliding_attention"],
        sliding_window=4,
        query_pre_attn_scalar=24,
        attn_logit_softcapping=3.0,
        final_logit_softcapping=2.0,
        max_position_embeddings=CONTEXT["gemma2"],
    )


def gemma3(scaled):
    def make():
        from transformers import Gemma3TextConfig

        full = {"rope_type": "linear", "rope_theta": 1_000_000.0, "factor": 8.0} if scaled else {"rope_type": "default", "rope_theta": 1_000_000.0}
        return Gemma3TextConfig(
            **COMMON,
            num_hidden_layers=4,
            layer_types=["sliding_attention", "full_attention", "sliding_attention", "sliding_attention"],
            sliding_window=3,
            query_pre_attn_scalar=20,
            rope_parameters={"full_attention": full, "sliding_attention": {"rope_type": "default", "rope_theta": 10_000.0}},
            max_position_embeddings=CONTEXT["gemma3_text_scaled" if scaled else "gemma3_text"],
        )

    return make


@pytest.fixture(scope="module")
def gemma_proto():
    """A vocabulary with the released ones' settings (transformers'
    GemmaTokenizer assumes them)."""
    return train_sentencepiece(gemma_normalization=True)


LAYOUTS = {
    "multi_query": gemma(1),
    "grouped_query": gemma(2),
    "multi_head": gemma(4),
    "gemma2": gemma2,
    "gemma3_text": gemma3(scaled=False),
    "gemma3_text_scaled": gemma3(scaled=True),
}


def load_quietly(loader, *args, **kwargs):
    """`loader(*args, **kwargs)`, failing on any Python warning or transformers
    warning log line."""
    import transformers

    records = []
    handler = logging.Handler(level=logging.WARNING)
    handler.emit = records.append
    logger = transformers.logging.get_logger("transformers")
    logger.addHandler(handler)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            result = loader(*args, **kwargs)
    finally:
        logger.removeHandler(handler)
    assert not records, [r.getMessage() for r in records]
    return result


def hf_config_dict(config):
    d = config.to_dict()
    for key in ("transformers_version", "_name_or_path"):
        d.pop(key, None)
    return d


@pytest.mark.parametrize("name", list(LAYOUTS))
def test_round_trip_through_keras_gemma(tmp_path, name, gemma_proto):
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    original = save_transformers_model(tmp_path / "original", LAYOUTS[name](), seed=len(name), spm_proto=gemma_proto)
    lm = keras_gemma.GemmaCausalLM.from_preset(str(tmp_path / "original"))
    ours = to_numpy(lm({"token_ids": TOKEN_IDS, "padding_mask": PADDING_MASK}))

    lm.export_to_transformers(tmp_path / "exported", max_shard_size="20KB")
    files = sorted(os.listdir(tmp_path / "exported"))
    assert "model.safetensors.index.json" in files and "model-00002-of-" in " ".join(files)
    reloaded = load_quietly(AutoModelForCausalLM.from_pretrained, tmp_path / "exported", attn_implementation="eager")
    theirs = transformers_logits(reloaded.eval(), TOKEN_IDS, PADDING_MASK)
    valid = PADDING_MASK.astype(bool)
    assert np.abs(theirs[valid]).max() > 0.5
    np.testing.assert_allclose(ours[valid], theirs[valid], atol=1e-4, rtol=0)

    expected = original.state_dict()
    got = reloaded.state_dict()
    assert sorted(got) == sorted(expected)
    for key in expected:
        assert got[key].dtype == expected[key].dtype == torch.float32, key
        assert torch.equal(got[key], expected[key]), key
    assert hf_config_dict(AutoConfig.from_pretrained(tmp_path / "exported")) == hf_config_dict(
        AutoConfig.from_pretrained(tmp_path / "original")
    )


def test_from_a_keras_gemma_model_in_bfloat16_single_file(tmp_path, gemma_proto):
    """A model made here (not loaded from transformers), saved in bfloat16:
    one file, no index, every tensor ours rounded to bfloat16."""
    import ml_dtypes
    import torch
    from transformers import AutoModelForCausalLM

    backbone = keras_gemma.GemmaBackbone(**{**TINY, "num_key_value_heads": 2})
    preprocessor = keras_gemma.GemmaCausalLMPreprocessor(keras_gemma.GemmaTokenizer(proto=gemma_proto), sequence_length=8)
    lm = keras_gemma.GemmaCausalLM(backbone, preprocessor)
    lm.export_to_transformers(tmp_path, dtype="bfloat16")
    assert "model.safetensors" in os.listdir(tmp_path)
    assert "model.safetensors.index.json" not in os.listdir(tmp_path)
    reloaded = load_quietly(AutoModelForCausalLM.from_pretrained, tmp_path, dtype="auto")
    assert reloaded.dtype == torch.bfloat16
    embedding = reloaded.state_dict()["model.embed_tokens.weight"].float().numpy()
    ours = to_numpy(backbone.token_embedding.embeddings).astype(ml_dtypes.bfloat16).astype(np.float32)
    np.testing.assert_array_equal(embedding, ours)
    query = reloaded.state_dict()["model.layers.1.self_attn.q_proj.weight"].float().numpy()
    kernel = to_numpy(backbone.transformer_layers[1].attention.query_dense.kernel)  # (hidden, heads, head_dim)
    np.testing.assert_array_equal(query, kernel.reshape(TINY["hidden_dim"], -1).T.astype(ml_dtypes.bfloat16).astype(np.float32))


def test_tokenizer_and_chat_template(tmp_path, gemma_proto):
    """transformers' tokenizer from the exported files tokenizes as ours, and
    its chat template renders our chat format."""
    from transformers import AutoTokenizer, GenerationConfig

    tokenizer = keras_gemma.GemmaTokenizer(proto=gemma_proto)
    preprocessor = keras_gemma.GemmaCausalLMPreprocessor(tokenizer, sequence_length=8)
    lm = keras_gemma.GemmaCausalLM(keras_gemma.GemmaBackbone(**TINY), preprocessor)
    lm.backbone.export_to_transformers(tmp_path / "backbone_only")
    assert "tokenizer.model" not in os.listdir(tmp_path / "backbone_only")
    lm.export_to_transformers(tmp_path / "lm")
    theirs = load_quietly(AutoTokenizer.from_pretrained, tmp_path / "lm")
    for text in CORPUS[:6] + ["<start_of_turn>user\nHi<end_of_turn>\n"]:
        assert theirs(text).input_ids == [2] + [int(i) for i in to_numpy(tokenizer(text))], text
    messages = [
        {"role": "system", "content": "Answer briefly."},
        {"role": "user", "content": " Knock knock. "},
        {"role": "assistant", "content": "Who's there?"},
        {"role": "user", "content": "Gemma."},
    ]
    rendered = theirs.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    assert rendered == "<bos>" + keras_gemma.format_chat(messages)
    generation = GenerationConfig.from_pretrained(tmp_path / "lm")
    assert generation.eos_token_id == [1, tokenizer.end_of_turn_token_id]


# === What transformers cannot hold: errors, and nothing written ===


def test_a_vocabulary_transformers_would_tokenize_differently(tmp_path, spm_proto):
    """transformers' GemmaTokenizer ignores a vocabulary's own normalization:
    one with a dummy prefix (SentencePiece's default) is refused, not exported
    to tokenize differently."""
    preprocessor = keras_gemma.GemmaCausalLMPreprocessor(keras_gemma.GemmaTokenizer(proto=spm_proto), sequence_length=8)
    lm = keras_gemma.GemmaCausalLM(keras_gemma.GemmaBackbone(**TINY), preprocessor)
    with pytest.raises(ValueError, match=r"would not tokenize as this vocabulary.*normalizer='nmt_nfkc'.*add_dummy_prefix=True"):
        lm.export_to_transformers(tmp_path / "lm")
    assert os.listdir(tmp_path) == []


def test_layouts_transformers_cannot_express(tmp_path):
    cases = {
        "soft caps without post-norms": dict(attention_logit_soft_cap=50.0),
        "query scaling": dict(query_pre_attn_scalar=20),
        "one post-norm": dict(use_post_attention_norm=True),
        "local RoPE in Gemma 2": dict(
            use_post_attention_norm=True,
            use_post_ffw_norm=True,
            layer_types=["sliding_attention", "full_attention"],
            sliding_window_size=4,
            local_rope_max_wavelength=500.0,
        ),
    }
    messages = {
        "soft caps without post-norms": r"'gemma'.*attention_logit_soft_cap=50.0",
        "query scaling": r"'gemma'.*queries scaled by 20",
        "one post-norm": r"use_post_attention_norm=True with use_post_ffw_norm=False",
        "local RoPE in Gemma 2": r"'gemma2'.*RoPE base of 500.0 on sliding layers",
    }
    for case, options in cases.items():
        backbone = keras_gemma.GemmaBackbone(**TINY, **options)
        with pytest.raises(ValueError, match=messages[case]):
            backbone.export_to_transformers(tmp_path / case)
        assert not os.path.exists(tmp_path / case)
    assert not [name for name in os.listdir(tmp_path)], "a failed export left files"


def test_quantized_and_lora_models_are_refused(tmp_path):
    backbone = keras_gemma.GemmaBackbone(**TINY)
    backbone.enable_lora(2)
    with pytest.raises(ValueError, match="LoRA adapters enabled: call `merge_lora_weights\\(\\)`"):
        backbone.export_to_transformers(tmp_path / "lora")
    backbone = keras_gemma.GemmaBackbone(**TINY)
    backbone.quantize("int8")
    with pytest.raises(ValueError, match=r"quantized \(int8\).*before calling `quantize`"):
        backbone.export_to_transformers(tmp_path / "int8")
    assert os.listdir(tmp_path) == []


def test_bad_arguments(tmp_path):
    backbone = keras_gemma.GemmaBackbone(**TINY)
    for size, error, match in (
        ("5 parsecs", ValueError, "max_shard_size='5 parsecs' is not a size"),
        (0, ValueError, "max_shard_size must be positive"),
        (2.5, TypeError, "max_shard_size must be an int"),
    ):
        with pytest.raises(error, match=match):
            backbone.export_to_transformers(tmp_path / "x", max_shard_size=size)
    with pytest.raises(ValueError, match="dtype='int8': export_to_transformers writes float32, bfloat16, float16"):
        backbone.export_to_transformers(tmp_path / "x", dtype="int8")
    (tmp_path / "notes").mkdir()
    (tmp_path / "notes" / "mine.txt").write_text("keep me")
    with pytest.raises(ValueError, match="exists and is not a transformers checkpoint"):
        backbone.export_to_transformers(tmp_path / "notes")
    assert (tmp_path / "notes" / "mine.txt").read_text() == "keep me"


def test_a_failed_export_keeps_the_previous_checkpoint(tmp_path, monkeypatch):
    from keras_gemma.convert import transformers_export

    first = keras_gemma.GemmaBackbone(**TINY)
    first.export_to_transformers(tmp_path / "ckpt")
    before = {name: (tmp_path / "ckpt" / name).read_bytes() for name in os.listdir(tmp_path / "ckpt")}

    def disk_full(path, tensors, st_dtype):
        with open(path, "wb") as f:
            f.write(b"half")
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(transformers_export, "write_safetensors", disk_full)
    with pytest.raises(OSError, match="No space left"):
        keras_gemma.GemmaBackbone(**TINY).export_to_transformers(tmp_path / "ckpt")
    assert {name: (tmp_path / "ckpt" / name).read_bytes() for name in os.listdir(tmp_path / "ckpt")} == before
    assert sorted(os.listdir(tmp_path)) == ["ckpt"]
    monkeypatch.undo()
    second = keras_gemma.GemmaBackbone(**TINY)
    second.export_to_transformers(tmp_path / "ckpt")  # a checkpoint is replaced
    config = json.loads((tmp_path / "ckpt" / "config.json").read_text())
    assert config["model_type"] == "gemma" and sorted(os.listdir(tmp_path)) == ["ckpt"]
