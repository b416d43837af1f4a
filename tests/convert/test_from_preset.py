"""`from_preset` of the four classes: which source is read how, and where arguments go."""

import numpy as np
import pytest

import keras_gemma
from helpers import TINY, save_transformers_gemma, to_numpy

INPUTS = {"token_ids": np.array([[2, 17, 42, 9]]), "padding_mask": np.array([[1, 1, 1, 1]])}


@pytest.fixture
def transformers_dir(tmp_path, spm_proto):
    save_transformers_gemma(tmp_path / "hf", TINY, seed=3, spm_proto=spm_proto)
    return str(tmp_path / "hf")


def test_save_to_preset_directories_load_into_each_class(tmp_path, tokenizer):
    """A directory written by `save_to_preset` is read by keras-hub's own
    from_preset: the task, its backbone, preprocessor and tokenizer come back."""
    preprocessor = keras_gemma.GemmaCausalLMPreprocessor(tokenizer, sequence_length=12)
    lm = keras_gemma.GemmaCausalLM(keras_gemma.GemmaBackbone(**TINY), preprocessor)
    lm.save_to_preset(str(tmp_path))
    restored = keras_gemma.GemmaCausalLM.from_preset(str(tmp_path))
    np.testing.assert_array_equal(to_numpy(restored(INPUTS)), to_numpy(lm(INPUTS)))
    backbone = keras_gemma.GemmaBackbone.from_preset(str(tmp_path))
    np.testing.assert_array_equal(to_numpy(backbone(INPUTS)), to_numpy(lm.backbone(INPUTS)))
    assert keras_gemma.GemmaCausalLMPreprocessor.from_preset(str(tmp_path)).sequence_length == 12
    assert keras_gemma.GemmaTokenizer.from_preset(str(tmp_path)).get_vocabulary() == tokenizer.get_vocabulary()
    assert keras_gemma.GemmaCausalLM.from_preset(str(tmp_path), preprocessor=None).preprocessor is None


def test_a_keras_hub_preset_of_another_model_is_refused_by_name(tmp_path):
    """keras-hub's Gemma presets load (tests/convert/test_keras_hub.py); its
    other models' do not."""
    import keras_hub

    keras_hub.models.LlamaBackbone(
        vocabulary_size=16, num_layers=1, num_query_heads=2, num_key_value_heads=1,
        hidden_dim=8, intermediate_dim=16,
    ).save_to_preset(str(tmp_path))
    for cls in (
        keras_gemma.GemmaBackbone,
        keras_gemma.GemmaCausalLM,
        keras_gemma.GemmaCausalLMPreprocessor,
        keras_gemma.GemmaTokenizer,
    ):
        with pytest.raises(ValueError, match=r"holds a keras_hub\..*LlamaBackbone, not a keras_gemma model"):
            cls.from_preset(str(tmp_path))


def test_arguments_reach_the_layer_they_configure(transformers_dir):
    """For a Transformers directory, as keras-hub's loaders do: a task's
    `dtype` goes to the backbone; a preprocessor's arguments to the
    preprocessor; `preprocessor=None` gives a task without one."""
    lm = keras_gemma.GemmaCausalLM.from_preset(transformers_dir, dtype="bfloat16")
    assert lm.backbone.dtype_policy.name == "bfloat16"
    assert isinstance(lm.preprocessor, keras_gemma.GemmaCausalLMPreprocessor)
    assert keras_gemma.GemmaCausalLM.from_preset(transformers_dir, preprocessor=None).preprocessor is None
    preprocessor = keras_gemma.GemmaCausalLMPreprocessor.from_preset(transformers_dir, sequence_length=7)
    assert preprocessor.sequence_length == 7
    assert isinstance(preprocessor.tokenizer, keras_gemma.GemmaTokenizer)
    backbone = keras_gemma.GemmaBackbone.from_preset(transformers_dir, load_weights=False, dtype="bfloat16")
    assert backbone.dtype_policy.name == "bfloat16" and backbone.num_layers == TINY["num_layers"]


def test_a_named_architecture_has_no_weights_and_no_tokenizer():
    """The paper's architectures (keras-hub's preset names are Kaggle handles)."""
    with pytest.raises(ValueError, match="ships no weights for 'gemma_7b'"):
        keras_gemma.GemmaCausalLM.from_preset("gemma_7b")
    with pytest.raises(ValueError, match="'gemma_7b' has no tokenizer"):
        keras_gemma.GemmaTokenizer.from_preset("gemma_7b")
    with pytest.raises(ValueError, match="'gemma_7b' has no tokenizer"):
        keras_gemma.GemmaCausalLMPreprocessor.from_preset("gemma_7b")


def test_unknown_presets(tmp_path):
    with pytest.raises(ValueError, match=r"Unknown preset 'gemma_2b_ennn'"):
        keras_gemma.GemmaBackbone.from_preset("gemma_2b_ennn")
    (tmp_path / "config.json").write_text('{"architecture": "resnet50"}')
    with pytest.raises(ValueError, match=r"neither a Keras preset config .* nor a Transformers config"):
        keras_gemma.GemmaBackbone.from_preset(str(tmp_path))
    from keras_gemma import convert

    with pytest.raises(TypeError, match="Backbone, Task, Preprocessor or Tokenizer"):
        convert.from_preset(dict, str(tmp_path), None)
