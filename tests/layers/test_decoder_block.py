import numpy as np

from helpers import to_numpy
from keras_gemma.layers import GemmaDecoderBlock

ARGS = dict(hidden_dim=16, intermediate_dim=64, num_query_heads=4, num_key_value_heads=1, head_dim=8)


def build(**kwargs):
    block = GemmaDecoderBlock(**ARGS, **kwargs)
    block.build((None, None, 16))
    return block


def nonzero_scales(block):
    # Norm scales start at zero; give them values so each norm matters.
    for w in block.weights:
        if w.path.endswith("scale"):
            w.assign(np.random.RandomState(1).randn(*w.shape).astype("float32"))


def test_post_norms_change_the_output():
    x = np.random.RandomState(0).randn(1, 5, 16).astype("float32") * 4
    base = build()
    outputs = {}
    for option in ("use_post_attention_norm", "use_post_ffw_norm"):
        block = build(**{option: True})
        nonzero_scales(block)
        by_path = {w.path.split("/", 1)[1]: w for w in block.weights}
        for w in base.weights:
            by_path[w.path.split("/", 1)[1]].assign(w)
        outputs[option] = to_numpy(block(x))
        assert block.post_attention_norm is not None or block.post_ffw_norm is not None
    reference = to_numpy(base(x))
    for option, y in outputs.items():
        assert np.abs(y - reference).max() > 1e-3, option
    assert np.abs(outputs["use_post_attention_norm"] - outputs["use_post_ffw_norm"]).max() > 1e-3


def test_default_has_only_pre_norms():
    block = build()
    names = sorted(w.path.split("/")[1] for w in block.weights if w.path.endswith("scale"))
    assert names == ["pre_attention_norm", "pre_ffw_norm"]


def test_dropout_acts_in_training_only():
    x = np.random.RandomState(0).randn(1, 5, 16).astype("float32")
    block = build(dropout=0.5)
    plain = build()
    plain.set_weights(block.get_weights())
    np.testing.assert_allclose(to_numpy(block(x)), to_numpy(plain(x)), atol=1e-6)
    assert np.abs(to_numpy(block(x, training=True)) - to_numpy(plain(x))).max() > 1e-3
