import keras
import numpy as np
import pytest

import keras_gemma
from helpers import TINY, to_numpy

INPUTS = {
    "token_ids": np.array([[2, 17, 42, 9, 100, 5], [2, 30, 31, 0, 0, 0]]),
    "padding_mask": np.array([[1, 1, 1, 1, 1, 1], [1, 1, 1, 0, 0, 0]]),
}


def randomize(model, seed=0):
    """Random values for every weight, norm scales included."""
    rng = np.random.RandomState(seed)
    for w in model.weights:
        w.assign((rng.randn(*w.shape) * 0.2).astype("float32"))


@pytest.mark.parametrize(
    "name, embedding, non_embedding",
    [
        ("gemma_2b", 524_550_144, 1_981_884_416),
        ("gemma_7b", 786_825_216, 7_751_248_896),
    ],
)
def test_paper_parameter_counts(name, embedding, non_embedding):
    """Table 2 of the paper, counted on real layer shapes. A full 7B does not
    fit this machine, so the count is taken on one- and two-layer models with
    the real widths (and a small vocabulary), and extended: the layers are
    identical, so the count is linear in num_layers."""
    config = keras_gemma.presets.backbone_config(name)
    small_vocab = 8

    def count(num_layers):
        backbone = keras_gemma.GemmaBackbone(
            **{**config, "num_layers": num_layers, "vocabulary_size": small_vocab},
            dtype="bfloat16",
        )
        embed = backbone.token_embedding.count_params()
        assert embed == small_vocab * config["hidden_dim"]
        return backbone.count_params() - embed

    one, two = count(1), count(2)
    per_layer = two - one
    total_non_embedding = one + (config["num_layers"] - 1) * per_layer
    assert config["vocabulary_size"] * config["hidden_dim"] == embedding
    assert total_non_embedding == non_embedding


def test_released_presets_use_the_256000_vocabulary():
    assert keras_gemma.presets.backbone_config("gemma_2b_en")["vocabulary_size"] == 256000
    assert keras_gemma.presets.backbone_config("gemma_7b")["vocabulary_size"] == 256128
    with pytest.raises(ValueError, match="Unknown preset 'gemma_3b'"):
        keras_gemma.GemmaBackbone.from_preset("gemma_3b")
    # keras-hub's names ("gemma_2b_en") are Kaggle handles (tests/convert/test_hub.py);
    # the paper's are architectures only.
    with pytest.raises(ValueError, match="ships no weights for 'gemma_2b'"):
        keras_gemma.GemmaBackbone.from_preset("gemma_2b")


def test_preset_architecture_without_weights():
    backbone = keras_gemma.GemmaBackbone.from_preset(
        "gemma_2b_en", load_weights=False, num_layers=1, vocabulary_size=16
    )
    assert backbone.num_query_heads == 8 and backbone.num_key_value_heads == 1
    assert backbone.hidden_dim == 2048 and backbone.head_dim == 256


def keras_hub_pair(seed, **config):
    """keras_gemma's and keras-hub's GemmaCausalLM on the same config, with
    keras-hub's random weights copied across."""
    import keras_hub

    ours = keras_gemma.GemmaCausalLM(keras_gemma.GemmaBackbone(**config))
    theirs = keras_hub.models.GemmaCausalLM(
        backbone=keras_hub.models.GemmaBackbone(**config), preprocessor=None
    )
    randomize(theirs.backbone, seed=seed)
    by_path = {w.path: w for w in theirs.backbone.weights}
    assert len(by_path) == len(ours.backbone.weights)
    for w in ours.backbone.weights:
        # keras_gemma groups the feed-forward kernels in one sub-layer and
        # lays kernels out (inputs, outputs): see attention.py.
        value = to_numpy(by_path[w.path.replace("feed_forward/", "")])
        if w.path.endswith(("query/kernel", "key/kernel", "value/kernel")):
            value = value.transpose(1, 0, 2)  # (heads, d, h) -> (d, heads, h)
        if w.path.endswith("ffw_linear/kernel"):
            value = value.T  # (f, d) -> (d, f)
        w.assign(value)
    return ours, theirs


def test_same_logits_as_keras_hub_gemma():
    """keras-hub's GemmaBackbone with the same (random) weights copied across."""
    for kv_heads in (1, 2, 4):
        ours, theirs = keras_hub_pair(kv_heads, **{**TINY, "num_key_value_heads": kv_heads})
        valid = INPUTS["padding_mask"].astype(bool)
        expected = to_numpy(theirs(INPUTS))[valid]
        np.testing.assert_allclose(to_numpy(ours(INPUTS))[valid], expected, atol=1e-4, rtol=1e-4)


