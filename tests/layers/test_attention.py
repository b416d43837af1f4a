import numpy as np
import pytest
from keras import ops

from helpers import to_numpy
from keras_gemma.layers import GemmaAttention
from keras_gemma.layers import causal_attention_mask


def make(num_query_heads=4, num_key_value_heads=2, head_dim=8, hidden=16, **kwargs):
    layer = GemmaAttention(num_query_heads, num_key_value_heads, head_dim, **kwargs)
    layer.build((None, None, hidden))
    return layer


def run(layer, x, padding_mask=None):
    b, t = x.shape[:2]
    return to_numpy(layer(x, attention_mask=causal_attention_mask(b, t, t, 0, padding_mask)))


def test_grouped_query_equals_multi_head_with_shared_heads():
    """Query head n uses key/value head n // (heads / kv_heads), as in
    transformers' repeat_kv: a grouped layer equals a multi-head layer whose
    key/value heads are copies."""
    x = np.random.RandomState(0).randn(2, 5, 16).astype("float32")
    grouped = make(num_key_value_heads=2)
    multi = make(num_key_value_heads=4)
    multi.query_dense.kernel.assign(grouped.query_dense.kernel)
    multi.output_dense.kernel.assign(grouped.output_dense.kernel)
    for name in ("key_dense", "value_dense"):
        kernel = to_numpy(getattr(grouped, name).kernel)  # (hidden, 2, head_dim)
        getattr(multi, name).kernel.assign(np.repeat(kernel, 2, axis=1))
    np.testing.assert_allclose(run(grouped, x), run(multi, x), atol=1e-5)


@pytest.mark.parametrize("kv_heads", [1, 2, 4])
def test_cached_decoding_equals_full_attention(kv_heads):
    x = np.random.RandomState(0).randn(2, 6, 16).astype("float32")
    layer = make(num_key_value_heads=kv_heads)
    full = run(layer, x)
    cache = ops.zeros((2, 2, 8, kv_heads, 8))
    mask = causal_attention_mask(2, 4, 8, 0)
    prefix, cache = layer(x[:, :4], attention_mask=mask, cache=cache, cache_update_index=0)
    outputs = [to_numpy(prefix)]
    for i in (4, 5):
        mask = causal_attention_mask(2, 1, 8, i)
        y, cache = layer(x[:, i : i + 1], attention_mask=mask, cache=cache, cache_update_index=i)
        outputs.append(to_numpy(y))
    np.testing.assert_allclose(np.concatenate(outputs, axis=1), full, atol=1e-5)
    # The cache holds exactly the keys/values of the six positions.
    assert np.abs(to_numpy(cache)[:, :, 6:]).max() == 0


def test_padded_keys_do_not_leak():
    x = np.random.RandomState(0).randn(1, 5, 16).astype("float32")
    padding = np.array([[1, 1, 1, 0, 0]])
    layer = make()
    a = run(layer, x, padding)
    x2 = x.copy()
    x2[:, 3:] = 100.0  # change only the padded positions
    b = run(layer, x2, padding)
    np.testing.assert_allclose(a[:, :3], b[:, :3], atol=1e-6)
    assert np.isfinite(b).all()


def test_query_pre_attn_scalar_scales_queries():
    x = np.random.RandomState(0).randn(1, 5, 16).astype("float32")
    default = make()
    explicit = make(query_pre_attn_scalar=8)  # == head_dim
    other = make(query_pre_attn_scalar=2)
    explicit.set_weights(default.get_weights())
    other.set_weights(default.get_weights())
    np.testing.assert_allclose(run(default, x), run(explicit, x), atol=1e-6)
    assert np.abs(run(default, x) - run(other, x)).max() > 1e-3


def test_heads_must_divide():
    with pytest.raises(ValueError, match="multiple of num_key_value_heads"):
        GemmaAttention(num_query_heads=4, num_key_value_heads=3, head_dim=8)


def test_default_mask_is_causal():
    x = np.random.RandomState(0).randn(2, 5, 16).astype("float32")
    layer = make()
    np.testing.assert_allclose(to_numpy(layer(x)), run(layer, x), atol=1e-6)


def test_sliding_window_mask():
    mask = to_numpy(causal_attention_mask(1, 6, 6, 0, sliding_window_size=3))[0]
    expected = np.array([[0 <= i - j < 3 for j in range(6)] for i in range(6)])
    np.testing.assert_array_equal(mask, expected)
    # Cached: queries at positions 4 and 5 over an 8-long cache.
    mask = to_numpy(causal_attention_mask(1, 2, 8, 4, sliding_window_size=3))[0]
    expected = np.array([[0 <= i - j < 3 for j in range(8)] for i in (4, 5)])
    np.testing.assert_array_equal(mask, expected)


def test_long_sequences_train_in_rematerialized_query_chunks(monkeypatch):
    from test_feed_forward import _chunked_training_matches_whole

    from keras_gemma.layers import feed_forward

    x = np.random.RandomState(0).randn(2, 7, 16).astype("float32")
    layer = GemmaAttention(num_query_heads=4, num_key_value_heads=2, head_dim=8, logit_soft_cap=5.0)
    layer.build(x.shape)
    padding_mask = np.array([[1] * 7, [1] * 5 + [0] * 2])
    mask = causal_attention_mask(2, 7, 7, 0, padding_mask)  # 4 heads x 7 keys: 2 queries a chunk
    _chunked_training_matches_whole(layer, x, monkeypatch, feed_forward, mask)
