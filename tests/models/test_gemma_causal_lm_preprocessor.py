import numpy as np
import pytest

import keras_gemma


@pytest.fixture
def preprocessor(tokenizer):
    return keras_gemma.GemmaCausalLMPreprocessor(tokenizer, sequence_length=24)


def test_packs_with_bos_eos_and_shifted_labels(preprocessor, tokenizer):
    text = "The quick brown fox."
    ids = list(np.asarray(tokenizer(text)))
    packed = [tokenizer.start_token_id] + ids + [tokenizer.end_token_id]
    x, y, sample_weight = preprocessor([text, "Hi"])
    token_ids = np.asarray(x["token_ids"])[0]
    n = len(packed)
    assert n <= 24
    assert list(token_ids[:n]) == packed
    assert (token_ids[n:] == tokenizer.pad_token_id).all()
    assert list(np.asarray(x["padding_mask"])[0]) == [1] * n + [0] * (24 - n)
    assert list(np.asarray(y)[0][: n - 1]) == packed[1:]
    assert list(np.asarray(sample_weight)[0]) == [1] * (n - 1) + [0] * (25 - n)


def test_generate_preprocess_has_no_eos_and_round_trips(preprocessor):
    x = preprocessor.generate_preprocess(["The quick brown fox."], sequence_length=32)
    ids = np.asarray(x["token_ids"])[0]
    mask = np.asarray(x["padding_mask"])[0].astype(bool)
    assert ids[0] == 2 and 1 not in ids[mask]
    assert preprocessor.generate_postprocess(x) == ["The quick brown fox."]


def test_prompt_longer_than_max_length_is_an_error(preprocessor):
    with pytest.raises(ValueError, match=r"leaves no room to generate within max_length=4"):
        preprocessor.generate_preprocess("The quick brown fox jumps over the dog.", sequence_length=4)


def test_works_inside_tf_data(preprocessor):
    import tensorflow as tf

    texts = ["The quick brown fox.", "Keras runs on JAX."]
    ds = tf.data.Dataset.from_tensor_slices(texts).batch(2).map(preprocessor)
    (x, y, sw), = list(ds)
    ex, ey, esw = preprocessor(texts)
    np.testing.assert_array_equal(x["token_ids"].numpy(), np.asarray(ex["token_ids"]))
    np.testing.assert_array_equal(y.numpy(), np.asarray(ey))
    np.testing.assert_array_equal(sw.numpy(), np.asarray(esw))
