"""The chunked loss against the plain one: values and gradients (the plain
gradients come from the backend's automatic differentiation of Keras' own
loss on full logits)."""

import keras
import numpy as np
import pytest
from helpers import to_numpy
from helpers import value_and_grads
from keras import ops

from keras_gemma.training import chunked_cross_entropy


def plain_cross_entropy(logits, labels, sample_weight):
    """The reference (plain Keras): `(2,)` weighted loss sum and weighted correct count from
    full logits (what `chunked_cross_entropy` must equal)."""
    losses = keras.losses.sparse_categorical_crossentropy(labels, logits, from_logits=True)
    weights = ops.cast(sample_weight, "float32")
    correct = ops.cast(ops.equal(ops.argmax(logits, axis=-1), ops.cast(labels, "int32")), "float32")
    return ops.stack([ops.sum(losses * weights), ops.sum(correct * weights)])


def _problem(seed=0, batch=2, seq=7, hidden=8, vocabulary=23):
    rng = np.random.default_rng(seed)
    hidden_states = rng.normal(size=(batch, seq, hidden)).astype("float32")
    embeddings = rng.normal(size=(vocabulary, hidden)).astype("float32")
    labels = rng.integers(0, vocabulary, size=(batch, seq)).astype("int32")
    weights = (rng.random((batch, seq)) > 0.3).astype("float32")
    return hidden_states, embeddings, labels, weights


def _embedding(embeddings, trainable=True):
    layer = keras.layers.ReversibleEmbedding(*embeddings.shape, tie_weights=True)
    layer.build(None)
    layer.embeddings.assign(embeddings)
    layer.trainable = trainable
    return layer


def _plain(hidden_states, embeddings, labels, weights, soft_cap):
    logits = ops.einsum("btd,vd->btv", hidden_states, embeddings)
    if soft_cap is not None:
        logits = ops.tanh(logits / soft_cap) * soft_cap
    return plain_cross_entropy(logits, labels, weights)


def _chunked(layer, labels, weights, soft_cap=None, chunk_size=None):
    """`fn(h, e)`: the chunked totals with the layer's table read as `e`."""

    def fn(h, e):
        with keras.StatelessScope(state_mapping=[(layer.embeddings, e)]):
            return chunked_cross_entropy(layer, h, labels, weights, soft_cap, chunk_size)

    return fn


@pytest.mark.parametrize("soft_cap", [None, 2.0])
@pytest.mark.parametrize("chunk_size", [None, 1, 3, 14, 100])
def test_values_and_gradients_equal_the_plain_loss(soft_cap, chunk_size):
    hidden_states, embeddings, labels, weights = _problem()
    # Confident predictions somewhere, so the accuracy count is not trivially 0.
    hidden_states[0, :3] = embeddings[labels[0, :3]] * 3
    chunked = _chunked(_embedding(embeddings), labels, weights, soft_cap, chunk_size)

    def plain(h, e):
        return _plain(h, e, labels, weights, soft_cap)[0]

    totals = to_numpy(chunked(hidden_states, embeddings))
    expected = to_numpy(_plain(hidden_states, embeddings, labels, weights, soft_cap))
    np.testing.assert_allclose(totals, expected, rtol=1e-5, atol=1e-5)
    assert expected[1] >= 3  # the accuracy count is exercised

    value, (grad_h, grad_e) = value_and_grads(lambda h, e: chunked(h, e)[0], hidden_states, embeddings)
    plain_value, (plain_h, plain_e) = value_and_grads(plain, hidden_states, embeddings)
    np.testing.assert_allclose(value, plain_value, rtol=1e-5)
    np.testing.assert_allclose(grad_h, plain_h, rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(grad_e, plain_e, rtol=1e-4, atol=1e-5)
    assert np.abs(plain_h).max() > 1e-3 and np.abs(plain_e).max() > 1e-3


def test_torch_compile_equals_eager():
    """`jit_compile=True` on PyTorch trains through torch.compile. There the
    eager step's numpy products and in-place softmax gradient step aside
    (dynamo cannot trace the in-place gradient, and the numpy products would
    split its graph), and loss and gradients equal the eager ones."""
    if keras.config.backend() != "torch":
        pytest.skip("torch.compile is PyTorch's compiler; JAX and TensorFlow train under XLA in test_fit.py")
    import torch

    from keras_gemma.layers.projection import Projection

    hidden_states, embeddings, labels, weights = _problem()
    labels, weights = ops.convert_to_tensor(labels), ops.convert_to_tensor(weights)
    layer = Projection("btd,df->btf", output_shape=(None, hidden_states.shape[-1]))
    layer.build(hidden_states.shape)
    chunked = _chunked(_embedding(embeddings), labels, weights, soft_cap=2.0)

    def loss(h, e):
        return chunked(layer(h), e)[0]

    value, grads = value_and_grads(loss, hidden_states, embeddings)
    torch._dynamo.reset()
    compiled_value, compiled_grads = value_and_grads(
        torch.compile(loss), hidden_states, embeddings
    )
    np.testing.assert_allclose(compiled_value, value, rtol=1e-5)
    for got, want in zip(compiled_grads, grads):
        np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-5)


