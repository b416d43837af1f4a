"""keras-hub's Gemma presets read here, ours written for keras-hub: keras-hub
itself builds, saves and loads the models compared with (its
`save_to_preset` / `from_preset`, random weights)."""

import os

import keras
import keras_hub
import numpy as np
import pytest

import keras_gemma
from helpers import to_numpy

VOCABULARY = 384  # the test SentencePiece model's
TOKENS = np.array([[2, 17, 130, 41, 9, 77, 5, 300, 12, 64], [2, 88, 5, 31, 0, 0, 0, 0, 0, 0]], "int32")
INPUTS = {"token_ids": TOKENS, "padding_mask": (TOKENS > 0).astype("int32")}
INPUTS["padding_mask"][:, 0] = 1
BASE = dict(vocabulary_size=VOCABULARY, num_layers=2, hidden_dim=32, dropout=0)
# keras-hub's classes and constructor arguments.
CASES = {
    # Multi-head, head_dim != hidden_dim / heads.
    "gemma_multi_head": (keras_hub.models.GemmaBackbone, dict(
        BASE, num_query_heads=4, num_key_value_heads=4, head_dim=16, intermediate_dim=64,
    )),
    # Gemma 2: sliding window, soft caps, post norms, queries scaled by hidden / heads.
    "gemma2": (keras_hub.models.GemmaBackbone, dict(
        BASE, num_query_heads=4, num_key_value_heads=2, head_dim=8, intermediate_dim=64,
        use_sliding_window_attention=True, sliding_window_size=4, attention_logit_soft_cap=50.0,
        final_logit_soft_cap=30.0, use_post_attention_norm=True, use_post_ffw_norm=True,
        query_head_dim_normalize=False,
    )),
    # Gemma 3 text: query-key norm, five sliding layers then a global one.
    "gemma3": (keras_hub.models.Gemma3Backbone, dict(
        BASE, num_layers=7, image_size=16, num_query_heads=4, num_key_value_heads=1, head_dim=16,
        intermediate_dim=48, use_sliding_window_attention=True, sliding_window_size=4,
        use_post_attention_norm=True, use_post_ffw_norm=True, global_rope_scaling_factor=8.0,
    )),
}


def random_keras_hub_backbone(name, seed=0):
    cls, config = CASES[name]
    backbone = cls(**config)
    rng = np.random.default_rng(seed)
    for w in backbone.weights:
        w.assign((rng.standard_normal(w.shape) * 0.2).astype("float32"))
    return backbone


@pytest.mark.parametrize("name", list(CASES))
def test_keras_hub_preset_loads_with_its_logits(tmp_path, name):
    theirs = random_keras_hub_backbone(name)
    theirs.save_to_preset(str(tmp_path))
    ours = keras_gemma.GemmaBackbone.from_preset(str(tmp_path))
    assert ours.count_params() == theirs.count_params()
    valid = INPUTS["padding_mask"].astype(bool)
    np.testing.assert_allclose(
        to_numpy(ours(INPUTS))[valid], to_numpy(theirs(INPUTS))[valid], atol=1e-5, rtol=1e-5
    )


def test_keras_hub_causal_lm_preset_sharded_with_its_tokenizer(tmp_path, spm_proto):
    """A keras-hub GemmaCausalLM preset, its weights in several files."""
    backbone = random_keras_hub_backbone("gemma2", seed=1)
    tokenizer = keras_hub.models.GemmaTokenizer(proto=spm_proto)
    preprocessor = keras_hub.models.GemmaCausalLMPreprocessor(tokenizer, sequence_length=16)
    theirs = keras_hub.models.GemmaCausalLM(backbone=backbone, preprocessor=preprocessor)
    theirs.save_to_preset(str(tmp_path), max_shard_size=0.00005)  # about 52 kB a file
    assert len([f for f in os.listdir(tmp_path) if f.endswith(".weights.h5")]) >= 2  # sharded
    ours = keras_gemma.GemmaCausalLM.from_preset(str(tmp_path))
    assert ours.preprocessor.tokenizer.proto == theirs.preprocessor.tokenizer.proto
    valid = INPUTS["padding_mask"].astype(bool)
    np.testing.assert_allclose(
        to_numpy(ours(INPUTS))[valid], to_numpy(theirs(INPUTS))[valid], atol=1e-5, rtol=1e-5
    )
    theirs.compile(sampler="greedy")
    expected = theirs.generate("The quick brown", max_length=24)
    assert ours.generate("The quick brown", max_length=24) == expected