def test_keras_hub_gemma2_sliding_window_arguments():
    """keras-hub's Gemma 2 spelling (`use_sliding_window_attention`,
    `sliding_window_size`) means what it means there: keras-hub's logits and
    greedy tokens, with a window shorter than the sequence."""
    config = dict(
        TINY, num_layers=3, use_sliding_window_attention=True, sliding_window_size=3,
        use_post_attention_norm=True, use_post_ffw_norm=True,
        attention_logit_soft_cap=50.0, final_logit_soft_cap=30.0,
    )
    ours, theirs = keras_hub_pair(7, **config)
    assert ours.backbone.layer_types == ["sliding_attention", "full_attention", "sliding_attention"]
    inputs = {
        "token_ids": np.array([list(range(5, 17)), list(range(40, 49)) + [0, 0, 0]]),
        "padding_mask": np.array([[1] * 12, [1] * 9 + [0] * 3]),
    }
    valid = inputs["padding_mask"].astype(bool)
    expected = to_numpy(theirs(inputs))[valid]
    np.testing.assert_allclose(to_numpy(ours(inputs))[valid], expected, atol=1e-5, rtol=1e-5)
    # Without the window the outputs differ from the window on: it is live.
    full = keras_gemma.GemmaCausalLM(keras_gemma.GemmaBackbone(**{**config, "use_sliding_window_attention": False}))
    full.set_weights(ours.get_weights())
    assert np.abs(to_numpy(full(inputs))[valid] - expected).max() > 1e-3
    prompts = {"token_ids": np.array([[2, 17, 42, 9] + [0] * 10]), "padding_mask": np.array([[1] * 4 + [0] * 10])}
    theirs.compile(sampler="greedy")
    ours.compile(sampler="greedy")
    np.testing.assert_array_equal(
        ours.generate(prompts, stop_token_ids=None)["token_ids"],
        to_numpy(theirs.generate(prompts, stop_token_ids=None)["token_ids"]),
    )


def test_unknown_and_ignored_arguments_are_errors():
    with pytest.raises(TypeError, match="totally_bogus_argument"):
        keras_gemma.GemmaBackbone(**TINY, totally_bogus_argument=123)
    ignored = [
        ({"sliding_window_size": 3}, "sliding_window_size=3 would have no effect"),
        ({"local_rope_max_wavelength": 10.0}, "local_rope_max_wavelength=10.0 would have no effect"),
        (
            {"layer_types": ["sliding_attention"] * 2, "sliding_window_size": 3, "rope_scaling_factor": 8.0},
            "rope_scaling_factor=8.0 would have no effect",
        ),
        ({"query_pre_attn_scalar": 3.0, "query_head_dim_normalize": False}, "query_head_dim_normalize=False"),
        ({"use_sliding_window_attention": True, "layer_types": ["full_attention"] * 2}, "not both"),
        ({"dropout": 1.5}, "dropout"),
    ]
    for options, message in ignored:
        with pytest.raises(ValueError, match=message):
            keras_gemma.GemmaBackbone(**TINY, **options)
    # keras-hub's configs always carry a window size; without sliding layers
    # it is unused there, and accepted here in that spelling.
    backbone = keras_gemma.GemmaBackbone(
        **TINY, use_sliding_window_attention=False, sliding_window_size=4096
    )
    assert backbone.layer_types == ["full_attention"] * 2
    # A scalar that says what query_head_dim_normalize=False says (as the
    # configs of earlier versions wrote it) is no conflict.
    keras_gemma.GemmaBackbone(**TINY, query_pre_attn_scalar=8.0, query_head_dim_normalize=False)


def test_query_head_dim_normalize_survives_a_config_round_trip():
    backbone = keras_gemma.GemmaBackbone(**TINY, query_head_dim_normalize=False)
    randomize(backbone)
    config = backbone.get_config()
    assert config["query_pre_attn_scalar"] is None
    outputs = {}
    for normalize in (False, True):
        clone = keras_gemma.GemmaBackbone.from_config({**config, "query_head_dim_normalize": normalize})
        clone.set_weights(backbone.get_weights())
        outputs[normalize] = to_numpy(clone(INPUTS))
    np.testing.assert_array_equal(outputs[False], to_numpy(backbone(INPUTS)))
    assert np.abs(outputs[True] - outputs[False]).max() > 1e-3