def test_frozen_embeddings_give_the_same_hidden_gradient():
    hidden_states, embeddings, labels, weights = _problem(seed=1)
    layer = _embedding(embeddings, trainable=False)

    def chunked(h):
        return chunked_cross_entropy(layer, h, labels, weights, chunk_size=4)[0] * 0.5

    def plain(h):
        return _plain(h, embeddings, labels, weights, None)[0] * 0.5

    value, (grad,) = value_and_grads(chunked, hidden_states)
    plain_value, (plain_grad,) = value_and_grads(plain, hidden_states)
    np.testing.assert_allclose(value, plain_value, rtol=1e-5)
    np.testing.assert_allclose(grad, plain_grad, rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("soft_cap", [None, 2.0])
def test_int8_table_loss_equals_keras_quantized_logits(soft_cap):
    """An int8 table: the chunked loss equals Keras' own quantized logits'
    loss, and its hidden-state gradient is the straight-through one, the
    gradient of the same loss on the dequantized float table (what Keras'
    quantized layers give their inputs)."""
    hidden_states, embeddings, labels, weights = _problem(seed=3)
    layer = _embedding(embeddings, trainable=False)
    layer.quantize("int8")
    quantized_logits = layer(hidden_states, reverse=True)
    if soft_cap is not None:
        quantized_logits = ops.tanh(quantized_logits / soft_cap) * soft_cap
    expected = to_numpy(plain_cross_entropy(quantized_logits, labels, weights))
    totals = to_numpy(chunked_cross_entropy(layer, hidden_states, labels, weights, soft_cap, 4))
    np.testing.assert_allclose(totals, expected, rtol=1e-6, atol=1e-6)

    scale = to_numpy(layer.embeddings_scale)
    dequantized = to_numpy(layer.embeddings).astype("float32") / scale[:, None]
    assert np.abs(dequantized - embeddings).max() < 0.02 * np.abs(embeddings).max()

    def chunked(h):
        return chunked_cross_entropy(layer, h, labels, weights, soft_cap, 4)[0]

    # Straight through: the softmax of the quantized logits, carried back
    # through the cap and the dequantized table.
    logits = to_numpy(quantized_logits)
    probabilities = np.exp(logits - logits.max(-1, keepdims=True))
    probabilities /= probabilities.sum(-1, keepdims=True)
    logit_grad = (probabilities - np.eye(embeddings.shape[0])[labels]) * weights[..., None]
    if soft_cap is not None:
        logit_grad *= 1.0 - (logits / soft_cap) ** 2
    _, (grad,) = value_and_grads(chunked, hidden_states)
    np.testing.assert_allclose(grad, logit_grad @ dequantized, rtol=1e-4, atol=1e-5)


def test_accuracy_breaks_ties_like_argmax():
    """Duplicate embedding rows give exactly tied logits: the label counts as
    correct only at the first of the tied maxima, as Keras' accuracy (argmax)
    has it."""
    hidden_states, embeddings, labels, weights = _problem(seed=2, seq=6)
    embeddings[5] = embeddings[9] = embeddings[17]
    weights[:] = 1.0
    for t in range(6):
        # Every position predicts the tied rows (5, 9 and 17) with confidence.
        hidden_states[:, t] = embeddings[5] * 4
    labels[0] = [5, 9, 17, 5, 3, 9]
    labels[1] = [9, 5, 5, 22, 17, 5]
    layer = _embedding(embeddings, trainable=False)
    totals = to_numpy(chunked_cross_entropy(layer, hidden_states, labels, weights, chunk_size=4))
    expected = to_numpy(_plain(hidden_states, embeddings, labels, weights, None))
    assert expected[1] == 5  # the five labels 5, the first of the tied rows
    np.testing.assert_allclose(totals, expected, rtol=1e-5)