@pytest.mark.parametrize("name", list(CASES))
def test_exported_preset_loads_in_keras_hub(tmp_path, name, spm_proto):
    """Ours, written in keras-hub's layout: keras-hub's own from_preset gives
    our logits and our greedy text."""
    ours = keras_gemma.GemmaBackbone.from_preset(
        _keras_hub_preset(tmp_path / "theirs", name), load_weights=True
    )
    preprocessor = keras_gemma.GemmaCausalLMPreprocessor(keras_gemma.GemmaTokenizer(proto=spm_proto), sequence_length=16)
    lm = keras_gemma.GemmaCausalLM(ours, preprocessor)
    lm.export_to_keras_hub(str(tmp_path / "exported"))
    theirs = keras_hub.models.CausalLM.from_preset(str(tmp_path / "exported"))
    assert type(theirs.backbone) is CASES[name][0]
    valid = INPUTS["padding_mask"].astype(bool)
    np.testing.assert_allclose(to_numpy(theirs(INPUTS))[valid], to_numpy(lm(INPUTS))[valid], atol=1e-5, rtol=1e-5)
    theirs.compile(sampler="greedy")
    assert theirs.generate("The quick brown", max_length=24) == lm.generate("The quick brown", max_length=24)
    # And back: the same weights, exactly.
    again = keras_gemma.GemmaBackbone.from_preset(str(tmp_path / "exported"))
    for a, b in zip(again.weights, ours.weights):
        np.testing.assert_array_equal(to_numpy(a), to_numpy(b), err_msg=a.path)


def _keras_hub_preset(path, name):
    random_keras_hub_backbone(name, seed=2).save_to_preset(str(path))
    return str(path)


def test_keras_hub_preset_without_weights_is_a_clear_error(tmp_path):
    random_keras_hub_backbone("gemma_multi_head").save_to_preset(str(tmp_path))
    os.remove(tmp_path / "model.weights.h5")
    with pytest.raises(FileNotFoundError, match="holds no keras-hub weights"):
        keras_gemma.GemmaBackbone.from_preset(str(tmp_path))
    backbone = keras_gemma.GemmaBackbone.from_preset(str(tmp_path), load_weights=False)
    assert backbone.num_query_heads == 4


def test_model_keras_hub_cannot_hold_is_a_clear_error(tmp_path):
    backbone = keras_gemma.GemmaBackbone(
        vocabulary_size=VOCABULARY, num_layers=2, num_query_heads=2, num_key_value_heads=1,
        hidden_dim=16, intermediate_dim=32, head_dim=8, rope_max_wavelength=500.0,
    )
    with pytest.raises(ValueError, match="rope_max_wavelength=500.0"):
        backbone.export_to_keras_hub(str(tmp_path / "out"))
    assert not os.path.exists(tmp_path / "out")