def test_config_round_trip():
    backbone = keras_gemma.GemmaBackbone(**TINY, use_post_ffw_norm=True, rope_max_wavelength=500.0)
    config = backbone.get_config()
    clone = keras_gemma.GemmaBackbone.from_config(config)
    assert clone.get_config() == config
    clone.set_weights(backbone.get_weights())
    np.testing.assert_array_equal(to_numpy(clone(INPUTS)), to_numpy(backbone(INPUTS)))


def test_query_head_dim_normalize_changes_output():
    a = keras_gemma.GemmaBackbone(**TINY)  # head_dim 16 != hidden 32 / 4 heads
    b = keras_gemma.GemmaBackbone(**TINY, query_head_dim_normalize=False)
    randomize(a)
    b.set_weights(a.get_weights())
    assert np.abs(to_numpy(a(INPUTS)) - to_numpy(b(INPUTS))).max() > 1e-3


def test_rope_max_wavelength_changes_output():
    a = keras_gemma.GemmaBackbone(**TINY)
    b = keras_gemma.GemmaBackbone(**TINY, rope_max_wavelength=100.0)
    randomize(a)
    b.set_weights(a.get_weights())
    assert np.abs(to_numpy(a(INPUTS)) - to_numpy(b(INPUTS))).max() > 1e-3


@pytest.mark.parametrize("dtype", ["bfloat16", "mixed_bfloat16"])
def test_mixed_precision(dtype):
    ref = keras_gemma.GemmaCausalLM(keras_gemma.GemmaBackbone(**TINY))
    randomize(ref.backbone)
    low = keras_gemma.GemmaCausalLM(keras_gemma.GemmaBackbone(**TINY, dtype=dtype))
    low.backbone.set_weights(ref.backbone.get_weights())
    weight_dtype = "bfloat16" if dtype == "bfloat16" else "float32"
    assert all(str(w.dtype) == weight_dtype for w in low.backbone.weights)
    hidden = low.backbone(INPUTS)
    assert keras.backend.standardize_dtype(hidden.dtype) == "bfloat16"
    logits = low(INPUTS)
    assert keras.backend.standardize_dtype(logits.dtype) == "float32"  # always
    valid = INPUTS["padding_mask"].astype(bool)
    expected = to_numpy(ref(INPUTS))[valid]
    got = to_numpy(logits)[valid]
    # bfloat16 keeps ~3 significant digits; the argmax should mostly agree.
    assert np.abs(got - expected).max() < 0.1 * np.abs(expected).max()
    assert (got.argmax(-1) == expected.argmax(-1)).mean() >= 0.75


LONG = {
    "token_ids": np.arange(2, 14)[None] % TINY["vocabulary_size"],
    "padding_mask": np.ones((1, 12), "int32"),
}
SLIDING = {"sliding_window_size": 3, "layer_types": ["sliding_attention", "full_attention"]}


@pytest.mark.parametrize(
    "base, option",
    [
        ({}, {"attention_logit_soft_cap": 0.5}),
        ({}, {"final_logit_soft_cap": 0.5}),
        ({}, {"query_pre_attn_scalar": 3.0}),
        ({}, SLIDING),
        ({}, {"layer_types": ["full_attention", "sliding_attention"], "sliding_window_size": 3}),
        (SLIDING, {"local_rope_max_wavelength": 50.0}),
        ({}, {"rope_scaling_factor": 4.0}),
        ({}, {"use_post_attention_norm": True}),
        ({}, {"use_post_ffw_norm": True}),
        ({}, {"use_query_key_norm": True}),
    ],
    ids=lambda d: ",".join(d) or "-",
)
def test_each_option_changes_the_logits(base, option):
    """Every Gemma 2/3 option is live: switching it on changes the output."""
    a = keras_gemma.GemmaCausalLM(keras_gemma.GemmaBackbone(**TINY, **base))
    b = keras_gemma.GemmaCausalLM(keras_gemma.GemmaBackbone(**TINY, **{**base, **option}))
    randomize(a.backbone)
    randomize(b.backbone, seed=1)  # new norm scales get values too
    by_path = {w.path: w for w in b.backbone.weights}
    for w in a.backbone.weights:
        by_path[w.path].assign(w)
    difference = np.abs(to_numpy(a(LONG)) - to_numpy(b(LONG))).max()
    assert difference > 1e-3


def test_layer_types_are_checked():
    with pytest.raises(ValueError, match="layer_types must list 2 entries"):
        keras_gemma.GemmaBackbone(**TINY, layer_types=["full_attention"])
    with pytest.raises(ValueError, match="set sliding_window_size"):
        keras_gemma.GemmaBackbone(**TINY, layer_types=["sliding_attention"] * 2)