def test_query_scaling_keras_hub_ignores_is_refused(tmp_path):
    """keras-hub's GemmaDecoderBlock scales queries by head_dim ** -0.5 even
    when its config says query_head_dim_normalize=False (Gemma 2 27B's
    setting); so a model scaled by hidden_dim / num_query_heads is not
    exported to compute differently there. The second half shows keras-hub's
    behaviour: when it changes, this refusal can go."""
    backbone = keras_gemma.GemmaBackbone(
        vocabulary_size=VOCABULARY, num_layers=1, num_query_heads=2, num_key_value_heads=1,
        hidden_dim=32, intermediate_dim=32, head_dim=8, query_head_dim_normalize=False,
    )
    with pytest.raises(ValueError, match=r"ignores query_head_dim_normalize=False"):
        backbone.export_to_keras_hub(str(tmp_path / "out"))
    assert not os.path.exists(tmp_path / "out")

    config = dict(
        vocabulary_size=VOCABULARY, num_layers=1, num_query_heads=2, num_key_value_heads=1,
        hidden_dim=32, intermediate_dim=32, head_dim=8,
    )
    token_ids = np.array([[2, 5, 9, 13]])
    outputs = []
    for normalize in (True, False):
        keras.utils.set_random_seed(4)
        theirs = keras_hub.models.GemmaBackbone(**config, query_head_dim_normalize=normalize)
        outputs.append(to_numpy(theirs({"token_ids": token_ids, "padding_mask": np.ones_like(token_ids)})))
    np.testing.assert_array_equal(outputs[0], outputs[1])


@pytest.mark.parametrize("name", ["gemma_multi_head", "gemma3"])
def test_keras_hub_weights_files_load(tmp_path, name):
    """`load_weights` of keras-hub's own `.weights.h5` (backbone or task
    level): keras-hub's logits; a file of another architecture is an error
    and the model is unchanged."""
    theirs = random_keras_hub_backbone(name, seed=7)
    expected = to_numpy(theirs.token_embedding(theirs(INPUTS), reverse=True))
    theirs.save_weights(str(tmp_path / "backbone.weights.h5"))
    task_cls = keras_hub.models.Gemma3CausalLM if name == "gemma3" else keras_hub.models.GemmaCausalLM
    task_cls(backbone=theirs, preprocessor=None).save_weights(str(tmp_path / "task.weights.h5"))
    _, config = CASES[name]
    from keras_gemma.convert import keras_hub_format

    ours_config = keras_hub_format.backbone_config(
        keras_hub_format.GEMMA3 if name == "gemma3" else keras_hub_format.GEMMA, theirs.get_config(), "test"
    )
    valid = INPUTS["padding_mask"].astype(bool)
    backbone = keras_gemma.GemmaBackbone(**ours_config)
    backbone.load_weights(tmp_path / "backbone.weights.h5")
    got = to_numpy(backbone.logits(backbone(INPUTS)))
    np.testing.assert_allclose(got[valid], expected[valid], atol=1e-5, rtol=1e-5)
    lm = keras_gemma.GemmaCausalLM(keras_gemma.GemmaBackbone(**ours_config))
    lm.load_weights(str(tmp_path / "task.weights.h5"))
    np.testing.assert_allclose(to_numpy(lm(INPUTS))[valid], expected[valid], atol=1e-5, rtol=1e-5)

    fewer = {**ours_config, "num_layers": ours_config["num_layers"] - 1}  # one block less
    if "layer_types" in fewer:
        fewer["layer_types"] = fewer["layer_types"][:-1]
    other = keras_gemma.GemmaBackbone(**fewer)
    before = [to_numpy(v) for v in other.weights]
    with pytest.raises(ValueError, match=r"backbone\.weights\.h5 holds keras-hub Gemma weights that do not fit"):
        other.load_weights(tmp_path / "backbone.weights.h5")
    assert all(np.array_equal(b, to_numpy(v)) for b, v in zip(before, other.weights))
    # Our own files still take Keras' path.
    backbone.save_weights(str(tmp_path / "ours.weights.h5"))
    again = keras_gemma.GemmaBackbone(**ours_config)
    again.load_weights(str(tmp_path / "ours.weights.h5"))
    np.testing.assert_array_equal(to_numpy(again.logits(again(INPUTS))), to_numpy(backbone.logits(backbone(INPUTS))))
